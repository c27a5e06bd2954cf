"""Stage 1's loss meets the `Objective` protocol: `Stage1Objective` hands out the per-layer fit
losses (checked against explicit N x N maps), their sum, the agreement metrics, and a held-out score that
stage 1's fit lowers."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import peaked_teacher

from attnxfer.models import attention_maps, capture_attention
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.stage1 import Stage1Objective, stage1_transfer, teacher_signals
from attnxfer.transfer.conversion import build_conversion_plan

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def teacher():
    return peaked_teacher(depth=2, qkv_bias=True).eval().requires_grad_(False)


def _images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(n)]


def test_stage1_objective_terms_are_the_explicit_map_cross_entropies(teacher):
    student = build_efficient_student(teacher, "hedgehog")
    plan = build_conversion_plan(teacher, student, stage1_steps=1, stage1_batch_size=4)
    objective = Stage1Objective(teacher, student, plan)
    assert objective.module is student and objective.trained is student
    assert objective.ema_model(student) is student
    [x] = _images(1, seed=0)
    out = objective.loss(student, x, None, contextlib.nullcontext)
    assert sorted(out.terms) == ["0", "1", "total"] and sorted(out.logs) == ["metric/0", "metric/1"]
    p_t = attention_maps(teacher, x)
    for layer in range(2):
        with torch.no_grad(), capture_attention(teacher, [layer], ("input",)) as store:
            teacher.forward_features(x)
        attn = student.blocks[layer].attn
        q, k = attn.project(store[layer]["input"], "qk").values()
        a_s = attn.attention_map(q, k)
        ce = -(p_t[layer] * a_s.log()).sum(-1).mean()  # the paper's CE on explicit maps
        kl = (p_t[layer] * (p_t[layer].log() - a_s.log())).sum(-1).mean()
        torch.testing.assert_close(out.terms[str(layer)], ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logs[f"metric/{layer}"], kl.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.total, out.terms["0"] + out.terms["1"])
    assert out.total is out.terms["total"] and out.total.requires_grad
    # signals computed once (what `attnxfer search` hands stage 1) give the same loss as the images
    signals = teacher_signals(teacher, x, [0, 1], objective.fields)
    torch.testing.assert_close(objective.loss(student, signals).total, out.total)


def test_stage1_fit_lowers_the_objectives_held_out_score(teacher):
    student = build_efficient_student(teacher, "hedgehog")
    plan = build_conversion_plan(teacher, student, stage1_steps=20, stage1_lr=5e-2, stage1_batch_size=4)
    objective = Stage1Objective(teacher, student, plan)
    held_out = [(x, None) for x in _images(2, seed=1)]
    before = objective.evaluate(student, held_out)
    stage1_transfer(teacher, student, plan, itertools.cycle(_images(3, seed=0)))
    after = objective.evaluate(student, held_out)
    assert set(before) == {"loss"} and after["loss"] < before["loss"]
    with torch.no_grad():  # per image; batches of equal size: the mean of the batches' summed losses
        want = sum(float(objective.loss(student, x).total) for x, _ in held_out) / 2
    assert after["loss"] == pytest.approx(want, rel=1e-6)


def test_held_out_score_is_the_mean_per_image_whatever_the_batching(teacher):
    """Six images scored as batches of 4 and 2 or as one batch of 6: the same mean, the short batch weighed
    by its images (a mean of the batches' means would count its images twice as much); signals computed once
    score alike."""
    student = build_efficient_student(teacher, "hedgehog")
    plan = build_conversion_plan(teacher, student, stage1_steps=1, stage1_batch_size=4)
    objective = Stage1Objective(teacher, student, plan)
    x = torch.cat(_images(2, seed=3))[:6]
    whole = objective.evaluate(student, [(x, None)])["loss"]
    assert objective.evaluate(student, [(x[:4], None), (x[4:], None)])["loss"] == pytest.approx(
        whole, rel=1e-5
    )
    signals = [teacher_signals(teacher, part, [0, 1], objective.fields) for part in (x[:4], x[4:])]
    assert objective.evaluate(student, signals)["loss"] == pytest.approx(whole, rel=1e-5)
