"""Stage 1 of conversion against formulas written out by hand on a tiny teacher: the teacher's attention maps
and outputs computed from its qkv/proj weights on each block's input (caught by a plain forward pre-hook),
the per-layer loss of a hybrid student (softmax blocks left out), the output MSE added to the map loss, the
output loss of a map-less block, and what a hybrid's stage 1 leaves untouched."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import peaked_teacher

from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.stage1 import Stage1Objective, stage1_transfer
from attnxfer.transfer.conversion import build_conversion_plan

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def teacher():
    return peaked_teacher(depth=2, qkv_bias=True).eval().requires_grad_(False)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _block_inputs(teacher, x) -> list[torch.Tensor]:
    """What each of the teacher's attention modules received on ``x`` (its block's normed hidden state)."""
    seen: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _, a: seen.append(a[0])) for b in teacher.blocks]
    try:
        with torch.no_grad():
            teacher.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _softmax_by_hand(attn, x) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm softmax attention on ``x`` from its weights: its maps softmax(q kᵀ / √d) and its output."""
    B, N, C = x.shape
    H = attn.num_heads
    d = C // H
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    maps = (q @ k.transpose(-2, -1) / d**0.5).softmax(-1)
    out = (maps @ v).transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T + attn.proj.bias
    return maps, out


def test_the_by_hand_teacher_is_the_teacher(teacher):
    x = _image()
    for block, inp in zip(teacher.blocks, _block_inputs(teacher, x), strict=True):
        with torch.no_grad():
            torch.testing.assert_close(_softmax_by_hand(block.attn, inp)[1], block.attn(inp))


def test_a_hybrids_stage1_loss_is_the_efficient_blocks_map_ce_plus_the_weighted_output_mse(teacher):
    """[softmax, hedgehog] with convert.output_mse=0.5: block 0 is the teacher's own (no term), block 1's term
    is −Σ_j P_t log A_s averaged over (batch, head, query) plus 0.5 × mean((out_s − out_t)²), both on the
    teacher's input to block 1; its metric is the KL."""
    student = build_efficient_student(teacher, ["softmax", "hedgehog"])
    for p in student.blocks[1].attn.parameters():  # off the init, so nothing is special
        p.data.add_(0.05 * torch.randn_like(p))
    plan = build_conversion_plan(teacher, student, stage1_steps=1, stage1_batch_size=4, output_mse=0.5)
    assert [layer.loss for layer in plan.layers] == [None, "ce"]
    assert [layer.layer for layer in plan.active] == [1]
    x = _image()
    out = Stage1Objective(teacher, student, plan).loss(student, x)
    assert sorted(out.terms) == ["0", "total"] and sorted(out.logs) == ["metric/1"]

    inp = _block_inputs(teacher, x)[1]
    p_t, out_t = _softmax_by_hand(teacher.blocks[1].attn, inp)
    attn = student.blocks[1].attn
    q, k = attn.project(inp, "qk").values()
    a_s = attn.attention_map(q, k)
    ce = -(p_t * a_s.log()).sum(-1).mean()
    kl = (p_t * (p_t.log() - a_s.log())).sum(-1).mean()
    mse = (attn(inp) - out_t).pow(2).mean()
    torch.testing.assert_close(out.terms["0"], ce + 0.5 * mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total, out.terms["0"])
    # the metric is the maps' agreement alone, without the output term
    torch.testing.assert_close(out.logs["metric/1"], kl.detach(), rtol=1e-4, atol=1e-6)


def test_a_mapless_blocks_stage1_loss_is_the_mse_of_its_output_against_the_teachers(teacher):
    """Hydra has no map: its block's stage-1 loss is mean((hydra(x_t) − softmax_t(x_t))²) on the teacher's input."""
    student = build_efficient_student(teacher, ["hydra", "softmax"])
    plan = build_conversion_plan(teacher, student, stage1_steps=1, stage1_batch_size=4, stage1_train="qk")
    assert [layer.loss for layer in plan.layers] == ["output", None]
    x = _image(1)
    out = Stage1Objective(teacher, student, plan).loss(student, x)
    inp = _block_inputs(teacher, x)[0]
    _, out_t = _softmax_by_hand(teacher.blocks[0].attn, inp)
    mse = (student.blocks[0].attn(inp) - out_t).pow(2).mean()
    torch.testing.assert_close(out.terms["0"], mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.logs["metric/0"], mse.detach(), rtol=1e-5, atol=1e-7)


def test_a_hybrids_stage1_moves_only_the_efficient_blocks_qk_rows_and_new_parameters(teacher):
    """new+qk on [softmax, hedgehog]: the softmax block stays the teacher's to the bit, and so do every v row,
    projection, norm, MLP and the head; only block 1's q/k rows and feature maps move; the teacher is unchanged."""
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_efficient_student(teacher, ["softmax", "hedgehog"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plan = build_conversion_plan(
        teacher, student, stage1_steps=3, stage1_batch_size=4, stage1_train="new+qk", stage1_lr=1e-2
    )
    stage1_transfer(teacher, student, plan, itertools.cycle([_image(2)]))
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.feature_map_q.weight",
        "blocks.1.attn.feature_map_q.bias",
        "blocks.1.attn.feature_map_k.weight",
        "blocks.1.attn.feature_map_k.bias",
    }
    rows = 2 * teacher.embed_dim  # q and k rows of the fused qkv come first; v rows must not move
    for name in ("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias"):
        assert torch.equal(before[name][rows:], after[name][rows:])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items() if k.startswith("blocks.0."))


@pytest.mark.slow
def test_stage_2_starts_from_the_weights_stage_1_saved_not_the_swapped_teacher(tmp_path, tiny_teacher_dir):
    """Stage 2 at a learning rate too small to move a weight visibly: its checkpoint is stage 1's student (to
    1e-6), which stage 1 moved far from the freshly swapped one."""
    from helpers import tiny_convert_report, tiny_run
    from safetensors.torch import load_file

    from attnxfer import load_teacher
    from attnxfer.launch.cli import main

    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        *tiny_run(32, 16),
        "convert.attention=hedgehog",
        "convert.stage1_train=new+qk",
        "convert.stage1_steps=4",
        "schedule.epochs=1",
        "schedule.max_steps=2",
        "schedule.warmup_epochs=0",
        "optim.lr=1.0e-12",
        "optim.min_lr=1.0e-12",
        "optim.weight_decay=0.0",
        *tiny_convert_report(1, 2),
    ]
    assert main(["convert", *args]) == 0
    (stage1,) = (run / "stage1" / "checkpoints").glob("step-*")
    stage2 = sorted((run / "stage2" / "checkpoints").glob("step-*"))[-1]
    after1 = load_file(str(stage1 / "model.safetensors"))
    after2 = load_file(str(stage2 / "model.safetensors"))
    teacher, _ = load_teacher(f"local-dir:{tiny_teacher_dir}")
    swapped = build_efficient_student(teacher, "hedgehog", num_classes=teacher.num_classes).state_dict()
    assert after1.keys() == after2.keys() == swapped.keys()
    moved = max((after1[k] - swapped[k]).abs().max().item() for k in swapped if "feature_map" not in k)
    assert moved > 1e-3  # stage 1 moved the q/k rows away from the teacher's
    for k in after1:
        torch.testing.assert_close(after2[k], after1[k], rtol=0, atol=1e-6)
