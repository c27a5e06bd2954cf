"""One attention interface for softmax and every zoo attention.

==================  =================================================================================
module              what
==================  =================================================================================
``interface``       `TransferableAttention` (the abstract base: project / attend / attention_map /
                    forward with `AttentionIO`), `MapKind`, `AttentionIO`, `PartialQKV`
``softmax``         `TransferAttention` (timm's ``Attention``, registered as ``"softmax"``),
                    `make_transfer_aware`, `sdpa`, `attention_with_lse`, `explicit_attention_map`
``adapters``        timm attention class -> its adapter (`register_adapter`, `refuse_attention`), and
                    `attention_layers`: a model's attention layers in forward order, swapped in place
``families``        one adapter file per timm attention class (EVA, AttentionRope, BEiT, ...)
``registry``        name -> class for softmax and the zoo (`register_attention`, `create_attention`,
                    `attention_name_of`, ...)
``capture``         whole-model access through the interface: `transfer_attentions`, `attention_maps`,
                    `capture_attention`
``numerics``        fp32 sections and row chunks (one chunk budget) for attentions and their losses;
                    `matmul_fp32` (fp32 results, tensor cores for bf16 on CUDA), the zoo's precision policy
``lse``             the chunked `row_logsumexp` and the backends of `attention_with_lse` (softmax
                    attention that hands out its log-sum-exp: FlexAttention on CUDA, a twin elsewhere)
==================  =================================================================================

The zoo's attentions live in `attnxfer.models.efficient` (one file per family) on the base
`EfficientAttention`.
"""

from .adapters import (
    adapter_for,
    attention_blocks,
    attention_layers,
    attention_stages,
    list_adapters,
    refuse_attention,
    register_adapter,
    stage_of,
)
from .capture import CAPTURE_FIELDS, attention_maps, capture_attention, transfer_attentions
from .interface import (
    COUNTERPART_MODULES,
    QKV,
    AttentionIO,
    MapKind,
    PartialQKV,
    StopForward,
    TransferableAttention,
    attention_io,
)
from .registry import (
    attention_layer,
    attention_name_of,
    create_attention,
    get_attention_class,
    list_attentions,
    register_attention,
)
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
    "MapKind",
    "PartialQKV",
    "StopForward",
    "TransferAttention",
    "TransferableAttention",
    "adapter_for",
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
    "get_attention_class",
    "list_adapters",
    "list_attentions",
    "make_transfer_aware",
    "refuse_attention",
    "register_adapter",
    "register_attention",
    "sdpa",
    "stage_of",
    "transfer_attentions",
]
