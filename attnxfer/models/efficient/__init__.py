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

from ..attention import registry as _registry
from ..attention.interface import COUNTERPART_MODULES as COUNTERPART_MODULES, MapKind as MapKind
from ..attention.registry import (
    attention_layer as attention_layer,
    create_attention as create_attention,
    get_attention_class as get_attention_class,
    list_attentions as list_attentions,
    register_attention as register_attention,
)
from .base import (
    EfficientAttention as EfficientAttention,
    GridFitError as GridFitError,
    precision_policies as precision_policies,
)
from .swap import (
    build_efficient_student as build_efficient_student,
    check_softmax_teacher as check_softmax_teacher,
    configure_token_layout as configure_token_layout,
    efficient_student_from_teacher as efficient_student_from_teacher,
    new_parameters as new_parameters,
    set_drop_path as set_drop_path,
    swap_attentions as swap_attentions,
    with_attention as with_attention,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the attentions it defines


def _by_class_name(classes) -> dict:
    """The zoo's ``classes`` by class name; two of one name in two files (a file copied with its class) are
    refused, not one silently given for the other's import (one file's classes made in a loop keep its last)."""
    found: dict = {}
    for cls in classes:
        if not cls.__module__.startswith(f"{__name__}."):
            continue
        other = found.setdefault(cls.__name__, cls)
        if other.__module__ != cls.__module__:
            raise TypeError(
                f"two zoo attentions have the class name {cls.__name__}: {other.attention_name!r} in "
                f"{other.__module__} and {cls.attention_name!r} in {cls.__module__}; rename one class (`from "
                f"{__name__} import {cls.__name__}` finds a class by its name)"
            )
        found[cls.__name__] = cls
    return found


#: Each registered zoo attention's class by its class name (``PerformerAttention``, ``WindowAttention``, ...);
#: from the registry itself, not list_attentions: a plug-in it loads may import this.
_CLASSES = _by_class_name(_registry._ATTENTIONS.values())


def __getattr__(name: str):
    """A registered zoo attention class by its class name: no hand-kept list of imports here."""
    if name in _CLASSES:
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
