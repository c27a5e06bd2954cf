"""Stage 1 on PVTv2 teachers with spatial reduction: a student over all N tokens of a stage is
compared with a teacher whose keys are N_k reduced tokens by pooling the student's map rows onto the teacher's
keys (its mass on each sr×sr block, or on each of the linear variant's 7×7 adaptive bins).

References: the teacher's maps from timm's own module (fused attention off, captured at ``attn_drop``), the
blocks from timm's own reduction modules (which tokens each reduced key depends on, by autograd), the student's
maps written out from their definitions and materialised, pooled with reshape/einsum."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from attnxfer.models.attention import attention_layers
from attnxfer.models.attention.key_pooling import KeyPooling
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.stage1 import stage1_transfer, teacher_signals
from attnxfer.transfer.conversion import build_conversion_plan
from attnxfer.transfer.map_losses import LayerLogits, agreement, map_distillation_loss

IMG = 36  # stage grids 9x9 and 5x5: not divisible by the reductions 4 and 2 (timm's conv floors them)


def _pvt(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(
        embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1)
    )
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=5, **{**args, **kw})
    attention_layers(model)  # its attentions become the PVTv2 adapter in place (timm's forward unchanged)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teachers():
    return {"sr": _pvt(), "linear": _pvt(linear=True)}


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _timm_maps(teacher, x) -> dict[int, torch.Tensor]:
    """Every layer's softmax map as timm's own module computes it (unfused), captured at ``attn_drop``."""
    maps, hooks = {}, []
    for i, blk in enumerate(b for stage in teacher.stages for b in stage.blocks):
        blk.attn.fused_attn = False
        hooks.append(
            blk.attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: maps.__setitem__(i, out))
        )
    try:
        teacher.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        for blk in (b for stage in teacher.stages for b in stage.blocks):
            blk.attn.fused_attn = True
    return maps


def _support(attn, grid: tuple[int, int]) -> torch.Tensor:
    """(N_k, N) 0/1: which tokens each reduced key of timm's module depends on (autograd through its ``pool``
    and ``sr`` conv; the LayerNorm after them acts per token)."""
    tokens = torch.randn(1, attn.dim, *grid, requires_grad=True)
    x = attn.pool(tokens) if attn.pool is not None else tokens
    keys = attn.sr(x).flatten(2)  # (1, C, N_k)
    rows = []
    for b in range(keys.shape[-1]):  # one backward pass per reduced key: which tokens reach it
        (g,) = torch.autograd.grad(keys[..., b].sum(), tokens, retain_graph=True)
        rows.append((g.abs().sum(dim=(0, 1)).flatten() > 0).double())
    return torch.stack(rows)  # (N_k, N)


def _reference_weights(kind: str, grid, support: torch.Tensor) -> torch.Tensor:
    """(N_k, N) pooling weights from the support: blocks keep weight 1; a token in several adaptive bins is
    shared equally between them."""
    return support if kind == "sr" else support / support.sum(0, keepdim=True)


@pytest.mark.parametrize("kind", ["sr", "linear"])
def test_key_pooling_covers_the_tokens_timms_reduction_merges(kind, teachers):
    attn = teachers[kind].stages[0].blocks[0].attn
    for grid in [(9, 9), (8, 7)] if kind == "sr" else [(9, 8)]:  # 9 -> 7 bins overlap, 8 -> 7 too
        pooling = attn.key_pooling(list(grid))
        support = _support(attn, grid)
        wh, ww = pooling.weights(torch.zeros((), dtype=torch.float64))
        weights = torch.einsum("ah,bw->abhw", wh, ww).reshape(pooling.num_keys, -1)
        assert torch.equal(weights > 0, support > 0)
        torch.testing.assert_close(weights, _reference_weights(kind, grid, support))
    if kind == "sr":  # 9x9 tokens, 4x4 blocks: the last row and column are in no block (timm's floor)
        p = KeyPooling.strided((9, 9), 4)
        assert p.num_keys == 4 and p.pool(torch.ones(81)).sum() == 64
        owner = p.key_of_token().reshape(9, 9)
        assert owner[0, 0] == 0 and owner[3, 4] == 1 and owner[8, 8] == 3  # the remainder: nearest block


def _relu_linear_map(q, k):
    a = (F.relu(q) + 1e-6) @ (F.relu(k) + 1e-6).transpose(-1, -2)
    return a / a.sum(-1, keepdim=True)


def _softmax_map(q, k):
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


MAPS = {"relu_linear": _relu_linear_map, "softmax": _softmax_map}


@pytest.mark.parametrize(
    ("kind", "student", "loss"),
    [
        ("sr", "relu_linear", "ce"),
        ("sr", "softmax", "ce"),
        ("sr", "relu_linear", "mse"),
        ("linear", "relu_linear", "ce"),
        ("sr", "nystrom", "mse"),
    ],
)
def test_pooled_map_loss_is_the_loss_of_the_materialised_pooled_map(kind, student, loss, teachers, images):
    teacher = teachers[kind]
    layers = [0, 1] if student in MAPS else [0]  # a signed map through its own rows: one layer is enough
    signals = teacher_signals(teacher, images, layers, ("input", "q", "k"))
    maps = _timm_maps(teacher, images)
    model = build_efficient_student(teacher, student)
    attns = [b.attn for stage in model.stages for b in stage.blocks]
    for i, grid in zip(layers, [(9, 9), (5, 5)]):
        sig = signals[i]
        p_t = maps[i]
        assert p_t.shape[-2:] == (grid[0] * grid[1], sig["k"].shape[-2])
        own = attns[i].project(sig["input"], "qk")
        q = own["q"].detach().requires_grad_(True)
        k = own["k"].detach().requires_grad_(True)
        pooled_keys = LayerLogits(sig["q"], sig["k"], key_pooling=sig["key_pooling"])
        res = map_distillation_loss(attns[i], LayerLogits(q, k), pooled_keys, loss)
        grads = torch.autograd.grad(res.total, (q, k))

        q_r = q.detach().requires_grad_(True)
        k_r = k.detach().requires_grad_(True)
        if student in MAPS:
            a = MAPS[student](q_r, k_r)  # (B, H, N, N), written out
        else:  # any other map: its own materialised rows (pooling and loss are what is checked here)
            a = attns[i].attention_map(q_r, k_r)
        support = _support(teacher.stages[i].blocks[0].attn, grid).float()
        pooled = a @ _reference_weights(kind, grid, support).T  # (B, H, N, N_k)
        if loss == "ce":
            ref = -(p_t * pooled.log()).sum(-1).mean()
            kl = ref - (-(p_t * p_t.log()).sum(-1).mean())
            torch.testing.assert_close(agreement(res), kl.detach(), rtol=1e-4, atol=1e-6)
        else:
            ref = (pooled - p_t).pow(2).mean()
        torch.testing.assert_close(res.total, ref, rtol=1e-5, atol=1e-7)
        for got, want in zip(grads, torch.autograd.grad(ref, (q_r, k_r))):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_stage1_on_reduced_keys_lowers_the_loss(teachers):
    teacher = teachers["sr"]
    student = build_efficient_student(teacher, ["relu_linear", "hashing", "none", "none"])
    plan = build_conversion_plan(teacher, student, stage1_steps=6, stage1_lr=5e-3, stage1_train="qk")
    assert [layer.teacher_keys for layer in plan.active] == ["4x4 blocks", "2x2 blocks"]
    assert "on the teacher's keys (4x4 blocks of tokens)" in plan.describe()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def batches():
        while True:
            yield x

    result = stage1_transfer(teacher, student, plan, batches(), log_every=6)
    first, last = result.history[0], result.history[-1]
    assert last["metric/0"] < first["metric/0"]  # the pooled KL of the relu_linear layer fell
    assert all(torch.isfinite(torch.tensor(v)) for rec in result.history for v in rec.values())


def test_search_fitness_on_reduced_keys_is_the_pooled_kl_of_the_fitted_map(teachers, images):
    from attnxfer.search.fitness import FitSettings, cache_teacher, fit_student, held_out_kl

    teacher = teachers["sr"]
    cache = cache_teacher(teacher, [images], [images], [0, 1])
    student = fit_student(teacher, "relu_linear", cache, FitSettings(steps=1))
    fitness = held_out_kl(teacher, student, cache)  # fit_candidate's "kl_per_layer"; was a shape error
    attns = [b.attn for stage in student.stages for b in stage.blocks]
    maps = _timm_maps(teacher, images)
    for i, grid in zip([0, 1], [(9, 9), (5, 5)]):
        with torch.no_grad():
            own = attns[i].project(cache.held_out[0][i]["input"], "qk")
        a = _relu_linear_map(own["q"], own["k"])  # (B, H, N, N), written out
        support = _support(teacher.stages[i].blocks[0].attn, grid).float()
        pooled = a @ support.T  # its mass on each sr x sr block of the teacher's keys
        p_t = maps[i]
        kl = (p_t * (p_t.log() - pooled.log())).sum(-1).mean()
        assert fitness[i] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("side", [32, 64])
def test_the_layers_whose_queries_meet_one_key_at_a_size_are_the_ones_timm_gives_one_key(side):
    """At 32 px PVTv2's reductions (8, 4, 2) and its last 1x1 stage leave each query one key: a map of ones, whose
    distillation teaches nothing (the run warns of them); at 64 px every layer has four."""
    from attnxfer.apps.run.training import single_key_layers
    from attnxfer.transfer.plan import build_plan

    teacher = _pvt(sr_ratios=(8, 4, 2, 1))
    maps = _timm_maps(teacher, torch.randn(1, 3, side, side))
    plan = build_plan(teacher, _pvt(sr_ratios=(8, 4, 2, 1)), "distill")
    assert single_key_layers(teacher, plan, side) == [i for i, m in sorted(maps.items()) if m.shape[-1] == 1]
    assert bool(single_key_layers(teacher, plan, side)) == (side == 32)
