"""Teacher/student pairs across families at plan time: a pair whose tokens line up trains; a pair that cannot
be paired fails in `build_plan` with one message that names what differs and the nearest supported choice."""

from __future__ import annotations

import pytest
import timm
import torch
from families.cases import SMALL_KW as TINY, build, peaked
from helpers import script_module

from attnxfer.models.efficient import with_attention
from attnxfer.transfer import PlanError, TeacherStudent, build_plan


def _vit(seed: int = 5, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", **{**TINY, **kw})


def test_a_plain_vit_with_4_registers_learns_a_dinov3_teachers_maps():
    """DINOv3-style teacher (rope, class + 4 registers) into a plain ViT with 4 registers: distillation
    steps lower the student's per-layer CE to the teacher's maps."""
    teacher = peaked(build("dinov3")).eval()
    student = _vit(reg_tokens=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pair = TeacherStudent(teacher, student, mode="distill").train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ces = []
    for _ in range(4):
        out = pair(x)
        loss = out.terms["attn_ce/0"] + out.terms["attn_ce/1"]
        ces.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ces[-1] < ces[0] - 0.05


@pytest.mark.parametrize(
    ("case", "student", "mode", "message"),
    [
        (
            "grid",
            lambda: _vit(img_size=48),
            "distill",
            r"4x4 patches.*student 6x6.*model.kwargs: img_size=32, class_token=True, reg_tokens=4\.$",
        ),
        (
            "patch",
            lambda: _vit(patch_size=16),
            "distill",
            r"4x4 patches.*student 2x2.*model.kwargs: patch_size=8, class_token=True, reg_tokens=4\.$",
        ),
        ("prefix", lambda: _vit(), "distill", r"5 prefix.*student 4x4 \+ 1.*class_token=True, reg_tokens=4"),
        (
            "heads",
            lambda: _vit(reg_tokens=4, num_heads=4),
            "copy",
            r"needs equal head counts \(teacher 2, student 4\); set the student's num_heads=2",
        ),
        (
            "zoo heads",
            lambda: with_attention(_vit(reg_tokens=4, num_heads=1), "performer"),
            "distill",
            r"'performer' attention needs equal head counts \(teacher 2, student 1\); set the student's num_heads=2",
        ),
        (
            "no adapter",
            lambda: _with_foreign_attention(_vit(reg_tokens=4)),
            "distill",
            r"^student: blocks.1.attn is MultiheadAttention .*no adapter for it \(adapters: .*EvaAttention",
        ),
    ],
)
def test_a_pair_that_cannot_be_paired_fails_at_plan_time_with_one_message(case, student, mode, message):
    teacher = build("dinov3")
    with pytest.raises(PlanError, match=message) as err:
        build_plan(teacher, student(), mode)
    assert "\n" not in str(err.value)  # one message


def test_a_teacher_without_prefix_tokens_names_the_matching_student():
    """A teacher with average pooling and no class token, a ViT student with one: the message says
    class_token=False."""
    teacher = _vit(seed=1, class_token=False, global_pool="avg")
    with pytest.raises(
        PlanError, match=r"\+ 0 prefix.*student 4x4 \+ 1.*class_token=False, global_pool='avg'"
    ):
        build_plan(teacher, _vit(), "distill")
    build_plan(teacher, _vit(class_token=False, global_pool="avg"), "distill")


def test_shared_drop_path_across_unequal_depths_names_the_key_that_turns_it_off():
    with pytest.raises(PlanError, match=r"teacher 2, student 3\); set transfer.share_drop_path=false$"):
        build_plan(_vit(depth=2), _vit(depth=3), "distill", share_drop_path=True)


def _with_foreign_attention(model: torch.nn.Module) -> torch.nn.Module:
    model.blocks[1].attn = torch.nn.MultiheadAttention(32, 2)
    return model


@pytest.mark.parametrize("recipe", ["families/dinov3_vits16_to_vit_s", "convert/eva02_small_performer"])
def test_family_recipes_plan_with_their_real_teacher_architecture(recipe):
    """The family recipes validate and plan against their teacher's real architecture (built on the meta
    device, no weights): a plain ViT-S with 4 registers for DINOv3, a rope Performer student for EVA-02."""
    from attnxfer.apps.run.parts import build_student
    from attnxfer.config import load_config
    from attnxfer.models.efficient import build_efficient_student

    cfg = load_config(recipe)
    with script_module("family_coverage").on_meta():
        teacher = timm.create_model(cfg.teacher.spec.split(".")[0], pretrained=False)
        if recipe.startswith("convert/"):
            student = build_efficient_student(
                teacher, cfg.convert.attention, num_classes=1000, **cfg.convert.attention_kwargs
            )
            assert student.blocks[0].attn.rope_keeps_map_kind
        else:
            student = build_student(cfg, teacher, 1000, 3, cfg.data.img_size)
            assert type(student).__name__ == "VisionTransformer" and student.num_prefix_tokens == 5
    plan = build_plan(teacher, student, cfg.transfer.mode, weight=cfg.transfer.atd_weight)
    assert plan.tokens == teacher.num_prefix_tokens + 16 * 16
