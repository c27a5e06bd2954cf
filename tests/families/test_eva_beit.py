"""The EVA (EVA-02, DINOv3, Perception Encoder's AttentionRope) and BEiT families, checked against timm's own
modules: the distill CE and its gradients equal the CE of the maps timm's unfused attention produces
(captured at ``attn_drop``), copy with the teacher's q/k (and tables) reproduces the teacher, a plain ViT
student learns a DINOv3 teacher's maps, the teacher stops inside its last transferred attention. The suites
every family runs (forward, maps, export, ...) are ``test_adapters.py``'s."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import fast_cells

from attnxfer.models import student_like
from attnxfer.models.attention import transferable_attentions
from attnxfer.models.efficient.swap import check_softmax_teacher
from attnxfer.transfer import PlanError, TeacherStudent, build_plan

from .cases import ARCHS, SMALL_KW, build, peaked
from .oracles import assert_shared_drop_path_keeps_the_maps, timm_maps

TINY = SMALL_KW


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", fast_cells(list(ARCHS), ("beit_shared", "beitv2", "eva02")))
def test_distill_ce_and_gradients_equal_timm_maps(family, x):
    teacher, student = peaked(build(family, 0), 1), peaked(build(family, 2), 3)
    oracle_t, oracle_s = copy.deepcopy(teacher).eval(), copy.deepcopy(student).train()
    pair = TeacherStudent(teacher, student, mode="distill").train()
    out = pair(x)
    with torch.no_grad():
        p_t = timm_maps(oracle_t, x)
    p_s = timm_maps(oracle_s, x)
    ces = [-(pt * ps.log()).sum(-1).mean() for pt, ps in zip(p_t, p_s)]
    for i, ce in enumerate(ces):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"], ce, rtol=1e-5, atol=1e-6)
    assert min(out.logs.values()) > 0.05  # the maps differ: a real signal
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(
        sum(out.terms.values()), [student.get_parameter(n) for n in names], allow_unused=True
    )
    want = torch.autograd.grad(sum(ces), [oracle_s.get_parameter(n) for n in names], allow_unused=True)
    touched = 0
    for n, g, w in zip(names, got, want):
        if w is None:
            assert g is None or g.abs().max() == 0, n
            continue
        touched += 1
        scale = w.abs().max().item()  # fp32 rounding of sums over many paths: relative to the largest entry
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")
    assert touched >= 4
    if family.startswith("beit"):  # the relative-position table learns through the biased CE
        assert any("relative_position_bias_table" in n for n, w in zip(names, want) if w is not None)


@pytest.mark.parametrize("family", fast_cells(list(ARCHS), ("dinov3", "eva02", "pe", "pe_gqa")))
def test_copy_with_teacher_weights_reproduces_the_teacher(family, x):
    """The student is the teacher with its own q/k (and tables) redrawn: copy gives the teacher's logits."""
    teacher = peaked(build(family)).eval()
    student = peaked(copy.deepcopy(teacher), seed=7, head=False)
    want = teacher(x)
    # its own q/k (and bias) would give other tokens (pooled logits of random models move less)
    assert not torch.allclose(student.forward_features(x), teacher.forward_features(x), atol=1e-2)
    pair = TeacherStudent(teacher, student, mode="copy").eval()
    torch.testing.assert_close(pair(x).logits, want, rtol=1e-5, atol=1e-5)
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert not any("q_bias" in n or "q_proj" in n for n in student.state_dict() if n in frozen)
    assert not any(n.endswith("qkv.weight") for n, _ in student.named_parameters())  # split: q/k rows frozen


def test_plain_vit_student_from_a_dinov3_teacher(x):
    """A DINOv3-shaped teacher (rope, 4 registers) into a plain ViT with 4 registers: distill and copy."""
    teacher = peaked(build("dinov3"))
    torch.manual_seed(5)
    student = timm.create_model("vit_small_patch16_224", **TINY, reg_tokens=4)
    with torch.no_grad():
        p_t = timm_maps(copy.deepcopy(teacher).eval(), x)
        p_s = timm_maps(copy.deepcopy(student), x)
    out = TeacherStudent(teacher, student, mode="distill").train()(x)
    for i in range(2):
        ce = -(p_t[i] * p_s[i].log()).sum(-1).mean()
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].detach(), ce, rtol=1e-5, atol=1e-6)
    pair = TeacherStudent(teacher, student, mode="copy").eval()
    assert pair(x).logits.shape == (2, 5)
    with pytest.raises(PlanError, match="token grids differ.*5 prefix.*class_token=True, reg_tokens=4"):
        build_plan(teacher, timm.create_model("vit_small_patch16_224", **TINY), "distill")


def test_walk_refuses_an_attention_without_adapter():
    model = build("eva02")
    model.blocks[1].attn = torch.nn.MultiheadAttention(32, 2)
    with pytest.raises(TypeError, match=r"blocks.1.attn is MultiheadAttention .*no adapter.*families/"):
        transferable_attentions(model)


def test_plan_refuses_a_family_with_no_adapter_and_mirrors_the_teachers_family():
    teacher = build("beit")
    student = student_like(teacher, depth=1)
    assert type(student) is type(teacher) and len(student.blocks) == 1
    assert build_plan(teacher, student, "copy").pairs == ((0, 1),)
    odd = build("eva02")
    odd.blocks[0].attn = torch.nn.MultiheadAttention(32, 2)
    with pytest.raises(PlanError, match=r"^teacher: blocks.0.attn is MultiheadAttention .*no adapter"):
        build_plan(odd, build("eva02"), "distill")


def test_eva_teacher_stops_inside_its_last_transferred_attention(x):
    """Transferring layer 0 of 2: the teacher's block-0 MLP and all of block 1 are never run (timm's own
    forward, stopped by the attention once it has captured); with logit distillation the whole teacher runs."""
    teacher, student = peaked(build("eva02")), build("eva02", seed=3)
    calls = []
    for i, blk in enumerate(teacher.blocks):
        blk.mlp.register_forward_hook(lambda *a, i=i: calls.append(i))
    TeacherStudent(teacher, student, build_plan(teacher, student, "distill", layers=[0])).train()(x)
    assert calls == []
    TeacherStudent(
        teacher, student, build_plan(teacher, student, "distill", layers=[0], logit_weight=1.0)
    ).train()(x)
    assert calls == [0, 1]


@pytest.mark.parametrize("family", fast_cells(["eva02", "pe", "beit"], ("pe", "beit")))
@pytest.mark.parametrize("chunk", fast_cells(["q", "k", "v"], ("q",)))
def test_copy_one_chunk_with_teacher_weights_reproduces_the_teacher(family, chunk, x):
    """copy_q / copy_k / copy_v: the student is the teacher with that chunk's projection redrawn."""
    teacher = peaked(build(family)).eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("attn.qkv.weight"):
                rows = p.shape[0] // 3
                i = "qkv".index(chunk)
                p[i * rows : (i + 1) * rows] = torch.randn(rows, p.shape[1], generator=g) * 0.4
            elif name.endswith(f"attn.{chunk}_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    want = teacher(x)
    assert not torch.allclose(student.forward_features(x), teacher.forward_features(x), atol=1e-2)
    pair = TeacherStudent(teacher, student, mode=f"copy_{chunk}").eval()
    torch.testing.assert_close(pair(x).logits, want, rtol=1e-5, atol=1e-5)


def test_shared_drop_path_on_eva_blocks(x):
    """Student = teacher with drop path: shared masks keep the maps identical (KL 0), private ones do not."""
    teacher = peaked(build("eva02"))
    assert_shared_drop_path_keeps_the_maps(teacher, torch.cat([x] * 4))


def test_conversion_refuses_a_bias_teacher():
    """Zoo attentions form no N x N logits: a teacher whose logits carry a relative-position bias is refused
    by name instead of silently losing it (rope teachers convert: tests/families/test_convert_rope.py)."""
    with pytest.raises(
        ValueError, match=r"blocks.0.attn is timm\.models\.beit\.Attention.*relative-position"
    ):
        check_softmax_teacher(build("beit"))
    check_softmax_teacher(build("eva02"))
