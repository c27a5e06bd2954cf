"""The transfer plan says which loss each distilled layer really gets (read from the map-loss table by the
student layer's map kind), and a student that keys every token distils from a PVTv2 teacher's reduced keys
with the pooled loss stage 1 uses: `attnxfer convert` on a PVTv2 teacher runs with its default stage 2.

References: the teacher's maps from timm's own module (fused attention off, captured at ``attn_drop``), the
student's relu-linear map written out from its definition, pooled block by block with reshape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import run_cli, tiny_convert_report, tiny_run, tiny_vit
from timm.models import save_for_hf

from attnxfer.config import load_config
from attnxfer.models.attention import attention_layers
from attnxfer.models.efficient import build_efficient_student
from attnxfer.transfer import TeacherStudent
from attnxfer.transfer.plan import PlanError, build_plan


def test_each_distilled_layers_plan_line_names_its_own_loss():
    teacher = tiny_vit(depth=2, seed=1)
    softmax = build_plan(teacher, tiny_vit(depth=2, seed=2), "distill").describe()
    assert "loss, layers 0-1: softmax: CE between teacher and student attention rows" in softmax
    nystrom = build_efficient_student(teacher, "nystrom", num_landmarks=4)
    said = build_plan(teacher, nystrom, "distill").describe()
    assert (
        "loss, layers 0-1: nystrom: MSE between the teacher's attention map and the student's signed map"
        in said
    )
    assert "CE" not in said  # neither the mode's line nor a layer's claims a cross-entropy
    mixed = build_efficient_student(teacher, ["performer", "linformer"], proj_len=8)
    lines = build_plan(teacher, mixed, "distill").describe().splitlines()
    assert [line.split(": ")[1] for line in lines if line.startswith("  loss, layer ")] == [
        "performer",
        "linformer",
    ]
    assert "CE between" in lines[-2] and "MSE between" in lines[-1]


def test_mode_none_with_a_map_comparison_is_not_described_as_no_attention_transfer():
    """transfer.losses moves attention where the mode moves none: the plan's first line said "mode=none (no
    attention transfer)" right above the map comparison it prints; with logit distillation alone it still does."""
    teacher, student = tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2)
    maps = build_plan(teacher, student, "none", losses=[{"name": "map"}]).describe().splitlines()
    assert (
        maps[0] == "transfer plan: mode=none (the mode itself moves no attention; the comparisons below do)"
    )
    logits = build_plan(teacher, student, "none", logit_weight=1.0).describe().splitlines()
    assert logits[0] == "transfer plan: mode=none (no attention transfer)"


def test_plan_loss_lines_name_only_the_distilled_layers_when_they_are_not_consecutive():
    teacher = tiny_vit(depth=4, seed=1)
    said = build_plan(teacher, tiny_vit(depth=4, seed=2), "distill", layers=[0, -1]).describe()
    assert "loss, layers 0-3" not in said  # layers 1 and 2 are not distilled
    assert "loss, layer 0: softmax: CE" in said and "loss, layer 3: softmax: CE" in said
    one = build_plan(teacher, tiny_vit(depth=4, seed=2), "distill", layers=[1]).describe()
    assert "  layers 1 of 4 (same teacher layers)" in one  # one layer is not a span "1-1"


def _pvt(sr_ratios=(4, 2, 1, 1)) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), sr_ratios=sr_ratios)
    return timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5, **args).eval()


def test_plan_says_in_which_stages_a_students_fewer_heads_average_the_teachers_maps():
    torch.manual_seed(0)
    args = dict(
        embed_dims=(16, 32, 48, 64), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1), sr_ratios=(1, 1, 1, 1)
    )
    student = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5, **args)
    lines = build_plan(_pvt((1, 1, 1, 1)), student, "distill").describe().splitlines()
    said = [line for line in lines if line.startswith("  loss, layer")]  # teacher heads 1, 2, 3, 4
    assert "averaged" not in said[0] and [line.split("groups of ")[-1] for line in said[1:]] == [
        "2 heads",
        "3 heads",
        "4 heads",
    ]


def _timm_maps(teacher: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    maps, hooks = [], []
    blocks = [b for stage in teacher.stages for b in stage.blocks]
    for blk in blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out)))
    try:
        with torch.no_grad():
            teacher.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        for blk in blocks:
            blk.attn.fused_attn = True
    return maps


def _relu_linear_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    a = (F.relu(q) + 1e-6) @ (F.relu(k) + 1e-6).transpose(-1, -2)
    return a / a.sum(-1, keepdim=True)


def _block_sums(rows: torch.Tensor, grid: int, sr: int) -> torch.Tensor:
    """(..., grid²) rows -> (..., (grid/sr)²): each row's mass on each sr×sr block of tokens, row-major."""
    g = rows.reshape(*rows.shape[:-1], grid // sr, sr, grid // sr, sr)
    return g.sum(dim=(-3, -1)).flatten(-2)


def test_a_zoo_student_distils_a_pvt_v2_teacher_over_its_reduced_keys():
    """Stage 2's attention distillation on a PVTv2 teacher (sr 4, 2, 1, 1 at 32 px: 8x8, 4x4, 2x2, 1x1 tokens):
    each layer's CE is the cross-entropy of timm's teacher map and the student's map pooled onto the
    teacher's keys, and the plan says so."""
    teacher = _pvt()
    student = build_efficient_student(teacher, "relu_linear")
    plan = build_plan(teacher, student, "distill")  # refused before: "partitions its tokens differently"
    said = plan.describe()
    assert "loss, layer 0: relu_linear: CE between the teacher's attention rows" in said
    assert "pooled onto the teacher's reduced keys (4x4 blocks of tokens)" in said
    assert "loss, layer 1:" in said and "(2x2 blocks of tokens)" in said
    assert (
        "loss, layers 2-3: relu_linear: CE between the teacher's attention rows and the rows of the " in said
    )

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, (_, attn) in enumerate(attention_layers(student))
    ]
    try:
        out = TeacherStudent(teacher, student, plan).train()(x)
    finally:
        for h in hooks:
            h.remove()
    maps = _timm_maps(teacher, x)
    for i, ((_, attn), grid, sr) in enumerate(zip(attention_layers(student), (8, 4, 2, 1), (4, 2, 1, 1))):
        with torch.no_grad():
            own = attn.project(inputs[i], "qk")
            a_s = _relu_linear_map(own["q"], own["k"])  # (B, H, N, N)
        pooled = _block_sums(a_s, grid, sr) if sr > 1 else a_s
        p_t = maps[i]
        assert p_t.shape == pooled.shape
        ce = -(p_t * pooled.log()).sum(-1).mean()
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].detach(), ce, rtol=1e-4, atol=1e-6)


def test_a_student_with_its_own_partition_is_still_refused_with_advice_it_can_follow():
    teacher = _pvt()
    other = _pvt(sr_ratios=(2, 2, 1, 1))
    with pytest.raises(
        PlanError, match=r"sr_ratio teacher 4, student 2.*build the student with the teacher's sr_ratio"
    ):
        build_plan(teacher, other, "distill")
    with pytest.raises(PlanError, match="leave the layer out of transfer.layers"):  # no pooling without maps
        build_plan(teacher, build_efficient_student(teacher, "relu_linear"), "distill_q")


def test_an_attention_free_layer_of_a_pvt_v2_student_is_refused_for_having_no_map_not_for_its_keys():
    """`none`/`hydra` stages under stage 2's default distillation: the refusal was about token partitions
    ("linear teacher False, student none; sr_ratio teacher 4, student none"), not the map the layer lacks."""
    teacher = _pvt()
    for name in ("none", "hydra"):
        student = build_efficient_student(teacher, [name, name, "relu_linear", "relu_linear"])
        with pytest.raises(PlanError, match=f"{name}' attention has no attention map to distil") as e:
            build_plan(teacher, student, "distill")
        assert "partitions its tokens" not in str(e.value) and "transfer.mode=none" in str(e.value)


@pytest.fixture(scope="module")
def pvt_teacher_dir(tmp_path_factory) -> Path:
    """`pvt_v2_b0` as timm builds it (sr_ratio 8, 4, 2, 1, like every pretrained PVTv2), its input at 64 px,
    saved with timm's save_for_hf."""
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64)}
    folder = tmp_path_factory.mktemp("pvt-teacher")
    save_for_hf(model, folder, safe_serialization=True)
    return folder


@pytest.mark.slow
def test_convert_on_a_pvt_v2_teacher_runs_with_the_default_stage_2(pvt_teacher_dir, tmp_path, capsys):
    """`attnxfer convert teacher.spec=local-dir:PVT convert.attention=relu_linear convert.stage1_train=qk`:
    stage 2 (transfer.mode=distill, the default) distils every layer, the first six over the teacher's
    reduced keys; its logged CE of layer 0 is over the 2x2 = 4 keys of the teacher's 8x8 blocks."""
    run = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "convert",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{pvt_teacher_dir}",
        "convert.attention=relu_linear",
        "convert.stage1_train=qk",
        "convert.stage1_steps=1",
        *tiny_convert_report(1, 2),
        *tiny_run(8, 4),
        "schedule.max_steps=1",
        "log.every_steps=1",
    )
    assert code == 0, out[-3000:]
    assert "(8x8 blocks of tokens)" in out and "loss, layers 6-7: relu_linear: CE between" in out
    record = json.loads((run / "stage2" / "metrics.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(record[f"attn_ce/{i}"]) and record[f"attn_kl/{i}"] >= 0 for i in range(8))


def test_transfer_layers_count_from_the_end_as_the_plans_refusal_advises():
    """A layer outside the student is refused with 'valid: 0..n-1 or -n..-1': the config takes the negative
    spelling too, and -1 is the student's last block."""
    cfg = load_config("demo/copy", ["transfer.layers=[-1,0]"])
    teacher, student = tiny_vit(depth=3, seed=1), tiny_vit(depth=3, seed=2)
    assert build_plan(teacher, student, "copy", layers=cfg.transfer.layers).student_layers == (0, 2)
    with pytest.raises(
        PlanError, match=r"layer 3 is outside the student's 3 blocks \(valid: 0..2 or -3..-1\)"
    ):
        build_plan(teacher, student, "copy", layers=[3])
