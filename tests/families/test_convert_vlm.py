"""`convert` of NaFlexViT, Qwen3-ViT and Gemma4-ViT teachers, from first principles.

A zoo attention that is exactly softmax over all tokens (``window`` with one window covering the 4x4 grid)
built from the teacher's weights must reproduce the teacher's logits: only possible if it takes q, k and v
exactly as timm's own module computes them (projections, norms, rope on the patch tokens, prefix tokens
left alone) and the student's blocks are the teacher's (NaFlexViT's ``blocks``, Qwen3-ViT's
``encoder.blocks``). Stage 1 then lowers its fit loss on the teacher's signals.
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from helpers import fast_cells

from attnxfer.models import student_from_spec, student_spec
from attnxfer.models.efficient import WindowAttention, build_efficient_student, new_parameters
from attnxfer.models.efficient.swap import flat_blocks
from attnxfer.train.measure import map_agreement
from attnxfer.train.stage1 import stage1_transfer, teacher_signals
from attnxfer.transfer import TeacherStudent
from attnxfer.transfer.conversion import build_conversion_plan, layer_fit_loss

from .cases import TINY, TinyFamily
from .oracles import map_ce, oracle_maps

#: gemma4_gqa: one k/v head for two q heads, head_dim 8 (the scale fold d^1/4 is not a power of two)
GQA = TinyFamily("gemma4_vit_167m", dict(TINY["gemma4"].kwargs, head_dim=8, num_kv_heads=1))
FAMILIES = {**TINY, "gemma4_gqa": GQA}
CONVERTS = ["naflex", "qwen3", "gemma4", "gemma4_gqa"]


def _no_rope(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a Qwen3-ViT or Gemma4-ViT whose blocks get no rotation (so a test can show the rope matters)."""
    out = copy.deepcopy(model)
    if hasattr(out.encoder, "rotary_emb"):  # Gemma4: cos 1, sin 0 is the identity rotation
        rotary = out.encoder.rotary_emb.forward
        out.encoder.rotary_emb.forward = lambda *a: tuple(
            f(t) for f, t in zip((torch.ones_like, torch.zeros_like), rotary(*a))
        )
        return out
    del out.encoder.rope
    out.encoder.rope = types.SimpleNamespace(get_embed=lambda shape: None)
    return out


@pytest.mark.parametrize("family", fast_cells(CONVERTS, keep=["naflex", "qwen3", "gemma4_gqa"]))
def test_a_full_window_student_reproduces_the_teachers_logits(family):
    tiny = FAMILIES[family]
    teacher, x = tiny.build(), tiny.images()
    student = build_efficient_student(teacher, "window", window_size=4).eval()
    blocks = flat_blocks(student)
    assert all(isinstance(b.attn, WindowAttention) for b in blocks)
    prefix = {"naflex": 4}.get(family, 0)  # NaFlexViT's registers; the VLM encoders have none
    assert blocks[0].attn.num_prefix_tokens == prefix
    with torch.no_grad():
        expected = teacher(x)
        torch.testing.assert_close(student(x), expected, rtol=1e-5, atol=2e-5)
        # the attention matters to the logits, and a low-rank one with the same weights is not the teacher
        performer = build_efficient_student(teacher, "performer").eval()
        assert (performer(x) - expected).abs().max() > 1e-2
        if family != "naflex":  # the rope matters in this model: the student applies the teacher's
            assert (_no_rope(teacher)(x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", fast_cells(CONVERTS, keep=["naflex"]))
def test_stage_1_lowers_its_loss_on_the_teachers_signals(family):
    """A few stage-1 steps of a hedgehog student (new feature maps, everything else copied) on fixed teacher
    signals: the fit loss falls and only new parameters move."""
    tiny = FAMILIES[family]
    teacher = tiny.build()
    student = build_efficient_student(teacher, "hedgehog")
    signals = teacher_signals(teacher, tiny.images(4), [0, 1], ("input", "q", "k", "output"))
    plan = build_conversion_plan(teacher, student, stage1_steps=8, stage1_lr=3e-2, stage1_batch_size=4)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = stage1_transfer(teacher, student, plan, iter([signals] * 8))
    losses = [h["loss"] for h in res.history]
    assert res.steps == 8 and losses[-1] < losses[0], losses
    new = {n for n, _ in new_parameters(student)}
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= new


def test_stage_1_trains_the_q_and_k_projections_gemma4_keeps_separate():
    """``stage1_train=qk`` on a Gemma4-ViT student, whose layers keep the teacher's separate q_proj/k_proj (no
    fused qkv, which the plan used to read: an AttributeError): those projections and the q/k norms train,
    v and the output projection stay the teacher's, and the fit loss falls."""
    tiny = FAMILIES["gemma4"]
    teacher = tiny.build()
    student = build_efficient_student(teacher, "relu_linear")
    signals = teacher_signals(teacher, tiny.images(4), [0, 1], ("input", "q", "k"))
    plan = build_conversion_plan(
        teacher, student, stage1_steps=4, stage1_lr=3e-2, stage1_batch_size=4, stage1_train="qk"
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = stage1_transfer(teacher, student, plan, iter([signals] * 4))
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0], losses
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert {n.split(".attn.")[1].split(".")[0] for n in moved} == {"q_proj", "k_proj", "q_norm", "k_norm"}


@pytest.mark.parametrize("family", fast_cells(["gemma4", "gemma4_gqa"], keep=["gemma4"]))
def test_stage_1_compares_with_the_teachers_scale_1_rope_maps(family):
    """A full-window student is the teacher: stage 1's KL on the captured signals is zero only if the
    teacher's maps are built at Gemma4's scale 1 and the captured cos/sin reach the student."""
    tiny = FAMILIES[family]
    teacher = tiny.build()
    student = build_efficient_student(teacher, "window", window_size=4)
    plan = build_conversion_plan(teacher, student, stage1_steps=1, stage1_train="new")
    signals = teacher_signals(teacher, tiny.images(), [0, 1], ("input", "q", "k"))
    for layer in plan.active:
        attn, sig = flat_blocks(student)[layer.layer].attn, signals[layer.layer]
        assert float(layer_fit_loss(attn, layer, sig, 0.0)[1]) == pytest.approx(0.0, abs=1e-5)
        without = {k: v for k, v in sig.items() if k != "rope"}
        assert float(layer_fit_loss(attn, layer, without, 0.0)[1]) > 1e-3


@pytest.mark.parametrize("family", fast_cells(["qwen3", "gemma4_gqa"], keep=["qwen3"]))
def test_a_converted_student_rebuilds_from_its_spec(family):
    """What export and `load_student` do: the spec rebuilds the same zoo attentions in ``encoder.blocks``,
    and the converted weights load into it and give the converted student's logits."""
    tiny = FAMILIES[family]
    student = build_efficient_student(tiny.build(), "performer").eval()
    rebuilt = student_from_spec(json.loads(json.dumps(student_spec(student)))).eval()
    assert [type(b.attn) for b in flat_blocks(rebuilt)] == [type(b.attn) for b in flat_blocks(student)]
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        x = tiny.images()
        assert torch.equal(rebuilt(x), student(x))


@pytest.mark.parametrize("family", ["gemma4_gqa"])
def test_stage_2_distils_against_timms_own_maps(family):
    """Stage 2's distillation of a full-window Gemma4 student (its map is the teacher's): each layer's CE
    term is the entropy of the maps timm's own ``Gemma4Attention`` computes (unfused, recorded on
    ``attn_drop``); the loss reaches the student's own q projection."""
    tiny = FAMILIES[family]
    teacher, x = tiny.build(), tiny.images()
    student = build_efficient_student(teacher, "window", window_size=4)
    out = TeacherStudent(teacher, student, mode="distill").train()(x)
    maps = oracle_maps(tiny.build(), x)
    assert len(maps) == 2
    for i, p in enumerate(maps):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), map_ce(p, p), rtol=1e-4, atol=1e-6)
    out.loss.backward()
    assert flat_blocks(student)[0].attn.q_proj.linear.weight.grad is not None


def test_the_reports_map_agreement_of_a_mixed_gemma4_student():
    """The report's agreement (`map_agreement`) on a Gemma4 student that keeps softmax in block 0 and is the
    teacher in block 1 (a full window): zero KL on the teacher's inputs (cos/sin captured, scale 1) and on
    its own; a performer block is not zero."""
    tiny = FAMILIES["gemma4"]
    teacher, x = tiny.build(), tiny.images()
    for inputs in ("teacher", "own"):
        rows = map_agreement(
            teacher,
            build_efficient_student(teacher, ["softmax", "window"], window_size=4),
            [x],
            inputs=inputs,
        )
        assert [r["value"] for r in rows] == pytest.approx([0.0, 0.0], abs=1e-6), inputs
    rows = map_agreement(teacher, build_efficient_student(teacher, ["softmax", "performer"]), [x])
    assert rows[1]["value"] > 1e-3
