"""The NaFlexViT family (``naflexvit``): timm's plain ``Attention`` (the ViT family's adapter and conversion
slot) in a model that keeps its patch embedding as ``embeds`` and takes NaFlex batches (``patches``,
``patch_coord``, ``patch_valid``): padding arrives at each layer as ``attn_mask``, which capture records and
the loss leaves out (`TransferableAttention.transfer_forward`).
"""

from __future__ import annotations

from ..family import Family, ImageSizes, ModuleCoverage, register_family

FAMILY = register_family(
    Family(
        name="naflexvit",
        title="NaFlexViT",
        patch_embedding="embeds",
        modules=(ModuleCoverage("naflexvit", 11, 11, 11, ("inspect", "convert", "export")),),
        sizes=ImageSizes(how="any size by design: its position embedding is resampled per input"),
    )
)
