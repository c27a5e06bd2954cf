"""The Qwen3-ViT family (``qwen3_vit``, the Qwen3-VL vision encoder): timm's ``AttentionRope`` (its adapter
and rope conversion slot are the EVA family's, `attnxfer.models.attention.families.eva`) in blocks under
``encoder.blocks``, the patch embedding under ``encoder.patch_embed``, a 2-D rope passed per call.
"""

from __future__ import annotations

from ..family import Family, ModuleCoverage, register_family

__all__ = ["FAMILY"]

FAMILY = register_family(
    Family(
        name="qwen3_vit",
        title="Qwen3-ViT",
        patch_embedding="encoder.patch_embed",
        rope=True,
        modules=(ModuleCoverage("qwen3_vit", 9, 9, 9, ("inspect", "convert", "export")),),
    )
)
