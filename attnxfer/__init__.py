"""attnxfer: attention transfer for Vision Transformers (attention copy, distillation, conversion to efficient
attention) on timm models. Public names load on first use (PEP 562), so ``import attnxfer`` imports neither
torch nor timm (about 6 s) and ``attnxfer --help`` answers at once.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .version import __version__

#: public name -> the subpackage that defines it (imported on first access)
_LAZY = {
    "export_run": "checkpoints",
    "export_student": "checkpoints",
    "TransferAttention": "models",
    "attention_maps": "models",
    "create_vit": "models",
    "make_transfer_aware": "models",
    "student_like": "models",
    "fetch_teacher": "sources",
    "load_student": "sources",
    "load_teacher": "sources",
    "TeacherStudent": "transfer",
    "PlanError": "transfer",
    "TransferPlan": "transfer",
    "attention_distillation_loss": "transfer",
    "build_plan": "transfer",
}

#: a public name of an earlier release -> where it lives now (dotted, under attnxfer). Still read, with a
#: DeprecationWarning that gives the new spelling, for a release; never in `__all__` nor `dir(attnxfer)`.
_RENAMED = {
    "DualViT": "TeacherStudent",  # it runs every family, not only ViTs
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time `__getattr__` below imports on demand
    from .checkpoints import export_run, export_student
    from .models import TransferAttention, attention_maps, create_vit, make_transfer_aware, student_like
    from .sources import fetch_teacher, load_student, load_teacher
    from .transfer import PlanError, TeacherStudent, TransferPlan, attention_distillation_loss, build_plan

__all__ = [
    "PlanError",
    "TeacherStudent",
    "TransferAttention",
    "TransferPlan",
    "__version__",
    "attention_distillation_loss",
    "attention_maps",
    "build_plan",
    "create_vit",
    "export_run",
    "export_student",
    "fetch_teacher",
    "load_student",
    "load_teacher",
    "make_transfer_aware",
    "student_like",
]


#: subpackages reachable as attributes (``attnxfer.models.create_vit`` after a bare ``import attnxfer``)
_SUBPACKAGES = frozenset(
    (
        "analysis",
        "apps",
        "checkpoints",
        "config",
        "data",
        "launch",
        "models",
        "search",
        "sources",
        "train",
        "transfer",
    )
)


def __getattr__(name: str) -> Any:
    """Import a public name's subpackage (or a subpackage) the first time it is read, and keep the value."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it in globals()
    if name in _RENAMED:  # not kept in globals(), so that every use is warned (once per place)
        new = f"{__name__}.{_RENAMED[name]}"
        warnings.warn(
            f"{__name__}.{name} is deprecated and will be removed in a future release; use {new} (the same object)",
            DeprecationWarning,
            stacklevel=2,
        )
        return functools.reduce(getattr, _RENAMED[name].split("."), importlib.import_module(__name__))
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and subpackages (what tab completion offers), not this module's own imports."""
    return sorted({*__all__, *_SUBPACKAGES, *(name for name in globals() if name.startswith("__"))})
