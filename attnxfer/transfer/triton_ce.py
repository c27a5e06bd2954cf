"""The distillation CE as fused Triton kernels (``_triton_ce_kernels.py``): flash-attention style, no N×N tensor.

CE_i = lse_s,i − Σ_j P̄_t,ij z_s,ij (teacher heads averaged in groups of g = H_t / H_s); dz = P_s − P̄_t.
The forward keeps an online max and sum for the student row and each teacher head, plus Σ_j e^{z_t − m_t} z_s
rescaled as m_t grows; for g = 1 the logged entropy comes from the same pass, for g > 1 (an average's
entropy has no online form) from a second, forward-only kernel. Only lse_s and lse_t are saved: O(N).
Backward uses two kernels (dq over query blocks, dk over key blocks) rather than one with atomic dq adds:
the gradients are bitwise deterministic (resume tests and debugging rely on it) at the price of one more
recompute of the logit tiles. The Function returns per-row CE, so the incoming gradient w is per row; dz
is computed from w / max|w| and max|w| multiplies at the end, so dz fits fp16 even when w = 1/n is tiny.

`triton_backend` decides where it runs: compiled for CUDA tensors, Triton's interpreter where
``TRITON_INTERPRET=1`` was set before triton was imported (the CPU tests), else a clear error. triton is
imported lazily (macOS and CPU-only torch have none). `compile_for_arch` compiles for a GPU without one.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from enum import StrEnum
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from ..errors import UserError

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.0 / math.log(2.0)


class CEPathUnavailable(UserError, RuntimeError):
    """A CE path that cannot run here; ``transfer.ce_path: auto`` skips it, a forced one stops the run."""


class TritonBackend(StrEnum):
    """How the kernels run: compiled for the GPU, or by Triton's interpreter (CPU tests)."""

    COMPILED = "compiled"
    INTERPRETED = "interpreted"


def triton_backend(device: torch.device | str) -> TritonBackend:
    """Interpreted wherever ``TRITON_INTERPRET=1`` is set, compiled for CUDA tensors, else a clear error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return TritonBackend.INTERPRETED
    if torch.device(device).type == "cuda":
        return TritonBackend.COMPILED
    raise CEPathUnavailable(
        f"the triton CE path runs compiled Triton kernels on CUDA tensors, and these are on {device}: "
        "use transfer.ce_path=auto (rows on CPU) or rows (path='rows' in Python); to run the kernels on the CPU through "
        "Triton's interpreter (slow, for tests) set TRITON_INTERPRET=1"
    )


def _require_triton() -> None:
    try:
        importlib.import_module("triton")
    except ImportError as err:
        raise CEPathUnavailable(
            f"the triton CE path needs the `triton` package, which does not import here ({err}); Linux CUDA "
            "builds of torch ship it, macOS and CPU-only builds do not: use transfer.ce_path=auto"
        ) from err


def check_triton_runs(device: torch.device | str) -> TritonBackend:
    """How the triton path runs on ``device``, or a `CEPathUnavailable` saying why it cannot."""
    _require_triton()
    return triton_backend(device)


def _kernels_for(backend: TritonBackend) -> ModuleType:
    """The kernel module, imported on first use (triton may be absent), checked to run as ``backend`` says:
    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates (triton's own library at import), so a process
    that changed it later gets this error rather than Triton's "Cannot call @triton.jit'd outside of the scope
    of a kernel"."""
    _require_triton()
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    kern = importlib.import_module("attnxfer.transfer._triton_ce_kernels")
    modes = {
        "this module's kernels": isinstance(kern._ce_fwd, InterpretedFunction),
        "triton's own library": isinstance(standard.zeros, InterpretedFunction),
    }
    wanted = backend is TritonBackend.INTERPRETED
    if any(interpreted != wanted for interpreted in modes.values()):
        found = ", ".join(f"{what} {'interpreted' if i else 'compiled'}" for what, i in modes.items())
        raise CEPathUnavailable(
            f"the triton CE path needs its kernels {backend} here, but {found}: TRITON_INTERPRET=1 must be "
            "set before the process imports triton (triton decorates its kernels and its own library at "
            "import), and not changed afterwards"
        )
    return kern


def _launch(
    backend: TritonBackend, dtype: torch.dtype, block_m: int | None, block_n: int | None
) -> tuple[int, int]:
    """Compiled, 4 warps, 2 stages: bf16/fp16 64×64 (no register spills on sm_90 with head dims up to 128,
    g ≤ 2; 128×64 spills), fp32 32×32 (64×64 spills tens of KiB per thread), by `benchmarks/ce_loss.py
    --kernels`. Interpreted: 16×16, ``tl.dot``'s least, so the CPU tests walk several blocks at small N."""
    default = 16 if backend is TritonBackend.INTERPRETED else 32 if dtype == torch.float32 else 64
    bm, bn = block_m or default, block_n or default
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value}: Triton tiles must be a power of two, at least 16")
    return bm, bn


def _pow2(n: int, least: int = 1) -> int:
    """The smallest power of two ≥ max(n, least) (``tl.arange`` lengths; 16 is ``tl.dot``'s least K)."""
    return max(least, 1 << (n - 1).bit_length())


class _Call:
    """Shapes, launch constants and the kernel module of one loss evaluation (forward and backward)."""

    def __init__(self, q_s, q_t, scale_s, scale_t, backend, blocks: tuple[int, int]):
        self.kern = _kernels_for(backend)
        self.B, self.H_s, self.N, self.d_s = q_s.shape
        self.H_t, self.d_t = q_t.shape[1], q_t.shape[-1]
        self.g = self.H_t // self.H_s
        self.scale_s = scale_s
        self.block_m, self.block_n = blocks
        self.device = q_s.device
        self.scales = dict(c_s=scale_s * _LOG2E, c_t=scale_t * _LOG2E)
        self.const = dict(
            N=self.N,
            H_S=self.H_s,
            G=self.g,
            G_PAD=_pow2(self.g),
            # ``tl.dot``'s precision for fp32 operands: IEEE (the oracle's), or TF32 where torch allows it
            PREC="tf32" if q_s.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee",
            UPCAST=backend is TritonBackend.INTERPRETED and torch.bfloat16 in (q_s.dtype, q_t.dtype),
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            num_warps=4,
            num_stages=2,
        )
        self.dims = dict(
            D_S=self.d_s, D_T=self.d_t, BLOCK_DS=_pow2(self.d_s, 16), BLOCK_DT=_pow2(self.d_t, 16)
        )

    def launch(self, name: str, grid: tuple[int, int], *args, **kwargs) -> None:
        """Run kernel ``name`` (`compile_for_arch` compiles it instead)."""
        getattr(self.kern, name)[grid](*args, **kwargs)

    def grid(self, block: int) -> tuple[int, int]:
        return (-(-self.N // block), self.B * self.H_s)  # ceil(N / block) row blocks per (batch, head)

    def rows(self) -> torch.Tensor:
        return torch.empty(self.B, self.H_s, self.N, dtype=torch.float32, device=self.device)

    def forward(self, q_s, k_s, q_t, k_t, with_entropy: bool):
        ce, lse_s = self.rows(), self.rows()
        lse_t = torch.empty(self.B, self.H_t, self.N, dtype=torch.float32, device=self.device)
        ent = self.rows() if with_entropy else None
        one_pass_entropy = with_entropy and self.g == 1
        grid = self.grid(self.block_m)
        self.launch("_ce_fwd", grid,
            q_s, k_s, q_t, k_t, ce, ent if one_pass_entropy else ce, lse_s, lse_t,
            *q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride(),
            ENTROPY=one_pass_entropy, **self.scales, **self.dims, **self.const,
        )  # fmt: skip
        if with_entropy and not one_pass_entropy:
            self.launch("_grouped_entropy", grid,
                q_t, k_t, lse_t, ent, *q_t.stride(), *k_t.stride(),
                D_T=self.d_t, c_t=self.scales["c_t"], BLOCK_DT=self.dims["BLOCK_DT"], **self.const,
            )  # fmt: skip
        return ce, ent, lse_s, lse_t

    def backward(self, grad, q_s, k_s, q_t, k_t, lse_s, lse_t, want_q: bool, want_k: bool):
        # max|w| as a device scalar (no host sync); the kernels divide by it and multiply it back at the end
        gscale = grad.abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
        args = (q_s, k_s, q_t, k_t, lse_s, lse_t, grad, gscale)
        strides = (*q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride(), *grad.stride())
        kw = dict(scale_s=self.scale_s, **self.scales, **self.dims, **self.const)
        dq = dk = None
        if want_q:
            dq = torch.empty(q_s.shape, dtype=q_s.dtype, device=self.device)
            self.launch("_ce_bwd_dq", self.grid(self.block_m), *args, dq, *strides, *dq.stride(), **kw)
        if want_k:
            dk = torch.empty(k_s.shape, dtype=k_s.dtype, device=self.device)
            self.launch("_ce_bwd_dk", self.grid(self.block_n), *args, dk, *strides, *dk.stride(), **kw)
        return dq, dk


class _TritonRowCE(torch.autograd.Function):
    """Per-row CE (B, H_s, N) with its gradient to q_s, k_s; per-row H(P̄_t) beside it (no gradient)."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, call: _Call, with_entropy: bool):
        ce, ent, lse_s, lse_t = call.forward(q_s, k_s, q_t, k_t, with_entropy)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, lse_s, lse_t)
        ctx.call = call
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return ce, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, _grad_ent):
        q_s, k_s, q_t, k_t, lse_s, lse_t = ctx.saved_tensors
        want_q, want_k = ctx.needs_input_grad[:2]
        dq, dk = ctx.call.backward(grad_ce, q_s, k_s, q_t, k_t, lse_s, lse_t, want_q, want_k)
        return dq, dk, None, None, None, None


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tl.dot`` multiplies operands of one dtype: a mixed pair (rare: fp32 q beside bf16 k) runs in fp32."""
    return (a, b) if a.dtype == b.dtype else (a.float(), b.float())


def _check(q_t, k_t, q_s, k_s) -> None:
    for name, t in (("q_t", q_t), ("k_t", k_t), ("q_s", q_s), ("k_s", k_s)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"the triton CE path takes fp32, bf16 or fp16 q/k; {name} is {t.dtype} (float64: use path='rows')"
            )
    if q_t.shape[:3] != k_t.shape[:3] or q_s.shape != k_s.shape or q_t.shape[-1] != k_t.shape[-1]:
        raise ValueError(
            f"q and k must match: teacher {tuple(q_t.shape)} vs {tuple(k_t.shape)}, "
            f"student {tuple(q_s.shape)} vs {tuple(k_s.shape)}"
        )
    if q_t.shape[0] != q_s.shape[0] or q_t.shape[2] != q_s.shape[2]:
        raise ValueError(
            f"teacher (batch, tokens) {q_t.shape[0], q_t.shape[2]} differ from the student's "
            f"{q_s.shape[0], q_s.shape[2]}: both need the same batch and token grid"
        )
    if q_t.shape[1] % q_s.shape[1]:
        raise ValueError(
            f"teacher has {q_t.shape[1]} heads, student {q_s.shape[1]}: the teacher's head count must be a "
            "whole multiple of the student's"
        )
    if len({t.device for t in (q_t, k_t, q_s, k_s)}) != 1:
        raise ValueError("teacher and student q/k must be on one device")


def triton_row_ce(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    scale_t: float | None = None,
    scale_s: float | None = None,
    with_entropy: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row CEs −Σ_j P̄_t,ij log P_s,ij (B, H_s, N) in fp32, differentiable in q_s and k_s, and
    (``with_entropy``) the teacher's detached row entropies H(P̄_t)_i; ``block_m``/``block_n``: tiles."""
    _check(q_t, k_t, q_s, k_s)
    backend = check_triton_runs(q_s.device)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else float(scale_t)
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else float(scale_s)
    q_s, k_s = _same_dtype(q_s, k_s)
    q_t, k_t = _same_dtype(q_t.detach(), k_t.detach())
    call = _Call(q_s, q_t, scale_s, scale_t, backend, _launch(backend, q_s.dtype, block_m, block_n))
    with torch.cuda.device(q_s.device) if q_s.is_cuda else contextlib.nullcontext():
        return _TritonRowCE.apply(q_s, k_s, q_t, k_t, call, with_entropy)


class _Compile(_Call):
    """A `_Call` whose launches compile the kernel for a GPU architecture instead of running it."""

    def __init__(self, *args, arch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.arch = arch
        self.compiled: dict = {}

    def launch(self, name: str, grid: tuple[int, int], *args, **kwargs) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile, make_backend
        from triton.runtime.jit import create_function_from_signature

        fn = getattr(self.kern, name)
        target = GPUTarget("cuda", self.arch, 32)
        backend = make_backend(target)
        # the argument specialisation a real launch makes (dtypes, 16-byte alignment, ints equal to 1)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        src = ASTSource(fn, signature, constexprs, attrs)
        self.compiled[name] = compile(src, target=target, options=options.__dict__)


def compile_for_arch(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    arch: int = 90,
    with_entropy: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> dict:
    """{kernel name: triton CompiledKernel} of every kernel `triton_row_ce` would launch on these inputs,
    compiled (not run) for CUDA capability ``arch`` without a GPU: how the CPU tests check the compiled form,
    which the interpreter never exercises. Uses triton 3.x's launch-time specialisation internals."""
    _check(q_t, k_t, q_s, k_s)
    scale_t, scale_s = q_t.shape[-1] ** -0.5, q_s.shape[-1] ** -0.5
    blocks = _launch(TritonBackend.COMPILED, q_s.dtype, block_m, block_n)
    call = _Compile(q_s, q_t, scale_s, scale_t, TritonBackend.COMPILED, blocks, arch=arch)
    ce, _, lse_s, lse_t = call.forward(q_s, k_s, q_t, k_t, with_entropy)
    call.backward(torch.ones_like(ce), q_s, k_s, q_t, k_t, lse_s, lse_t, True, True)
    return call.compiled
