"""The fused Triton CE kernels (`attnxfer.transfer.triton_ce`) against the materialised oracle.

On the CPU the kernels run under Triton's interpreter, which works only in a process that had
``TRITON_INTERPRET=1`` before it imported triton (triton decorates its own library, ``tl.zeros``,
``tl.sum``..., at import). So the interpreted checks run in one worker process (the ``interpreter``
fixture: spawned with the variable set, started once for this module); this process, where the rest of the
suite runs, never sets it. Each ``_check_*`` function runs there and its assertion errors come back here.
The compiled kernels, which the interpreter does not exercise (it runs their Python source on NumPy), are
checked twice: compiled for an H100 (sm_90) without running (`compile_for_arch`: they pass Triton's compiler
and bf16 tiles become tensor-core instructions), and, on a machine with CUDA, run against the oracle (that
test is defined only there: CI does not collect it rather than skipping it).
"""

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from helpers import assert_same_distill_step, distill_step_on, peaked_teacher

from attnxfer.transfer.losses import attention_ce_reference, attention_distillation_loss
from attnxfer.transfer.triton_ce import TritonBackend, compile_for_arch, triton_backend, triton_row_ce


@pytest.fixture(scope="module")
def interpreter():
    """``run(fn, *args)``: ``fn(*args)`` in a worker process that imported triton under TRITON_INTERPRET=1."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")  # inherited by the worker when it starts (now), then unset here
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()
    try:
        yield lambda fn, *args: pool.submit(fn, *args).result()
    finally:
        pool.shutdown()


def _probe_interpreter():
    from _triton_probe import interpreter_loops_to_a_runtime_bound

    return interpreter_loops_to_a_runtime_bound()


@pytest.fixture(scope="module")
def kernel_interpreter(interpreter):
    """`interpreter`, for the checks that run the kernels there. Every kernel loops over key blocks to a
    runtime bound (N), which Triton 3.6's interpreter cannot run (torch 2.11's triton: the lent GPU machine's
    image). There, and only where CUDA runs the compiled kernels against the same oracle instead
    (``test_compiled_*`` below), these checks are skipped; without CUDA the interpreter is the only check
    of the kernels, so an interpreter that cannot run them fails the test."""
    problem = interpreter(_probe_interpreter)
    if problem is not None:
        import triton

        why = f"triton {triton.__version__}'s interpreter cannot run a kernel loop to a runtime bound ({problem})"
        if not torch.cuda.is_available():
            pytest.fail(
                why + "; with no GPU here nothing else checks the kernels: use a newer triton (3.8 runs them)"
            )
        pytest.skip(why + "; the compiled kernels are checked against the oracle on CUDA below")
    return interpreter


def _qk(B, H, N, d, seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, d, generator=g) * scale, torch.randn(B, H, N, d, generator=g) * scale)
    return q.to(device), k.to(device)


def _rows_oracle(q_t, k_t, q_s, k_s):
    """Per-row CE and H(P̄_t) (B, H_s, N) from explicit maps in float64."""
    q_t, k_t, q_s, k_s = (t.double() for t in (q_t, k_t, q_s, k_s))
    p_t = torch.softmax(q_t @ k_t.transpose(-2, -1) * q_t.shape[-1] ** -0.5, -1)
    B, H_t, N, _ = p_t.shape
    H_s = q_s.shape[1]
    p_t = p_t.reshape(B, H_s, H_t // H_s, N, N).mean(2)
    log_p_s = torch.log_softmax(q_s @ k_s.transpose(-2, -1) * q_s.shape[-1] ** -0.5, -1)
    return -(p_t * log_p_s).sum(-1), -torch.special.xlogy(p_t, p_t).sum(-1)


def _close(a, b, rel=1e-5, what=""):
    """max |a − b| ≤ rel · max |b| (relative to the largest element: rows and gradients cross zero)."""
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def _check_fp32_against_the_oracle(B, heads_t, heads_s, d_t, d_s, N, device="cpu"):
    backend = TritonBackend.INTERPRETED if device == "cpu" else TritonBackend.COMPILED
    assert triton_backend(device) is backend
    q_t, k_t = _qk(B, heads_t, N, d_t, seed=1, scale=1.5, device=device)
    q_t.requires_grad_()
    q_s, k_s = (t.requires_grad_() for t in _qk(B, heads_s, N, d_s, seed=2, device=device))
    ce, ent = triton_row_ce(q_t, k_t, q_s, k_s)  # 16×16 tiles under the interpreter, 32×32 compiled (fp32)
    ce_ref, ent_ref = _rows_oracle(q_t, k_t, q_s, k_s)
    assert ce.shape == ent.shape == (B, heads_s, N) and ce.dtype == ent.dtype == torch.float32
    assert not ent.requires_grad
    _close(ce, ce_ref, what="CE rows")
    _close(ent, ent_ref, what="entropy rows")
    ref = attention_ce_reference(q_t, k_t, q_s, k_s)
    _close(ce.mean(), ref.total, what="mean CE")
    _close(ce.mean() - ent.mean(), ref.logs["kl"], rel=1e-5 * (ref.total / ref.logs["kl"]).item(), what="KL")
    w = torch.rand(B, heads_s, N, generator=torch.Generator().manual_seed(3)).to(device) + 0.5
    for weights in (None, w):  # the mean (one incoming gradient for all rows), then one per row
        loss = ce.mean() if weights is None else (ce * weights).sum()
        loss_ref = ref.total if weights is None else (ce_ref * weights).sum()
        got = torch.autograd.grad(loss, [q_s, k_s], retain_graph=True)
        want = torch.autograd.grad(loss_ref, [q_s, k_s], retain_graph=True)
        for name, a, b in zip(("dq", "dk"), got, want):
            assert a.dtype == torch.float32
            _close(a, b, what=name)
    ce.sum().backward()
    assert q_t.grad is None  # the teacher gets no gradient


@pytest.mark.parametrize(
    "B,heads_t,heads_s,d_t,d_s,N",
    [
        (2, 2, 2, 8, 8, 34),  # one teacher head per student head, ragged N (34 = 2 blocks of 16 + 2)
        pytest.param(
            1, 4, 2, 12, 8, 40, marks=pytest.mark.slow
        ),  # head groups (H_t = 2 H_s), unequal head dims (12 padded to 16)
    ],
)
def test_fp32_rows_kl_and_gradients_match_the_oracle(kernel_interpreter, B, heads_t, heads_s, d_t, d_s, N):
    """Values per row (CE and the entropy: one pass for g = 1, the grouped-entropy kernel for g > 1), the
    mean and KL as `attention_ce_reference` gives them, and the gradients of q_s and k_s, of the mean and
    of a weighted sum of rows (each row its own incoming gradient), all to 1e-5 relative."""
    kernel_interpreter(_check_fp32_against_the_oracle, B, heads_t, heads_s, d_t, d_s, N)


def _check_half_inputs(dtype, B=2, heads_t=4, heads_s=2, d_t=16, d_s=32, N=45, device="cpu"):
    q_t, k_t = (t.to(dtype) for t in _qk(B, heads_t, N, d_t, seed=4, scale=1.5, device=device))
    q_s, k_s = (t.to(dtype).requires_grad_() for t in _qk(B, heads_s, N, d_s, seed=5, device=device))
    ce, ent = triton_row_ce(q_t, k_t, q_s, k_s)
    ref = attention_ce_reference(*(t.float() for t in (q_t, k_t, q_s, k_s)))
    assert ce.dtype == torch.float32
    _close(ce.mean(), ref.total, what="mean CE")
    _close(ce.mean() - ent.mean(), ref.logs["kl"], rel=1e-5 * (ref.total / ref.logs["kl"]).item(), what="KL")
    got = torch.autograd.grad(ce.mean(), [q_s, k_s])
    want = torch.autograd.grad(ref.total, [q_s, k_s])
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * ulp, atol=4 * ulp * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_half_inputs_match_the_oracle_on_the_same_values(kernel_interpreter, dtype):
    """bf16/fp16 q/k (training on a GPU): the tiles multiply in the inputs' dtype with fp32 accumulation,
    so the loss is the fp32 oracle's on the same (rounded) values; gradients come back in the inputs'
    dtype. Their one extra rounding is dz = P_s − P̄_t cast to the inputs' dtype for the two gradient
    products, as flash attention casts P: a relative error of one ulp per term (the interpreter truncates
    where the GPU rounds to nearest) of sums whose terms partly cancel (Σ_j dz_ij = 0), so the bound is relative to the largest gradient element. fp16 checks the
    normalisation by max|w|: the mean's w = 1/n, times P ≪ 1, would underflow fp16."""
    kernel_interpreter(_check_half_inputs, dtype)


def _check_k_only_from_a_fused_qkv():
    B, N, H, d = 2, 19, 2, 16
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(B, N, 3, H, d, generator=g).permute(2, 0, 3, 1, 4)
    student = (torch.randn(B, N, 3, H, d, generator=g) * 1.5).requires_grad_()
    q_s, k_s, _ = student.permute(2, 0, 3, 1, 4).unbind(0)
    ce, ent = triton_row_ce(teacher[0], teacher[1], q_s.detach(), k_s, with_entropy=False)
    assert ent is None
    (grad,) = torch.autograd.grad(ce.mean(), [student])
    ref = attention_ce_reference(teacher[0], teacher[1], q_s.detach(), k_s)
    (grad_ref,) = torch.autograd.grad(ref.total, [student])
    _close(ce.mean(), ref.total, what="mean CE")
    assert grad[:, :, 0].abs().max() == 0 and grad[:, :, 2].abs().max() == 0
    _close(grad, grad_ref, what="dk")


def test_gradient_of_k_only_from_strided_views_of_a_fused_qkv(kernel_interpreter):
    """q/k arrive as strided views of a fused (B, N, 3, H, d) qkv output (no copies: the kernels take any
    strides); with q frozen only k gets a gradient, as the oracle's."""
    kernel_interpreter(_check_k_only_from_a_fused_qkv)


def _check_distillation_step():
    teacher, x = peaked_teacher(depth=2), torch.randn(2, 3, 32, 32)
    assert_same_distill_step(distill_step_on("triton", teacher, x), distill_step_on("rows", teacher, x))


@pytest.mark.slow
def test_distillation_step_on_the_triton_path_equals_the_rows_path(kernel_interpreter):
    """TeacherStudent with transfer.ce_path=triton (tiny ViTs, 17 tokens, 3 heads of 16): the same per-layer CE
    and the same student gradients as the rows path."""
    kernel_interpreter(_check_distillation_step)


def _check_interpreter_refusals():
    q, k = _qk(1, 2, 20, 8, seed=7)
    with pytest.raises(ValueError, match="power of two, at least 16"):
        triton_row_ce(q, k, q, k, block_m=24)
    with pytest.raises(RuntimeError, match="needs its kernels compiled here.*before the process imports"):
        compile_for_arch(q, k, q, k)  # this process imported triton under the interpreter


def test_refusals_say_what_to_change(interpreter, monkeypatch):
    q, k = _qk(1, 2, 20, 8, seed=7)
    with pytest.raises(RuntimeError, match="ce_path=auto.*TRITON_INTERPRET=1"):
        attention_distillation_loss(q, k, q, k, path="triton")  # a CPU tensor, no interpreter
    with pytest.raises(ValueError, match="float64: use path='rows'"):
        triton_row_ce(q, k, q.double(), k.double())
    with pytest.raises(ValueError, match="whole multiple"):
        triton_row_ce(*_qk(1, 3, 20, 8, seed=1), q, k)
    interpreter(_check_interpreter_refusals)
    monkeypatch.setitem(sys.modules, "triton", None)  # as on macOS: `import triton` fails
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        triton_row_ce(q, k, q, k)


@pytest.mark.parametrize("heads_t,d_t", [(6, 64), pytest.param(12, 48, marks=pytest.mark.slow)])
def test_kernels_compile_for_an_h100_with_tensor_core_tiles(heads_t, d_t):
    """Every kernel a call launches passes Triton's compiler for sm_90 with the GPU's bf16 tiles, 64×64 (g = 1:
    the one-pass entropy and hoisted teacher tiles; g = 2 with d_t = 48 padded to 64: the grouped-entropy
    kernel), and its bf16 tile products are Hopper tensor-core instructions (wgmma)."""
    q_t, k_t = (t.bfloat16() for t in _qk(2, heads_t, 197, d_t, seed=8))
    q_s, k_s = (t.bfloat16() for t in _qk(2, 6, 197, 64, seed=9))
    kernels = compile_for_arch(q_t, k_t, q_s, k_s, arch=90)
    expected = {"_ce_fwd", "_ce_bwd_dq", "_ce_bwd_dk"} | ({"_grouped_entropy"} if heads_t > 6 else set())
    assert set(kernels) == expected
    for name, kernel in kernels.items():
        assert "wgmma" in kernel.asm["ptx"], name


if torch.cuda.is_available():  # a GPU machine (the lent H100); CI has none

    @pytest.mark.parametrize(
        "B,heads_t,heads_s,d_t,d_s,N",
        [(2, 2, 2, 8, 8, 50), (1, 4, 2, 12, 8, 40), (4, 6, 6, 64, 64, 197), (4, 12, 6, 64, 32, 785)],
    )
    def test_compiled_fp32_matches_the_oracle_on_cuda(B, heads_t, heads_s, d_t, d_s, N):
        """The compiled kernels (32×32 tiles, IEEE fp32 products) against the float64 oracle, as above."""
        _check_fp32_against_the_oracle(B, heads_t, heads_s, d_t, d_s, N, device="cuda")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", [(2, 4, 2, 16, 32, 45), (4, 12, 6, 64, 64, 197)])
    def test_compiled_half_inputs_match_the_oracle_on_cuda(dtype, shape):
        """Tensor-core tiles (bf16/fp16 operands, fp32 accumulation) against the oracle, as above."""
        _check_half_inputs(dtype, *shape, device="cuda")
