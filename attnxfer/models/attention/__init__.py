"""One attention interface for softmax and every zoo attention (the zoo itself: `attnxfer.models.efficient`);
docs/architecture.md maps the modules."""

from .adapters import (
    attention_blocks as attention_blocks,
    attention_layers as attention_layers,
    attention_stages as attention_stages,
    group_stages as group_stages,
    list_adapters as list_adapters,
    refuse_attention as refuse_attention,
    register_adapter as register_adapter,
    require_model as require_model,
    stage_of as stage_of,
)
from .capture import (
    attached_ios as attached_ios,
    attention_maps as attention_maps,
    capture_attention as capture_attention,
    run_with_ios as run_with_ios,
    transferable_attentions as transferable_attentions,
)
from .family import (
    Family as Family,
    ImageSizes as ImageSizes,
    families as families,
    family_of as family_of,
)
from .interface import (
    AttentionIO as AttentionIO,
    MapKind as MapKind,
    StopForward as StopForward,
    TransferableAttention as TransferableAttention,
    attention_io as attention_io,
)
from .partial_qkv import PartialQKV as PartialQKV
from .placement import RowPlacement as RowPlacement, TokenWalk as TokenWalk
from .registry import (
    attention_name_of as attention_name_of,
    create_attention as create_attention,
    get_attention_class as get_attention_class,
    list_attentions as list_attentions,
    register_attention as register_attention,
)
from .slots import ConversionSlot as ConversionSlot, slot_of as slot_of
from .softmax import (
    SOFTMAX as SOFTMAX,
    TransferAttention as TransferAttention,
    attention_with_lse as attention_with_lse,
    explicit_attention_map as explicit_attention_map,
    make_transfer_aware as make_transfer_aware,
    sdpa as sdpa,
)
