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


def test_a_saved_differential_attention_teacher_is_refused_with_why_not_as_weights_that_do_not_fit(tmp_path):
    """timm's vit_dwee_* builds DiffAttention itself: built as a teacher with attnxfer's attention, its lambda
    weights were unexpected keys, with a hint about fc_norm and average pooling."""
    from timm.models import save_for_hf

    from attnxfer import load_teacher
    from attnxfer.sources.load_errors import TeacherLoadError

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    save_for_hf(
        timm.create_model("vit_dwee_patch16_reg1_gap_256", **kw), tmp_path / "dwee", safe_serialization=True
    )
    with pytest.raises(
        TeacherLoadError, match="vit_dwee_patch16_reg1_gap_256's blocks are timm's DiffAttention: "
    ) as e:
        load_teacher(f"local-dir:{tmp_path / 'dwee'}")
    assert "fc_norm" not in str(e.value)
