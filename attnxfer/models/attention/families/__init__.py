"""One file per timm family (its adapters, refusals and `Family` record; ``_`` files hold what several
share): importing this package registers every file in it, so a new family is one new file."""

import importlib
import pkgutil

#: The family files, in name order (each registers its adapters and its `Family` on import).
FAMILY_FILES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in FAMILY_FILES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["FAMILY_FILES"]
