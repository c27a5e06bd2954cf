"""Efficient students of rope teachers (EVA-02, DINOv3, PE): conversion applies the teacher's rotary embedding.

First principles: a zoo attention that is exactly softmax (``window`` with one window covering the whole grid)
built from a rope teacher's weights reproduces the teacher's logits, which it can only do if it rotates q and
k as timm's ``EvaAttention`` does (prefix tokens unrotated, interleaved or half layout). Every zoo attention's
q and k on the teacher's input equal the teacher's own rotated q and k, and stage 1 / stage 2 run on them.
Bias teachers (BEiT, relpos) stay refused with why.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from helpers import CONVERT_OPTIONS, tiny_convert_report, tiny_run
from timm.models import save_for_hf

from attnxfer.models.attention import capture_attention
from attnxfer.models.efficient import (
    EfficientAttention,
    HedgehogAttention,
    MapKind,
    build_efficient_student,
    new_parameters,
    register_attention,
    with_attention,
)
from attnxfer.models.efficient.base import rope_support
from attnxfer.train.stage1 import stage1_transfer, teacher_signals
from attnxfer.transfer import TeacherStudent
from attnxfer.transfer.conversion import build_conversion_plan, layer_fit_loss

from .cases import SMALL_KW as TINY, TINY as FLAT, build, peaked

#: interleaved / half rope, 1 or 5 prefix tokens, fused qkv + q_bias/v_bias, q/k/v_proj (k unbiased), GQA
ROPE = ["eva02", "dinov3", "pe", "pe_gqa", "eva02_proj"]


def _build(family: str, seed: int = 0) -> torch.nn.Module:
    if family == "eva02_proj":  # EVA-02 B/L: separate q/k/v projections, q and v biased, k not
        torch.manual_seed(seed)
        return timm.create_model("eva02_base_patch14_224", **TINY)
    return build(family, seed)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def eva02():
    return peaked(build("eva02")).eval()


@pytest.mark.parametrize("family", ROPE)
def test_a_full_window_student_of_a_rope_teacher_reproduces_its_logits(family, x):
    """``window`` over the whole 4x4 grid is softmax over all tokens: with the teacher's weights it gives
    the teacher's logits — rope rotated exactly as timm rotates it (and rope matters in these models)."""
    teacher = peaked(_build(family)).eval()
    student = build_efficient_student(teacher, "window", window_size=4).eval()
    assert all(type(b.attn).__name__ == "WindowAttention" for b in student.blocks)
    with torch.no_grad():
        expected = teacher(x)
        torch.testing.assert_close(student(x), expected, rtol=1e-5, atol=2e-5)
        no_rope = copy.deepcopy(teacher)
        no_rope.rope = None
        assert (no_rope(x) - expected).abs().max() > 1e-2


def _students(teacher):
    """(name, converted student) for every zoo attention with a map or an output to fit, sized to the 4x4 grid
    (windowed ones in 2x2 windows: keys outside). ``none`` (attention-free: nothing to rotate or fit) has its
    own tests in tests/families/test_convert_hier.py."""
    for name in rope_support():
        if name != "none":
            yield name, build_efficient_student(teacher, name, **CONVERT_OPTIONS.get(name, {}))


def test_every_zoo_attention_declares_rope_and_takes_the_teachers_rotated_q_and_k(eva02, x):
    """Each zoo attention declares what rope does to its map kind (with why); built from the teacher's
    weights, its q and k on the teacher's input (with the block's rope) are the teacher's own rotated q
    and k, bit for bit."""
    support = rope_support()
    assert support and all(why for _, why in support.values())
    assert all(keeps for keeps, _ in support.values())  # each applies rope before its feature map
    signals = teacher_signals(eva02, x, [0, 1], ("input", "q", "k"))
    for name, student in _students(eva02):
        for i in (0, 1):
            own = student.blocks[i].attn.project(signals[i]["input"], "qk", rope=signals[i]["rope"])
            assert torch.equal(own["q"], signals[i]["q"]) and torch.equal(own["k"], signals[i]["k"]), name


@pytest.mark.slow
def test_every_zoo_attention_fits_a_rope_teacher_in_stage_1(eva02, x):
    """One stage-1 step per zoo attention on the rope teacher's signals: finite loss, new parameters moved."""
    signals = teacher_signals(eva02, x, [0, 1], ("input", "q", "k", "output"))
    for name, student in _students(eva02):
        trains = "new" if list(new_parameters(student)) else "qk"
        plan = build_conversion_plan(eva02, student, stage1_steps=1, stage1_batch_size=2, stage1_train=trains)
        before = {n: p.detach().clone() for n, p in new_parameters(student)}
        res = stage1_transfer(eva02, student, plan, iter([signals]))
        assert res.steps == 1 and torch.isfinite(torch.tensor(res.history[-1]["loss"])), name
        if before and trains == "new":
            assert any(not torch.equal(p, before[n]) for n, p in new_parameters(student)), name


def test_stage_1_sees_the_teachers_rope(eva02, x):
    """A student that equals its teacher (full window) has zero stage-1 KL on the teacher's inputs only if
    the captured rope reaches it; without the rope the same student is off."""
    student = build_efficient_student(eva02, "window", window_size=4)
    plan = build_conversion_plan(eva02, student, stage1_steps=1, stage1_train="qk")
    signals = teacher_signals(eva02, x, [0, 1], ("input", "q", "k"))
    for layer in plan.active:
        sig = signals[layer.layer]
        _, kl = layer_fit_loss(student.blocks[layer.layer].attn, layer, sig, 0.0)
        assert float(kl) == pytest.approx(0.0, abs=1e-5)
        _, kl_without = layer_fit_loss(
            student.blocks[layer.layer].attn, layer, {k: v for k, v in sig.items() if k != "rope"}, 0.0
        )
        assert float(kl_without) > 1e-2


def test_stage_2_distils_a_converted_rope_student(eva02, x):
    """Stage 2's step: the converted student's implicit maps (built from its rotated q, k) against the
    teacher's softmax maps, through TeacherStudent; the gradient reaches the student's new parameters."""
    student = build_efficient_student(eva02, "performer")
    out = TeacherStudent(eva02, student, mode="distill").train()(x)
    loss = sum(out.terms[f"attn_ce/{i}"] for i in (0, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for _, p in new_parameters(student) if p.requires_grad)


def test_a_fresh_efficient_student_of_a_rope_family(x):
    """``model.attention`` on a fresh rope-family student (what `attnxfer train` builds): its zoo
    attentions rotate q, k with the student's own rope, and it distils from a rope teacher."""
    teacher = peaked(build("dinov3")).eval()
    student = with_attention(build("dinov3", seed=7), "hedgehog")
    assert student.blocks[0].attn.rotate_half  # DINOv3's half-rotation layout
    out = TeacherStudent(teacher, student, mode="distill").train()(x)
    assert torch.isfinite(out.terms["attn_ce/0"])
    with capture_attention(student, [0], ("input", "q")) as store, torch.no_grad():
        student.forward_features(x)
    plain = student.blocks[0].attn.project(store[0]["input"], "q")["q"]
    assert not torch.equal(plain, store[0]["q"])  # the forward's q was rotated


def test_an_attention_rope_breaks_is_refused_with_its_reason(eva02, monkeypatch):
    """An attention declared rope-unsafe (as one whose kernel needs non-negative q, k before a rotation
    would be) is refused at build time with its reason and the attentions that do take rope."""
    monkeypatch.setattr(HedgehogAttention, "rope_keeps_map_kind", False)
    monkeypatch.setattr(HedgehogAttention, "rope_why", "its kernel needs non-negative q, k")
    with pytest.raises(
        ValueError, match=r"'hedgehog' cannot take the teacher's rotary.*non-negative.*performer"
    ):
        build_efficient_student(eva02, "hedgehog")
    with pytest.raises(ValueError, match=r"'hedgehog' cannot take"):
        with_attention(build("pe"), ["performer", "hedgehog"])


def test_an_attention_silent_on_rope_is_refused_naming_what_to_declare(eva02, registries_kept):
    """A new attention whose class says nothing of rope is refused as an unsafe one is, and the refusal (as
    `convert --help`'s row) names the two class attributes its author declares to answer."""
    members = {"map_kind": MapKind.NONE, "_attend": lambda self, q, k, v: v}
    register_attention("lab_silent")(type("LabSilent", (EfficientAttention,), members))
    with pytest.raises(
        ValueError, match=r"'lab_silent' cannot take .*sets no rope_keeps_map_kind and rope_why"
    ):
        build_efficient_student(eva02, "lab_silent")


@pytest.mark.parametrize("family", ["beit", "relpos"])
def test_a_bias_teacher_is_refused_with_why_and_what_to_do(family):
    teacher = build(family) if family == "beit" else FLAT[family].build(peaked=False)
    with pytest.raises(
        ValueError, match=r"relative-position bias.*never forms the N x N logits.*attnxfer train"
    ):
        build_efficient_student(teacher, "performer")


@pytest.mark.slow
def test_convert_a_rope_teacher_through_the_cli_and_load_the_student(tmp_path, x):
    """``attnxfer convert`` on a tiny EVA-02 teacher (stage 1 + stage 2), export, `load_student`: the loaded
    student's logits are the converted run's."""
    from attnxfer import load_student
    from attnxfer.launch.cli import main

    teacher = build("eva02")
    teacher.reset_classifier(10)  # the synthetic data's classes
    save_for_hf(peaked(teacher), tmp_path / "teacher", safe_serialization=True)
    run = tmp_path / "run"
    args = [
        "convert",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{tmp_path / 'teacher'}",
        *tiny_run(16, 8),
        "convert.attention=hedgehog",
        "convert.stage1_steps=3",
        "schedule.epochs=1",
        "schedule.max_steps=2",
        "transfer.mode=distill",
        *tiny_convert_report(1, 2),
    ]
    assert main(args) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["stage1"]["steps"] == 3 and report["stage2"]["steps"] == 2
    rows = report["agreement"]["teacher_input"]
    assert sum(r["after_stage1"] for r in rows) < sum(r["before_stage1"] for r in rows)
    out = tmp_path / "export"
    assert main(["export", str(run / "stage2"), str(out), "--checkpoint", "latest", "--weights", "raw"]) == 0
    loaded = load_student(f"local-dir:{out}").eval()
    assert type(loaded.blocks[0].attn).__name__ == "HedgehogAttention"
    from safetensors.torch import load_file

    rebuilt = build_efficient_student(peaked(teacher), "hedgehog").eval()
    final = sorted((run / "stage2" / "checkpoints").glob("step-*"))[-1]
    rebuilt.load_state_dict(load_file(str(final / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(x), rebuilt(x))
