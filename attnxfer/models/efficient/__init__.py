"""The efficient-attention zoo: drop-in replacements for timm's ``Attention`` with a declared map kind.

A new attention is one file here (subclass `EfficientAttention` or `KernelAttention`, declare ``map_kind``,
``precision`` and the rope answer, ``@register_attention``); importing the package registers every module,
and each class is importable from here by name.

Prefix tokens (class/register tokens before the grid; layout from ``set_token_layout`` or inferred) always
attend to and are attended by every token: window attentions give them exact softmax rows and put them in
every window's keys; agents pool the grid only; focused linear's conv skips them; cosFormer gives them the
first positions; Nystrom/Linformer put them in the first segment; the global kernels treat them as any token."""

import importlib
import pkgutil

from ..attention.interface import COUNTERPART_MODULES, MapKind
from ..attention.registry import (
    attention_layer,
    create_attention,
    get_attention_class,
    list_attentions,
    register_attention,
)
from .base import EfficientAttention, precision_policies
from .swap import (
    build_efficient_student,
    check_softmax_teacher,
    configure_token_layout,
    efficient_student_from_teacher,
    new_parameters,
    set_drop_path,
    swap_attentions,
    with_attention,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the attentions it defines

#: Each registered zoo attention's class by its class name (``PerformerAttention``, ``WindowAttention``, ...).
_CLASSES = {
    cls.__name__: cls
    for cls in map(get_attention_class, list_attentions())
    if cls.__module__.startswith(f"{__name__}.")
}


def __getattr__(name: str):
    """A registered zoo attention class by its class name: no hand-kept list of imports here."""
    if name in _CLASSES:
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COUNTERPART_MODULES",
    "EfficientAttention",
    "MapKind",
    "attention_layer",
    "build_efficient_student",
    "check_softmax_teacher",
    "configure_token_layout",
    "create_attention",
    "efficient_student_from_teacher",
    "get_attention_class",
    "list_attentions",
    "new_parameters",
    "precision_policies",
    "register_attention",
    "set_drop_path",
    "swap_attentions",
    "with_attention",
    *sorted(_CLASSES),
]
