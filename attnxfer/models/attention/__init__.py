"""One attention interface for softmax and every zoo attention.

==================  =================================================================================
module              what
==================  =================================================================================
``interface``       `TransferableAttention` (the abstract base: project / attend / attention_map /
                    forward with `AttentionIO`; what a family's layer says of its calls and rows)
``map_kind``        `MapKind` (softmax, row-stochastic, signed, none)
``attention_io``    `AttentionIO` (one call's instructions and results), `StopForward`, `attention_io`
``partial_qkv``     `PartialQKV` (q/k/v row blocks frozen independently, timm's state-dict names)
``softmax``         `TransferAttention` (timm's ``Attention``, registered as ``"softmax"``),
                    `make_transfer_aware`, `sdpa`, `attention_with_lse`, `explicit_attention_map`
``adapters``        timm attention class -> its adapter (`register_adapter`, `refuse_attention`),
                    `attention_layers` (a model's attention layers in forward order, swapped in place)
                    and the stage grouping (`stage_of`, `group_stages`, `attention_stages`)
``families``        one file per timm family (ViT, EVA, BEiT, ..., Swin, PVTv2, Twins, Hiera)
``family``          `Family`: what a family file declares besides its adapters (`register_family`,
                    `families`, `patch_embeddings`, `family_of`; `ImageSizes`/`Tiling`: other sizes)
``slots``           `ConversionSlot`: how a zoo attention takes a family's layer (`slot_of`)
``placement``       `RowPlacement`: where a layer's rows and keys sit on the image (`place_rows`)
``registry``        name -> class for softmax and the zoo (`register_attention`, `create_attention`,
                    `attention_name_of`, ...)
``capture``         whole-model access through the interface: `transferable_attentions`, `attention_maps`,
                    `capture_attention`, `run_with_ios` (a model's own forward with per-layer IOs)
``numerics``        fp32 sections and row chunks (one chunk budget) for attentions and their losses;
                    `matmul_fp32` (fp32 results, tensor cores for bf16 on CUDA), the zoo's precision policy
``lse``             the chunked `row_logsumexp` and the backends of `attention_with_lse` (softmax
                    attention that hands out its log-sum-exp: FlexAttention on CUDA, a twin elsewhere)
==================  =================================================================================

The zoo's attentions live in `attnxfer.models.efficient` (one file per attention) on the base
`EfficientAttention`.
"""

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
    PartialQKV,
    StopForward,
    TransferableAttention,
    attention_io,
)
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
