"""ViTs on timm and the one attention interface that softmax and every zoo attention meet."""

from . import efficient as efficient  # registers the zoo's attentions beside softmax
from .attention import (
    AttentionIO as AttentionIO,
    MapKind as MapKind,
    PartialQKV as PartialQKV,
    TransferableAttention as TransferableAttention,
    TransferAttention as TransferAttention,
    attention_io as attention_io,
    attention_maps as attention_maps,
    attention_name_of as attention_name_of,
    capture_attention as capture_attention,
    create_attention as create_attention,
    explicit_attention_map as explicit_attention_map,
    get_attention_class as get_attention_class,
    list_attentions as list_attentions,
    make_transfer_aware as make_transfer_aware,
    register_attention as register_attention,
    transferable_attentions as transferable_attentions,
)
from .handover import Chunks as Chunks, Signal as Signal
from .student import (
    attention_layout as attention_layout,
    student_from_spec as student_from_spec,
    student_like as student_like,
    student_spec as student_spec,
    vit_traits as vit_traits,
)
from .vit import create_vit as create_vit
