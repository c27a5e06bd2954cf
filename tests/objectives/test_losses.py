"""The O(N) attention-distillation loss against the materialised oracle."""

import pytest
import torch
import torch.nn.functional as F

from attnxfer.config.schema import RANGES
from attnxfer.models.attention import attention_with_lse
from attnxfer.transfer.logit_loss import logit_distillation_loss
from attnxfer.transfer.losses import (
    CE_PATHS,
    CEPath,
    attention_ce_reference,
    attention_distillation_loss,
    ce_path_for,
    row_logsumexp,
    teacher_entropy,
)
from attnxfer.transfer.row_ce import FusedRowCE


def _qk(B, H, N, d, seed, grad=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, d, generator=g) * scale).requires_grad_(grad)
    k = (torch.randn(B, H, N, d, generator=g) * scale).requires_grad_(grad)
    return q, k


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# Every CE path runnable on the CPU as is. The triton path runs its kernels only on CUDA or under Triton's
# interpreter (TRITON_INTERPRET=1): tests/objectives/test_triton_ce.py checks it against the same oracle.
CPU_PATHS = tuple(p for p in CE_PATHS if p is not CEPath.TRITON)
PATHS = pytest.mark.parametrize("path", CPU_PATHS)


def _fast(q_t, k_t, q_s, k_s, *, path, **kwargs):
    """`attention_distillation_loss` on ``path``; for ``attention_lse`` the student's log-sum-exp comes
    from its attention call, as TeacherStudent gets it (`attention_with_lse`: on CPU the SDPA + chunked twin)."""
    if CEPath(path).needs_student_lse:
        _, kwargs["lse_s"] = attention_with_lse(q_s, k_s, k_s)
    return attention_distillation_loss(q_t, k_t, q_s, k_s, path=path, **kwargs)


@PATHS
@pytest.mark.parametrize("N,chunk", [(64, 16), (50, 16), (50, 7), (17, 64)])
@pytest.mark.parametrize("heads_t,heads_s,d_t", [(4, 4, 8), (8, 4, 8), (8, 4, 12)])
def test_fast_loss_equals_oracle_fp32(N, chunk, heads_t, heads_s, d_t, path):
    q_t, k_t = _qk(2, heads_t, N, d_t, seed=1, scale=1.5)
    q_s, k_s = _qk(2, heads_s, N, 8, seed=2, grad=True)
    fast = _fast(q_t, k_t, q_s, k_s, chunk=chunk, path=path)
    g_fast = torch.autograd.grad(fast.total, [q_s, k_s])
    ref = attention_ce_reference(q_t, k_t, q_s, k_s)
    g_ref = torch.autograd.grad(ref.total, [q_s, k_s])
    assert fast.total.dtype == torch.float32
    assert _rel(fast.total, ref.total) <= 1e-5
    assert abs(fast.logs["kl"] - ref.logs["kl"]) <= 1e-5 * ref.total.abs()
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b) <= 1e-5


@PATHS
def test_fast_loss_under_bf16_autocast_is_fp32(path):
    q_t, k_t = _qk(2, 3, 50, 16, seed=3)
    q_s, k_s = _qk(2, 3, 50, 16, seed=4)
    q_t, k_t = q_t.bfloat16(), k_t.bfloat16()
    q_s, k_s = q_s.bfloat16().requires_grad_(), k_s.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _fast(q_t, k_t, q_s, k_s, chunk=16, path=path)
        g_fast = torch.autograd.grad(fast.total, [q_s, k_s])
    assert fast.total.dtype == torch.float32
    ref = attention_ce_reference(q_t.float(), k_t.float(), q_s.float(), k_s.float())
    g_ref = torch.autograd.grad(ref.total, [q_s, k_s])
    assert _rel(fast.total, ref.total) <= 1e-5
    for a, b in zip(g_fast, g_ref):
        # Gradients come back in the inputs' dtype. The one-branch paths round to bf16 only at the very
        # end: at most one bf16 ulp (2^-7 relative) from the fp32 oracle's, also rounded. With
        # attention_lse the log-sum-exp's gradient reaches the bf16 q/k through the attention call, a
        # second autograd branch rounded on its own (as any bf16 tensor with two consumers under
        # autocast): elements where the two parts cancel keep an error of one ulp of the parts' scale.
        assert a.dtype == torch.bfloat16
        atol = 2**-7 * b.abs().max().item() if CEPath(path).needs_student_lse else 1e-8
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=atol)


@PATHS
def test_kl_zero_and_ce_is_entropy_when_student_is_teacher(path):
    q, k = _qk(2, 4, 33, 8, seed=5, scale=2.0)
    res = _fast(q, k, q.clone().requires_grad_(), k.clone().requires_grad_(), chunk=8, path=path)
    p = torch.softmax(q @ k.transpose(-2, -1) * 8**-0.5, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert abs(res.logs["kl"].item()) < 1e-5
    torch.testing.assert_close(res.total.detach(), entropy, rtol=1e-5, atol=1e-6)


def test_grouped_teacher_entropy_matches_explicit():
    q, k = _qk(1, 6, 20, 4, seed=6)
    h = teacher_entropy(q, k, student_heads=3, chunk=7)
    p = torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1).reshape(1, 3, 2, 20, 20).mean(2)
    torch.testing.assert_close(h, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    for heads in (4, 0, 12):  # no whole groups of the teacher's 6
        with pytest.raises(ValueError, match=f"student_heads={heads}: the teacher's 6 heads .* must divide"):
            teacher_entropy(q, k, student_heads=heads)


def test_row_logsumexp_matches_autograd_of_explicit():
    q, k = _qk(2, 2, 37, 8, seed=7, grad=True)
    w = torch.randn(2, 2, 37)
    fast = row_logsumexp(q, k, chunk=5)
    g_fast = torch.autograd.grad((fast * w).sum(), [q, k])
    ref = torch.logsumexp(q @ k.transpose(-2, -1) * 8**-0.5, -1)
    g_ref = torch.autograd.grad((ref * w).sum(), [q, k])
    torch.testing.assert_close(fast, ref)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rows_path_equals_the_oracle_in_float64():
    """The fused row path in float64 end to end (the compute dtype keeps it): values and gradients to
    1e-10 with grouped heads, the teacher's head dim unlike the student's and a ragged last chunk; plus
    autograd's gradcheck of its hand-written backward. (The ``sdpa`` path is exact only to fp32: torch's
    CPU SDPA kernel loses ~1e-6 relative in float64.)"""
    path = "rows"
    q_t, k_t = _qk(2, 6, 23, 5, seed=11, scale=2.0)
    q_s, k_s = _qk(2, 3, 23, 4, seed=12)
    q_t, k_t = q_t.double(), k_t.double()
    q_s, k_s = q_s.double().requires_grad_(), k_s.double().requires_grad_()
    fast = attention_distillation_loss(q_t, k_t, q_s, k_s, chunk=6, path=path)
    ref = attention_ce_reference(q_t, k_t, q_s, k_s)
    assert fast.total.dtype == torch.float64
    torch.testing.assert_close(fast.total, ref.total, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fast.total, [q_s, k_s]), torch.autograd.grad(ref.total, [q_s, k_s])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the hand-written backward against finite differences, on a small problem
    qt, kt = q_t[:1, :2, :9], k_t[:1, :2, :9]
    qs, ks = q_s[:1, :1, :9].detach().requires_grad_(), k_s[:1, :1, :9].detach().requires_grad_()
    fn = lambda a, b: attention_distillation_loss(qt, kt, a, b, chunk=4, path=path, with_kl=False).total
    assert torch.autograd.gradcheck(fn, (qs, ks))


def test_cpu_uses_the_rows_path_and_unknown_paths_are_refused():
    assert ce_path_for("cpu") == "rows" and ce_path_for("cuda") == "sdpa"
    assert RANGES["transfer.ce_path"].choices == ("auto", *CE_PATHS)  # the config offers every path
    with pytest.raises(ValueError, match="unknown CE path"):
        attention_distillation_loss(*_qk(1, 2, 10, 4, 1), *_qk(1, 2, 10, 4, 2), path="flash")


@PATHS
def test_teacher_gets_no_gradient_and_shapes_are_checked(path):
    q_t, k_t = _qk(1, 2, 10, 4, seed=8, grad=True)
    q_s, k_s = _qk(1, 2, 10, 4, seed=9, grad=True)
    _fast(q_t, k_t, q_s, k_s, path=path).total.backward()
    assert q_t.grad is None and k_t.grad is None
    with pytest.raises(ValueError, match="token counts differ"):
        attention_distillation_loss(q_t, k_t, q_s[..., :9, :], k_s[..., :9, :])
    with pytest.raises(ValueError, match="teacher queries/keys 10/10, student 10/9"):  # only the keys differ
        attention_distillation_loss(q_t, k_t, q_s, k_s[..., :9, :])
    with pytest.raises(ValueError, match="whole multiple"):
        attention_distillation_loss(*_qk(1, 3, 10, 4, 1), *_qk(1, 2, 10, 4, 2))
    # keys that would broadcast against their queries (another batch or head count) or not fit (head dim)
    q2, k2 = _qk(2, 2, 10, 4, seed=8)
    for k_t2, k_s2 in [(k_t, k2), (k2, k2[:, :1]), (k2[..., :2], k2)]:
        with pytest.raises(ValueError, match="keys .* do not go with its queries"):
            attention_distillation_loss(q2, k_t2, q2, k_s2, path=path)


def test_logit_distillation_refuses_logits_that_would_broadcast():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    torch.testing.assert_close(
        logit_distillation_loss(s, t), F.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="batchmean")
    )
    for other in (t[:1], t[:, :1]):  # one teacher row for every student's, or one class
        with pytest.raises(ValueError, match=r"logits of one shape .* student \(4, 10\), teacher"):
            logit_distillation_loss(s, other)
    for temperature in (0.0, -2.0):  # NaN, and the KL of softmax(-t/2) against softmax(-s/2)
        with pytest.raises(ValueError, match="temperature > 0"):
            logit_distillation_loss(s, t, temperature)


def _matmul_flops(fn) -> tuple[int, int]:
    """(forward, backward) matmul FLOPs of ``fn()`` (a loss) and its backward, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fwd:
        loss = fn()
    if not loss.requires_grad:
        return fwd.get_total_flops(), 0
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def test_rows_path_does_the_four_matmuls_of_the_materialised_graph_and_none_in_backward():
    """The rows path computes the CE's gradient in its one forward pass over row chunks: two logit
    products and two gradient products (4·2·B·H·N²·d FLOPs, as autograd of the materialised maps
    does), nothing recomputed in backward; without gradients (evaluation) only the two logit products."""
    B, H, N, d = 2, 3, 40, 8
    q_t, k_t = _qk(B, H, N, d, seed=1)
    q_s, k_s = _qk(B, H, N, d, seed=2, grad=True)
    one = 2 * B * H * N * N * d
    rows = lambda: attention_distillation_loss(q_t, k_t, q_s, k_s, chunk=7, path="rows", with_kl=False).total
    assert _matmul_flops(rows) == (4 * one, 0)
    ref_fwd, ref_bwd = _matmul_flops(lambda: attention_ce_reference(q_t, k_t, q_s, k_s).total)
    assert ref_fwd + ref_bwd == 4 * one
    with torch.no_grad():
        assert _matmul_flops(rows) == (2 * one, 0)
    q_s.requires_grad_(False)  # only k_s wants a gradient: one gradient product
    assert _matmul_flops(rows) == (3 * one, 0)


@PATHS
def test_strided_views_of_a_fused_qkv_and_one_sided_gradients(path):
    """q/k arrive as strided views of a fused (B, N, 3, H, d) qkv output; a layer may want the gradient
    of k alone (q frozen): both as the oracle says."""
    B, N, H, d = 2, 19, 3, 8
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(B, N, 3, H, d, generator=g).permute(2, 0, 3, 1, 4)
    student = (torch.randn(B, N, 3, H, d, generator=g) * 1.5).requires_grad_()
    q_s, k_s, _ = student.permute(2, 0, 3, 1, 4).unbind(0)
    fast = _fast(teacher[0], teacher[1], q_s, k_s, chunk=5, path=path)
    ref = attention_ce_reference(teacher[0], teacher[1], q_s, k_s)
    assert _rel(fast.total, ref.total) <= 1e-5
    (g_fast,) = torch.autograd.grad(fast.total, [student])
    (g_ref,) = torch.autograd.grad(ref.total, [student])
    assert _rel(g_fast, g_ref) <= 1e-5
    q_only_k = q_s.detach()
    fast = _fast(teacher[0], teacher[1], q_only_k, k_s, path=path, with_kl=False)
    (g_k,) = torch.autograd.grad(fast.total, [student])
    (g_k_ref,) = torch.autograd.grad(
        attention_ce_reference(teacher[0], teacher[1], q_only_k, k_s).total, [student]
    )
    assert g_k[:, :, 0].abs().max() == 0 and _rel(g_k, g_k_ref) <= 1e-5


@pytest.mark.parametrize("keep_half", [False, True])
def test_rows_path_with_bf16_operands_kept_for_the_tensor_cores(keep_half):
    """On CUDA the rows path keeps bf16 q/k as matmul operands (fp32 logits from the tensor cores) and
    scales the logits after the product; on CPU `matmul_fp32` upcasts (the same math), so the branch's
    own logic (post-scaling, scales inside the gradient GEMMs, head groups) is checked here against the
    oracle on the same bf16 values."""
    q_t, k_t = (t.bfloat16() for t in _qk(2, 6, 29, 32, seed=21, scale=1.5))
    q_s, k_s = (t.bfloat16().requires_grad_() for t in _qk(2, 3, 29, 16, seed=22))
    s_t, s_s = 32**-0.5, 16**-0.5  # 16**-0.5 is a power of two, 32**-0.5 is not
    ce, ent = FusedRowCE.apply(q_s, k_s, q_t, k_t, s_s, s_t, 7, True, True, True, keep_half)
    ref = attention_ce_reference(q_t.float(), k_t.float(), q_s.float(), k_s.float())
    assert ce.dtype == torch.float32 and _rel(ce, ref.total) <= 1e-5
    assert abs((ce - ent) - ref.logs["kl"]) <= 1e-5 * ref.total
    g = torch.autograd.grad(ce, [q_s, k_s])
    g_ref = torch.autograd.grad(ref.total, [q_s, k_s])
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-8)


def test_materialised_path_equals_explicit_maps_in_float64():
    """The ``materialised`` path (torch's cross-entropy with probability targets) against the loss written
    out here from both maps, grouped teacher heads: values and gradients to float64 precision."""
    q_t, k_t = (t.double() for t in _qk(2, 6, 21, 5, seed=13, scale=2.0))
    q_s, k_s = (t.double().requires_grad_() for t in _qk(2, 3, 21, 4, seed=14))
    fast = attention_distillation_loss(q_t, k_t, q_s, k_s, path="materialised")
    p_t = torch.softmax(q_t @ k_t.transpose(-2, -1) / 5**0.5, -1).reshape(2, 3, 2, 21, 21).mean(2)
    log_p_s = torch.log_softmax(q_s @ k_s.transpose(-2, -1) / 2.0, -1)
    ce = -(p_t * log_p_s).sum(-1).mean()
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    assert fast.total.dtype == torch.float64
    torch.testing.assert_close(fast.total, ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.logs["kl"], kl.detach(), rtol=1e-10, atol=1e-14)
    for a, b in zip(torch.autograd.grad(fast.total, [q_s, k_s]), torch.autograd.grad(ce, [q_s, k_s])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


@pytest.mark.slow
def test_rows_path_value_is_as_accurate_as_the_materialised_reference_at_large_n():
    """The rows path's value at 7.4 M terms (batch 2, 6 heads, N = 785). Summed in one fp32 dot per chunk the rows
    path's value was 4e-6 off the float64 loss, 60x the materialised fp32 reference's error; now each row
    sums in fp32 and the rows in float64. Gradients were never affected (computed per row)."""
    q_t, k_t = _qk(2, 6, 785, 32, seed=15, scale=1.5)
    q_s, k_s = _qk(2, 6, 785, 32, seed=16, scale=1.5)
    exact = attention_ce_reference(q_t.double(), k_t.double(), q_s.double(), k_s.double()).total.item()
    rows = attention_distillation_loss(q_t, k_t, q_s, k_s, path="rows", with_kl=False).total.item()
    reference = attention_ce_reference(q_t, k_t, q_s, k_s).total.item()
    err_rows, err_ref = abs(rows - exact) / abs(exact), abs(reference - exact) / abs(exact)
    assert err_rows <= max(3 * err_ref, 2e-7), (err_rows, err_ref)


@PATHS
def test_fewer_keys_than_queries_equal_explicit_maps_in_float64(path):
    """N_k ≠ N_q (PVTv2's spatial reduction, Twins' sub-sampled keys: q of 23 rows, k of 6): every CPU path's
    value and gradients equal −Σ_j P̄_t log P_s from both explicit 23×6 maps, with grouped heads, unlike head
    dims and a ragged last chunk (the row path also in float64, to its precision)."""
    g = torch.Generator().manual_seed(3)
    q_t, k_t = torch.randn(2, 6, 23, 5, generator=g) * 2, torch.randn(2, 6, 6, 5, generator=g) * 2
    q_s = torch.randn(2, 3, 23, 4, generator=g).requires_grad_()
    k_s = torch.randn(2, 3, 6, 4, generator=g).requires_grad_()
    fast = _fast(q_t, k_t, q_s, k_s, chunk=5, path=path)
    p_t = ((q_t.double() @ k_t.double().transpose(-2, -1)) * 5**-0.5).softmax(-1)
    p_t = p_t.reshape(2, 3, 2, 23, 6).mean(2)
    log_p_s = ((q_s.double() @ k_s.double().transpose(-2, -1)) * 4**-0.5).log_softmax(-1)
    ce = -(p_t * log_p_s).sum(-1).mean()
    torch.testing.assert_close(fast.total.double(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        fast.logs["kl"].double(), ce + (p_t * p_t.log()).sum(-1).mean(), rtol=1e-4, atol=1e-6
    )
    for a, b in zip(torch.autograd.grad(fast.total, [q_s, k_s]), torch.autograd.grad(ce, [q_s, k_s])):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-7)
    if path == "rows":  # in float64 end to end: equal to float64's precision
        qs, ks = q_s.detach().double().requires_grad_(), k_s.detach().double().requires_grad_()
        exact = attention_distillation_loss(q_t.double(), k_t.double(), qs, ks, chunk=5, path=path).total
        torch.testing.assert_close(exact, ce.detach(), rtol=1e-10, atol=1e-12)
        log_p = ((qs @ ks.transpose(-2, -1)) * 4**-0.5).log_softmax(-1)
        want = torch.autograd.grad(-(p_t * log_p).sum(-1).mean(), [qs, ks])
        for a, b in zip(torch.autograd.grad(exact, [qs, ks]), want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
