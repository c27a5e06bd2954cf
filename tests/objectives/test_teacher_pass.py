"""One teacher pass for several pairs: each `TeacherStudent` says what it needs of its teacher, the needs of
pairs that share one teacher unite, the teacher runs once for the union, and each pair's step on that
hand-over is its step alone, bit for bit (fp32 on CPU): logits, loss, every term and every gradient, for
copy, softmax and zoo map distillation, q/k/v MSE, feature and logit distillation."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import peaked_teacher, tiny_vit

from attnxfer.models import Chunks, Signal
from attnxfer.models.efficient import build_efficient_student
from attnxfer.transfer import TeacherNeeds, TeacherStudent, build_plan

#: pairs of different plans on one teacher (depth 4): (student, mode, plan settings)
PLANS = {
    "copy": (lambda t: tiny_vit(depth=4, seed=2), "copy", dict(end_layer=-2)),
    "distill+logits": (
        lambda t: tiny_vit(depth=4, seed=3),
        "distill",
        dict(layers=[0, 2], logit_weight=0.5, logit_temperature=2.0),
    ),
    "zoo+features": (
        lambda t: build_efficient_student(t, "relu_linear"),
        "distill",
        dict(feature_weight=0.3),
    ),
    "distill_v": (lambda t: tiny_vit(depth=4, seed=4), "distill_v", dict(layers=[1])),
}


def _pairs(teacher: torch.nn.Module, *names: str) -> dict[str, TeacherStudent]:
    """The pairs ``names`` of `PLANS` (all by default), sharing the teacher object."""
    out = {}
    for name in names or PLANS:
        build, mode, settings = PLANS[name]
        student = build(teacher)
        out[name] = TeacherStudent(teacher, student, build_plan(teacher, student, mode, **settings)).train()
    return out


def _step(pair: TeacherStudent, x: torch.Tensor, handover=None):
    """(logits, loss, terms, logs, gradients) of one step; the student is the same before and after."""
    torch.manual_seed(0)
    out = pair(x, handover)
    objective = out.logits.square().mean() + (out.loss if out.loss is not None else 0)
    params = [p for p in pair.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    return out.logits.detach(), objective.detach(), out.terms, out.logs, grads


def _assert_identical(got, want) -> None:
    for a, b in zip(got[:2], want[:2]):
        assert torch.equal(a, b)
    for got_dict, want_dict in zip(got[2:4], want[2:4]):
        assert got_dict.keys() == want_dict.keys()
        for key in want_dict:
            assert torch.equal(got_dict[key], want_dict[key]), key
    assert sum(g is not None for g in want[4]) > 0
    for a, b in zip(got[4], want[4]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_one_teacher_pass_for_several_pairs_gives_each_pair_its_own_step():
    teacher = peaked_teacher(depth=4)
    pairs = _pairs(teacher)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    needs = {name: p.teacher_needs() for name, p in pairs.items()}
    assert needs["copy"] == TeacherNeeds({0: Chunks("qk"), 1: Chunks("qk")})
    assert needs["distill+logits"].signals == {Signal.LOGITS} and set(needs["distill+logits"].layers) == {
        0,
        2,
    }
    assert needs["distill_v"].layers == {1: Chunks("v")} and needs["distill_v"].stops
    union = needs["copy"].union(*(n for k, n in needs.items() if k != "copy"))
    assert union.layers == {0: Chunks("qk"), 1: Chunks("qkv"), 2: Chunks("qk"), 3: Chunks("qk")}
    assert union.signals == {Signal.LOGITS, Signal.FEATURES} and not union.stops

    calls = []
    teacher.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    handover = pairs["copy"].teacher_pass(x, union)
    assert len(calls) == 1
    shared = {name: _step(pair, x, handover) for name, pair in pairs.items()}
    assert len(calls) == 1  # the pairs took the hand-over: the teacher did not run again
    for name, pair in pairs.items():
        _assert_identical(shared[name], _step(pair, x))
    assert {"attn_ce/0", "attn_ce/2", "logit_kd"} <= set(shared["distill+logits"][2])
    assert {"attn_ce/3", "feat_cos"} <= set(shared["zoo+features"][2]) and "mse_v/1" in shared["distill_v"][2]


def test_a_pass_that_stops_early_serves_pairs_that_stop_earlier():
    """Copy of layers 0-1 and v MSE at layer 1: the union stops after teacher layer 1; in eval the copy pair
    needs its borrowed layers only and still takes the hand-over."""
    teacher = peaked_teacher(depth=4)
    pairs = _pairs(teacher, "copy", "distill_v")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    union = pairs["copy"].teacher_needs().union(pairs["distill_v"].teacher_needs())
    assert union.stops and union.last_layer == 1
    handover = pairs["copy"].teacher_pass(x, union)
    for name in ("copy", "distill_v"):
        _assert_identical(_step(pairs[name], x, handover), _step(pairs[name], x))
    pair = pairs["copy"].eval()
    with torch.no_grad():
        assert torch.equal(pair(x, handover).logits, pair(x).logits)


def test_a_hand_over_that_lacks_what_a_pair_needs_is_refused_naming_it():
    teacher = peaked_teacher(depth=4)
    pairs = _pairs(teacher, "copy", "distill+logits")
    x = torch.randn(2, 3, 32, 32)
    copy_only = pairs["copy"].teacher_pass(x)
    with pytest.raises(
        ValueError, match=r"lacks what this pair needs: teacher layer 2: qk; the teacher's logits"
    ):
        pairs["distill+logits"](x, copy_only)
    with pytest.raises(ValueError, match="a batch of 2 .* this pair runs a batch of 3"):
        pairs["copy"](torch.randn(3, 3, 32, 32), copy_only)
    other = TeacherStudent(peaked_teacher(depth=4), tiny_vit(depth=4), mode="copy").train()
    with pytest.raises(ValueError, match="another teacher's pass"):
        other(x, copy_only)


def test_a_pair_whose_teacher_takes_its_drop_path_masks_owns_its_pass():
    """Shared drop path with a student that drops paths, in training: the teacher's pass is the pair's own
    (a study refuses it); without drop path, or at eval, the pass can be shared."""
    teacher = peaked_teacher(depth=2)
    student = tiny_vit(depth=2, seed=2)
    for blk in student.blocks:
        blk.drop_path1 = blk.drop_path2 = timm.layers.DropPath(0.2)
    plan = build_plan(teacher, student, "distill", share_drop_path=True)
    pair = TeacherStudent(teacher, student, plan).train()
    x = torch.randn(2, 3, 32, 32)
    assert pair.owns_teacher_pass
    with pytest.raises(ValueError, match="teacher pass is its own: call it without a hand-over"):
        pair(x, pair.teacher_pass(x))
    assert not pair.eval().owns_teacher_pass
    still = tiny_vit(depth=2, seed=2)
    shareable = TeacherStudent(
        teacher, still, build_plan(teacher, still, "distill", share_drop_path=True)
    ).train()
    assert not shareable.owns_teacher_pass
    _assert_identical(_step(shareable, x, shareable.teacher_pass(x)), _step(copy.deepcopy(shareable), x))


def test_needs_say_what_they_hold():
    needs = TeacherNeeds({2: "qk", 0: Chunks("v")}, frozenset({"logits"}))
    assert list(needs.layers) == [0, 2]
    assert (
        not needs.stops and TeacherNeeds({1: "q"}).stops and not TeacherNeeds({1: "q"}, may_stop=False).stops
    )
    assert (
        TeacherNeeds().empty and TeacherNeeds({1: "q"}).union(TeacherNeeds(may_stop=False)).may_stop is False
    )
    assert needs.missing(TeacherNeeds({2: "q"})) == [
        "teacher layer 0: v",
        "teacher layer 2: k",
        "the teacher's logits",
    ]
    with pytest.raises(ValueError, match="whole-model signals"):
        TeacherNeeds(signals=frozenset({Signal.MAPS}))
