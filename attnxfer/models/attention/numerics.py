"""Numerics shared by every attention and attention loss: fp32 sections (softmax, log-sum-exp and kernel
normalisers overflow or lose the tail in fp16/bf16), row chunks of N×N maps under one element budget, and
the zoo's bf16-operand, fp32-accumulation policy."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

#: Elements of one (B, H, rows, N) tensor in a row chunk: 16M fp32 = 64 MiB.
ROW_CHUNK_ELEMENTS = 1 << 24


def fp32_section(device_type: str) -> torch.autocast:
    """Autocast off: what runs inside keeps its inputs' (upcast) dtype."""
    return torch.autocast(device_type=device_type, enabled=False)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for every input dtype except float64 (kept so tests can compare at 1e-10)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their compute dtype. q/k/v stay strided views of the qkv output: a contiguous copy
    was measured ~1.3x faster for the kernel cores on one CPU thread but costs 3 N C floats of peak
    memory, more than the whole kernel core needs."""
    return tuple(t.to(compute_dtype(t)) for t in tensors)


def row_chunk(
    q: torch.Tensor,
    n_keys: int,
    chunk: int | None = None,
    *,
    live_tensors: int = 1,
    budget: int = ROW_CHUNK_ELEMENTS,
) -> int:
    """Query rows per chunk against ``n_keys`` keys: ``chunk``, else as many as ``budget`` holds."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return int(chunk)
    per_row = max(1, q.shape[0] * q.shape[1] * n_keys * max(1, live_tensors))
    return max(1, min(q.shape[-2], budget // per_row))


def row_slices(start: int, stop: int, step: int) -> Iterator[slice]:
    for s in range(start, stop, step):
        yield slice(s, min(s + step, stop))


# Reduced precision for the zoo: bf16 operands, fp32 accumulation. fp16 is never used: a key/value sum over
# thousands of tokens leaves fp16's range (65504) before it is rounded to an operand.


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which parts of an attention core may take bf16 operands (their sums still accumulate in fp32), which
    always run in fp32, and ``why``; an empty ``bf16`` keeps the whole core in fp32."""

    bf16: tuple[str, ...] = ()
    fp32: tuple[str, ...] = ()
    why: str = ""

    @property
    def uses_bf16(self) -> bool:
        return bool(self.bf16)


#: The default for an attention that declares nothing: the whole core in fp32 (DESIGN.md: features run in
#: bf16 only where a test shows it safe).
FP32_CORE = PrecisionPolicy(
    fp32=("the whole core",), why="no bf16 policy declared: fp32 until a test shows bf16 safe"
)

_bf16_devices: frozenset[str] = frozenset({"cuda"})


@contextlib.contextmanager
def bf16_devices(*device_types: str) -> Iterator[None]:
    """Inside the block, zoo cores take bf16 operands on these device types (outside: CUDA only)."""
    global _bf16_devices
    saved, _bf16_devices = _bf16_devices, frozenset(device_types)
    try:
        yield
    finally:
        _bf16_devices = saved


def operand_dtype(t: torch.Tensor, policy: PrecisionPolicy) -> torch.dtype:
    """The dtype of a zoo core's operands for ``t``: bf16 where ``policy`` allows it, the device is in
    `bf16_devices` and ``t`` is bf16 or under bf16 autocast; else the compute dtype."""
    device = t.device.type
    if policy.uses_bf16 and device in _bf16_devices:
        autocast_bf16 = (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        )
        if t.dtype == torch.bfloat16 or (autocast_bf16 and t.dtype == torch.float32):
            return torch.bfloat16
    return compute_dtype(t)


def in_compute_dtype(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` in the compute dtype, rounded once to ``x``'s: for feature maps whose bf16 evaluation loses
    accuracy (exp of a rounded argument, elu(x) + 1 near -1)."""
    return fn(x.to(compute_dtype(x))).to(x.dtype)


def sum_fp32(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    return x.sum(dim=dim, keepdim=keepdim, dtype=compute_dtype(x))


def split_bf16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (fp32) as bf16 hi + lo (8 significant bits each, ~2^-17 relative): x @ hi + x @ lo is then an
    fp32-accurate product for bf16 ``x`` at bf16 matmul speed."""
    hi = w.to(torch.bfloat16)
    return hi, (w - hi.to(w.dtype)).to(torch.bfloat16)


def _fp32_out_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(batch, n, k) @ (batch, k, m) with an fp32 result: ``bmm(..., out_dtype=float32)`` on CUDA, else its
    twin on upcast operands (products of bf16 values are exact in fp32: the same sums)."""
    if a.device.type == "cpu" or not _bmm_has_out_dtype():
        return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b, out_dtype=torch.float32)


@functools.cache
def _bmm_has_out_dtype() -> bool:
    x = torch.empty(1, 1, 1, dtype=torch.bfloat16, device="meta")
    try:
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class _MatmulFP32Out(torch.autograd.Function):
    """bf16 x bf16 -> fp32 batched matmul with a backward (``bmm.dtype`` has no derivative in torch 2.14),
    gradients computed the same way and returned in the operands' dtype."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _fp32_out_kernel(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = _fp32_out_kernel(grad, b.transpose(-2, -1)).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = _fp32_out_kernel(a.transpose(-2, -1), grad).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def bmm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for bf16 operands as one fp32-result batched matmul: the GPU path of `matmul_fp32`."""
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, n, k).reshape(-1, n, k)
    b3 = b.expand(*batch, k, m).reshape(-1, k, m)
    return _MatmulFP32Out.apply(a3, b3).view(*batch, n, m)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated in fp32 with an fp32 result (float64 kept): `bmm_fp32_out` for bf16 on CUDA,
    else on upcast operands (exact for bf16 values, so the CPU computes the GPU's math)."""
    if a.dtype == b.dtype == torch.bfloat16 and a.device.type == "cuda":
        return bmm_fp32_out(a, b)
    dtype = torch.promote_types(compute_dtype(a), compute_dtype(b))
    return a.to(dtype) @ b.to(dtype)


def matmul_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` at fp32 accuracy for a bf16 ``a`` and an fp32 ``b`` that must not be rounded (it feeds an
    exponential): ``a @ hi + a @ lo`` over `split_bf16` halves."""
    if a.dtype != torch.bfloat16:
        return matmul_fp32(a, b)
    hi, lo = split_bf16(b.to(compute_dtype(b)))
    high, low = matmul_fp32(a, hi), matmul_fp32(a, lo)
    return high.add_(low) if not high.requires_grad else high + low


def matmul_split_left(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`matmul_split` with the roles swapped, so a caller keeps the product in its natural layout (a strided
    softmax over ``(bᵀ aᵀ)ᵀ`` costs a copy)."""
    if b.dtype != torch.bfloat16:
        return matmul_fp32(a, b)
    hi, lo = split_bf16(a.to(compute_dtype(a)))
    high, low = matmul_fp32(hi, b), matmul_fp32(lo, b)
    return high.add_(low) if not high.requires_grad else high + low
