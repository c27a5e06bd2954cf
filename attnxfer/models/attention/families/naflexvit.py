"""The NaFlexViT family: timm's plain ``Attention`` in a model that keeps its patch embedding as ``embeds``;
padding arrives at each layer as ``attn_mask``, which capture records and the loss leaves out."""

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
