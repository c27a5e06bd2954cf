"""The efficient-attention zoo: drop-in replacements for timm's ``Attention`` with a declared map kind.

Every class meets the one attention interface (`attnxfer.models.attention.TransferableAttention`:
timm's parameter names qkv, q_norm, k_norm, norm, proj; ``project``, ``attend``,
``attention_map(q, k, rows)``, ``map_kind``, the per-call ``AttentionIO``), adds
``new_parameter_names()``, and is registered by name in the one attention registry
(`attnxfer.models.attention.registry`), beside softmax. A new attention is one file here:
subclass `EfficientAttention` (or `KernelAttention`), implement ``_attend`` and the map rows,
declare its ``map_kind``, ``precision`` and rope answer (``rope_keeps_map_kind``, ``rope_why``) and
decorate it with ``@register_attention('name')``. Importing this package imports every module in it,
which registers them; ``list_attentions()`` names them, and each registered class is importable from here
by its class name (``from attnxfer.models.efficient import PerformerAttention``).

Precision: each class declares ``precision`` (a `PrecisionPolicy`, `precision_policies()` lists them):
on GPU, bf16 operands with fp32 sums where a test shows it safe, fp32 otherwise.

Token layout: timm ViTs put ``num_prefix_tokens`` class/register tokens before the H x W grid.
Attentions that need the grid (window, window_linear, agent, focused_linear's conv) read it
from ``num_prefix_tokens`` / ``grid_size`` kwargs or ``set_token_layout``
(``configure_token_layout(vit)`` sets every layer; ``efficient_student_from_teacher`` does it
for you), else infer a square grid with the fewest prefix tokens. Prefix tokens always attend
to every token and are attended to by every token: window attentions give them exact softmax
rows and put them in every window's key set; agent attention pools agents from grid tokens only
but lets prefix tokens attend through and be attended by the agents; focused linear's conv skips
them (its kernel part treats them like any token); cosFormer gives them the first positions;
Nystrom/Linformer put them in the first landmark segment. The global kernels (linear, performer,
hedgehog, hydra) do not distinguish them at all.
"""

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
