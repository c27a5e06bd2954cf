"""The Qwen3-ViT family: timm's ``AttentionRope`` (the EVA family's adapter and rope slot) under
``encoder.blocks``, a 2-D rope passed per call."""

from __future__ import annotations

import torch.nn as nn

from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of


def qwen3_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """Whole patches; with its projector (``merger``), a patch grid of whole merge cells (2x2 patches)."""
    encoder = getattr(model, "encoder", model)
    patch = [int(p) for p in encoder.patch_embed.patch_size]
    if getattr(encoder, "merger", None) is None:
        return tilings_of(patch, what=f"{patch[0]} px patches")
    k = int(encoder.merge_size)
    return tilings_of([p * k for p in patch], what=f"{patch[0]} px patches in {k}x{k} merge cells")


FAMILY = register_family(
    Family(
        name="qwen3_vit",
        title="Qwen3-ViT",
        patch_embedding="encoder.patch_embed",
        rope=True,
        modules=(ModuleCoverage("qwen3_vit", 9, 9, 9, ("inspect", "convert", "export")),),
        sizes=ImageSizes(
            tilings=qwen3_tilings, how="its position embedding resampled per input and the rope grid per call"
        ),
    )
)
