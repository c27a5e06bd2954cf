"""One file per timm family: everything attnxfer knows about it (`attnxfer.models.attention.family`).

A family file holds the adapters of its timm attention classes (`register_adapter`: subclasses of the timm
class meeting `TransferableAttention`, each answering for its logits, its token partition, where its rows sit
on the image and its conversion slot), the refusals of classes that cannot transfer (`refuse_attention`), and
one `Family` record (`register_family`: the timm modules whose archs it covers, with their coverage counts,
where its models keep the patch embedding, whether its blocks pass a rope). Files starting with ``_`` hold
what several families share (projections, spatial-reduction keys, the rope slot).

timm's plain ``Attention`` is `attnxfer.models.attention.softmax.TransferAttention` (registered by ``vit``).
Importing this package imports every family file in it, which registers them: a new family is one new file.
"""

import importlib
import pkgutil

#: The family files, in name order (each registers its adapters and its `Family` on import).
FAMILY_FILES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in FAMILY_FILES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["FAMILY_FILES"]
