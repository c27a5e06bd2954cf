"""Softmax attention that hands out its log-sum-exp (the ``attention_lse`` distillation path).

The CPU runs the twin backend (SDPA + chunked log-sum-exp) with gradients, and FlexAttention's forward in
eager mode (torch has no FlexAttention backward on CPU); both against explicit maps. Where CUDA exists the
compiled FlexAttention backend is checked against the twin in value and gradient (that test is defined
only there: a CPU machine does not collect it, rather than skipping it).
"""

import pytest
import timm
import torch
from families.cases import TINY
from helpers import assert_same_distill_step, distill_step_on, fast_cells, peaked_teacher, tiny_vit

from attnxfer.models.attention import (
    AttentionIO,
    attention_io,
    attention_with_lse,
    run_with_ios,
    transferable_attentions,
)
from attnxfer.models.attention.lse import (
    LSEBackend,
    flex_attention_available,
    flex_attention_with_lse,
    lse_backend_for,
    row_logsumexp,
)
from attnxfer.models.efficient import build_efficient_student
from attnxfer.transfer.losses import CE_PATHS, CEPath, attention_ce_reference, attention_distillation_loss
from attnxfer.transfer.plan import build_plan
from attnxfer.transfer.teacher_student import TeacherStudent


def _qkv(B=2, H=3, N=21, d=8, seed=0, scale=1.5, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, N, d, generator=g) * scale).to(device, dtype) for _ in range(3)]


def _explicit(q, k, v):
    logits = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return torch.softmax(logits, -1) @ v.double(), torch.logsumexp(logits, -1)


def test_twin_backend_values_and_gradients_match_explicit_maps():
    q, k, v = (t.double().requires_grad_() for t in _qkv())
    out, lse = attention_with_lse(q, k, v, backend="twin")
    ref_out, ref_lse = _explicit(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    w_out, w_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * w_out).sum() + (lse * w_lse).sum(), [q, k, v])
    want = torch.autograd.grad((ref_out * w_out).sum() + (ref_lse * w_lse).sum(), [q, k, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_in_eager_mode_matches_explicit_maps():
    """FlexAttention's own forward (eager: torch's reference implementation) gives the explicit output and
    the natural-log log-sum-exp our loss assumes."""
    assert flex_attention_available()
    q, k, v = _qkv(N=33, d=16)
    with torch.no_grad():
        out, lse = flex_attention_with_lse(q, k, v, scale=16**-0.5, compiled=False)
    ref_out, ref_lse = _explicit(q, k, v)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_one_place_picks_the_backend():
    assert lse_backend_for("cpu") is LSEBackend.TWIN
    assert lse_backend_for("cuda") is (LSEBackend.FLEX if flex_attention_available() else LSEBackend.TWIN)
    assert lse_backend_for("cuda", dropout_p=0.1) is LSEBackend.TWIN  # flex has no attention dropout
    with pytest.raises(ValueError, match="no attention dropout"):
        attention_with_lse(*_qkv(), dropout_p=0.1, backend="flex")


def test_row_logsumexp_keeps_input_dtype_for_gradients():
    q, k, _ = _qkv()
    q, k = q.bfloat16().requires_grad_(), k.bfloat16().requires_grad_()
    lse = row_logsumexp(q, k, chunk=4)
    assert lse.dtype == torch.float32
    gq, gk = torch.autograd.grad(lse.sum(), [q, k])
    assert gq.dtype == gk.dtype == torch.bfloat16


def test_only_softmax_layers_hand_out_a_log_sum_exp():
    student = build_efficient_student(tiny_vit(depth=1), "relu_linear")
    attn = transferable_attentions(student)[0]
    with (
        pytest.raises(TypeError, match="not a softmax attention"),
        attention_io(attn, AttentionIO(return_lse=True)),
    ):
        student(torch.randn(1, 3, 32, 32))


# the triton path needs CUDA or TRITON_INTERPRET=1: tests/objectives/test_triton_ce.py runs TeacherStudent with it
@pytest.mark.parametrize("path", [p for p in CE_PATHS if p not in (CEPath.TRITON, CEPath.MATERIALISED)])
def test_every_ce_path_gives_the_distillation_step_of_the_materialised_maps(path):
    """TeacherStudent with each O(N) CE path: the same per-layer CE and student gradients as the materialised
    path, the reference's explicit N×N maps with autograd through them (the oracle every path must meet); with
    attention_lse every distilled softmax layer hands out its log-sum-exp (the loss refuses to run without
    it)."""
    teacher, x = peaked_teacher(depth=2), torch.randn(3, 3, 32, 32)
    assert_same_distill_step(distill_step_on(path, teacher, x), distill_step_on("materialised", teacher, x))


def _sam_with_rope(seed: int) -> torch.nn.Module:
    """A tiny SAM ViT whose global blocks rotate q and k instead of adding the decomposed rel-pos bias."""
    torch.manual_seed(seed)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4, neck_chans=16)
    kw |= dict(global_attn_indexes=(0, 1), use_abs_pos=False, use_rel_pos=False, use_rope=True)
    return timm.create_model("samvit_base_patch16", pretrained=False, num_classes=5, **kw).eval()


@pytest.mark.parametrize("family", fast_cells(["cait", "gemma4", "sam_rope"], ("sam_rope",)))
def test_attention_lse_keeps_a_layer_s_own_scale_and_post_softmax_mix(family):
    """A student layer that scales its logits otherwise than d^-0.5 (Gemma4: 1; CaiT's talking heads: one
    head's d^-0.5 on q' of H·d) or mixes heads after the softmax (talking heads) hands out its lse on the
    attention_lse path: its forward stays timm's own (attend_with_lse ran a plain d^-0.5 SDPA, changing the
    logits by 0.4) and each layer's CE is the explicit maps' at the layer's own scale (Gemma4's was 6.7 for
    12.6). A layer whose class may add a logit bias but adds none (SAM with rope) hands out its lse too (it
    stopped the run, asking for an lse_s no config can pass)."""
    make, images = (_sam_with_rope, torch.randn(2, 3, 32, 32)) if family == "sam_rope" else (None, None)
    if make is None:
        make, images = TINY[family].build, TINY[family].images(2)
    teacher, student, x = make(0), make(1).train(), images
    with torch.no_grad():
        want_logits = student(x)
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "distill"), ce_path="attention_lse")
    ios = {i: AttentionIO(capture="qk") for i in range(len(pair._student_attn))}
    with torch.no_grad():
        run_with_ios(teacher, x, ios)
    out = pair.train()(x)
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-5, atol=1e-5)
    for s, t in pair.plan.pairs:  # the explicit N×N maps at each layer's own logit scale
        with torch.no_grad(), attention_io(pair._student_attn[s], io := AttentionIO(capture="qk")):
            student(x)
        want = attention_ce_reference(
            ios[t].captured["q"],
            ios[t].captured["k"],
            io.captured["q"],
            io.captured["k"],
            scale_t=pair._teacher_attn[t].logit_scale(ios[t].captured["q"]),
            scale_s=pair._student_attn[s].logit_scale(io.captured["q"]),
        ).total
        torch.testing.assert_close(out.terms[f"attn_ce/{s}"], want, rtol=1e-5, atol=1e-6)


def test_forced_attention_lse_runs_on_layers_whose_instance_adds_no_bias(monkeypatch):
    """SAM with rope: its class may add a logit bias, these layers add none. Forced attention_lse, teacher and
    student alike hand that over on each call, so every layer's CE really takes the student kernel's
    log-sum-exp (it was replaced by sdpa unsaid, the student never asked for its lse) and equals the explicit
    maps'."""
    import attnxfer.transfer.map_losses as map_losses

    taken = []

    def spy(*args, path=None, lse_s=None, **kw):
        taken.append((CEPath(path), lse_s is not None))
        return attention_distillation_loss(*args, path=path, lse_s=lse_s, **kw)

    monkeypatch.setattr(map_losses, "attention_distillation_loss", spy)
    teacher, student, x = _sam_with_rope(0), _sam_with_rope(1), torch.randn(2, 3, 32, 32)
    assert all(a.has_logit_bias for a in transferable_attentions(student))  # the class may add one
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "distill"), ce_path="attention_lse")
    out = pair.train()(x)
    assert taken == [(CEPath.ATTENTION_LSE, True)] * len(pair.plan.pairs)
    ios = {i: AttentionIO(capture="qk") for i in range(len(pair._student_attn))}
    with torch.no_grad():
        run_with_ios(teacher, x, ios)
        run_with_ios(student, x, mine := {i: AttentionIO(capture="qk") for i in ios})
    for s, t in pair.plan.pairs:
        qt, kt, qs, ks = (io.captured[c] for io in (ios[t], mine[s]) for c in "qk")
        want = attention_ce_reference(qt, kt, qs, ks).total
        torch.testing.assert_close(out.terms[f"attn_ce/{s}"], want, rtol=1e-5, atol=1e-6)


def _flex_backend_matches_the_twin(device):
    """Compiled FlexAttention (bf16, as training runs) against the twin in fp32: outputs and the
    log-sum-exp, and gradients through both (grad_logsumexp included)."""
    q, k, v = _qkv(B=2, H=6, N=197, d=64, device=device, scale=1.0)
    w_out = torch.randn(2, 6, 197, 64, device=device)
    w_lse = torch.randn(2, 6, 197, device=device)
    res = {}
    for backend, dtype in (("flex", torch.bfloat16), ("twin", torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attention_with_lse(*leaves, backend=backend)
        loss = (out.float() * w_out).sum() + (lse * w_lse).sum()
        res[backend] = (out.float(), lse, [g.float() for g in torch.autograd.grad(loss, leaves)])
    torch.testing.assert_close(res["flex"][0], res["twin"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(res["flex"][1], res["twin"][1], rtol=1e-2, atol=1e-2)
    for a, b in zip(res["flex"][2], res["twin"][2]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


if torch.cuda.is_available():  # a GPU machine (the lent H100: benchmarks/gpu_suite.sh runs it); CI has none

    def test_flex_backend_matches_the_twin_on_cuda():
        _flex_backend_matches_the_twin("cuda")
