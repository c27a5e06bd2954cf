"""One attention interface for softmax and every zoo attention (the zoo itself: `attnxfer.models.efficient`);
docs/architecture.md maps the modules."""

from .adapters import (
    adapter_for,
    attention_blocks,
    attention_layers,
    attention_stages,
    group_stages,
    list_adapters,
    refuse_attention,
    register_adapter,
    stage_of,
)
from .capture import (
    CAPTURE_FIELDS,
    attached_ios,
    attention_maps,
    capture_attention,
    run_with_ios,
    transferable_attentions,
)
from .family import Family, ImageSizes, Tiling, families, family_of, patch_embeddings
from .interface import (
    COUNTERPART_MODULES,
    QKV,
    AttentionIO,
    MapKind,
    StopForward,
    TransferableAttention,
    attention_io,
)
from .partial_qkv import PartialQKV
from .placement import RowPlacement, TokenWalk
from .registry import (
    attention_layer,
    attention_name_of,
    create_attention,
    get_attention_class,
    list_attentions,
    register_attention,
)
from .slots import ConversionSlot, slot_of
from .softmax import (
    SOFTMAX,
    TransferAttention,
    attention_with_lse,
    explicit_attention_map,
    make_transfer_aware,
    sdpa,
)

__all__ = [
    "CAPTURE_FIELDS",
    "COUNTERPART_MODULES",
    "QKV",
    "SOFTMAX",
    "AttentionIO",
    "ConversionSlot",
    "Family",
    "ImageSizes",
    "MapKind",
    "PartialQKV",
    "RowPlacement",
    "StopForward",
    "Tiling",
    "TokenWalk",
    "TransferAttention",
    "TransferableAttention",
    "adapter_for",
    "attached_ios",
    "attention_blocks",
    "attention_io",
    "attention_layer",
    "attention_layers",
    "attention_maps",
    "attention_name_of",
    "attention_stages",
    "attention_with_lse",
    "capture_attention",
    "create_attention",
    "explicit_attention_map",
    "families",
    "family_of",
    "get_attention_class",
    "group_stages",
    "list_adapters",
    "list_attentions",
    "make_transfer_aware",
    "patch_embeddings",
    "refuse_attention",
    "register_adapter",
    "register_attention",
    "run_with_ios",
    "sdpa",
    "slot_of",
    "stage_of",
    "transferable_attentions",
]
