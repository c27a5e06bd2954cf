"""ViTs on timm and the one attention interface that softmax and every zoo attention meet."""

from . import efficient  # registers the zoo's attentions beside softmax
from .attention import (
    AttentionIO,
    MapKind,
    PartialQKV,
    TransferableAttention,
    TransferAttention,
    attention_io,
    attention_maps,
    attention_name_of,
    capture_attention,
    create_attention,
    explicit_attention_map,
    get_attention_class,
    list_attentions,
    make_transfer_aware,
    register_attention,
    transferable_attentions,
)
from .handover import Chunks, Signal
from .student import (
    attention_layout,
    student_from_spec,
    student_like,
    student_spec,
    vit_traits,
)
from .vit import create_vit

__all__ = [
    "AttentionIO",
    "Chunks",
    "MapKind",
    "PartialQKV",
    "Signal",
    "TransferAttention",
    "TransferableAttention",
    "attention_io",
    "attention_layout",
    "attention_maps",
    "attention_name_of",
    "capture_attention",
    "create_attention",
    "create_vit",
    "efficient",
    "explicit_attention_map",
    "get_attention_class",
    "list_attentions",
    "make_transfer_aware",
    "register_attention",
    "student_from_spec",
    "student_like",
    "student_spec",
    "transferable_attentions",
    "vit_traits",
]
