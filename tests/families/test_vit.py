"""The ViT family's refusal: timm's differential attention (signed maps) is refused with why, at plan time."""

from __future__ import annotations

import pytest
import timm

from attnxfer.transfer import PlanError, build_plan


def test_differential_attention_is_refused_with_why():
    kw = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    teacher = timm.create_model("vit_tiny_patch16_224", attn_layer="diff", **kw)
    student = timm.create_model("vit_tiny_patch16_224", **kw)
    with pytest.raises(
        (TypeError, PlanError), match="blocks.0.attn is DiffAttention: differential attention"
    ):
        build_plan(teacher, student, "distill")
