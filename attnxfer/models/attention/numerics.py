"""Numerics shared by every attention and every attention loss: fp32 sections and row chunks.

* **fp32 sections.** Softmax, log-sum-exp, kernel feature maps and their normalisers overflow or lose
  the tail in fp16/bf16 (the field's most reported failure), so they run with autocast off, in
  `compute_dtype`: fp32 for every input dtype except float64, which stays float64 so tests can
  compare at 1e-10.
* **Row chunks.** Anything that needs rows of an N×N map (the loss's log-sum-exp, implicit maps of
  the zoo, their losses) builds them a chunk of query rows at a time. One budget sizes every chunk:
  `ROW_CHUNK_ELEMENTS` elements per (B, H, rows, N) tensor, 16M = 64 MiB in fp32. A caller that
  keeps several such tensors alive per chunk says how many (``live_tensors``), so its peak stays
  near the budget whatever it computes.
* **bf16 operands, fp32 accumulation** (the zoo on GPU): each zoo attention declares a `PrecisionPolicy`;
  `operand_dtype` decides per call (CUDA, bf16 inputs or autocast, a policy that allows it; the CPU only
  inside `bf16_devices`), and every sum of a bf16 core goes through `matmul_fp32` / `sum_fp32`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

#: Elements of one (B, H, rows, N) tensor in a row chunk: 16M fp32 = 64 MiB.
ROW_CHUNK_ELEMENTS = 1 << 24


def fp32_section(device_type: str) -> torch.autocast:
    """Autocast off: what runs inside keeps its inputs' (upcast) dtype instead of dropping to fp16/bf16."""
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
    """Query rows per chunk for rows of ``q``'s (B, H, N, ·) against ``n_keys`` keys.

    ``chunk`` (an explicit choice, >= 1) wins; otherwise as many rows as keep each of ``live_tensors``
    (B, H, rows, n_keys) tensors within ``budget`` elements (default `ROW_CHUNK_ELEMENTS`), at least one
    row, at most all of them.
    """
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return int(chunk)
    per_row = max(1, q.shape[0] * q.shape[1] * n_keys * max(1, live_tensors))
    return max(1, min(q.shape[-2], budget // per_row))


def row_slices(start: int, stop: int, step: int) -> Iterator[slice]:
    """``slice(s, min(s + step, stop))`` for s = start, start + step, ... < stop."""
    for s in range(start, stop, step):
        yield slice(s, min(s + step, stop))


# ---------------------------------------------------------------------------------------------------------
# Reduced precision for the efficient-attention zoo: bf16 operands, fp32 accumulation.
#
# A zoo core declares a `PrecisionPolicy` (which of its parts may take bf16 operands). `operand_dtype` is the
# one place that decides, per call, whether a core runs its declared parts in bf16: on a device listed in
# `bf16_devices` (CUDA; the CPU only when asked, e.g. by a test), for bf16 inputs or bf16 autocast, and only
# for attentions whose policy allows it. Everything a bf16 core sums runs through `matmul_fp32` /
# `sum_fp32`: fp32 accumulation and an fp32 result whatever the operand dtype. fp16 is never used: a
# key/value sum over thousands of tokens leaves fp16's range (65504) before it is rounded to an operand.


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which parts of an attention core may take bf16 operands, and which always run in fp32.

    ``bf16`` names the parts whose *operands* may be bf16 (their sums still accumulate in fp32); ``fp32`` the
    parts that run in fp32 whatever the input (normalisers, key/value sums, divisions, exponentials of large
    arguments, pseudo-inverses); ``why`` says what decided it. An empty ``bf16`` keeps the whole core in fp32.
    """

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
    """Inside the block, zoo cores take bf16 operands on these device types (default outside: CUDA only).

    ``with bf16_devices("cpu", "cuda"):`` lets a CPU test (or a CPU user with bf16 inputs) run the bf16 path
    that a GPU runs; its fp32 accumulation goes through the CPU twin of `matmul_fp32`.
    """
    global _bf16_devices
    saved, _bf16_devices = _bf16_devices, frozenset(device_types)
    try:
        yield
    finally:
        _bf16_devices = saved


def operand_dtype(t: torch.Tensor, policy: PrecisionPolicy) -> torch.dtype:
    """The dtype of a zoo core's operands for an input like ``t``: bf16 where ``policy`` allows it, ``t``'s
    device is in `bf16_devices`, and ``t`` is bf16 or bf16 autocast is on for its device; else the compute
    dtype (fp32, float64 kept). The one place that decides."""
    device = t.device.type
    if policy.uses_bf16 and device in _bf16_devices:
        autocast_bf16 = (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        )
        if t.dtype == torch.bfloat16 or (autocast_bf16 and t.dtype == torch.float32):
            return torch.bfloat16
    return compute_dtype(t)


def in_compute_dtype(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` evaluated in the compute dtype (fp32), its result rounded once to ``x``'s dtype: for feature
    maps whose bf16 evaluation loses accuracy (exp of a rounded argument, elu(x) + 1 near -1). A no-op
    cast for fp32 / float64 inputs."""
    return fn(x.to(compute_dtype(x))).to(x.dtype)


def sum_fp32(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """``x.sum(dim)`` accumulated and returned in the compute dtype (fp32; float64 kept)."""
    return x.sum(dim=dim, keepdim=keepdim, dtype=compute_dtype(x))


def split_bf16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (fp32) as hi + lo, both bf16: hi carries 8 significant bits, lo the next 8, so hi + lo equals
    ``w`` to about 2^-17 relative. x @ hi + x @ lo with fp32 accumulation is then an fp32-accurate product
    for bf16 ``x`` at bf16 matmul speed (two bf16 GEMMs instead of one fp32 GEMM)."""
    hi = w.to(torch.bfloat16)
    return hi, (w - hi.to(w.dtype)).to(torch.bfloat16)


def _fp32_out_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(batch, n, k) @ (batch, k, m) with an fp32 result: ``bmm(..., out_dtype=float32)`` (on CUDA: bf16
    tensor cores, fp32 accumulation; torch 2.14 has it for CUDA and meta tensors, not the CPU), and on the
    CPU (or a torch without it) its twin (operands upcast: products of bf16 values are exact in fp32, so the
    twin computes the same sums)."""
    if a.device.type == "cpu" or not _bmm_has_out_dtype():
        return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b, out_dtype=torch.float32)


@functools.cache
def _bmm_has_out_dtype() -> bool:
    """Whether this torch has ``bmm(..., out_dtype=)`` (2.8+), probed once on the meta device."""
    x = torch.empty(1, 1, 1, dtype=torch.bfloat16, device="meta")
    try:
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class _MatmulFP32Out(torch.autograd.Function):
    """bf16 x bf16 -> fp32 batched matmul with a backward (``bmm.dtype`` has no derivative in torch 2.14).
    The gradients are computed the same way (bf16 operands, fp32 accumulation) and returned in the
    operands' dtype, as autocast's bf16 matmul would."""

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
    """``a @ b`` for bf16 (..., n, k) and (..., k, m) with broadcast batch dims, as one fp32-result batched
    matmul (`_MatmulFP32Out`): the GPU path of `matmul_fp32`, public so its shapes can be checked on meta
    tensors and its gradient against the fp32 product on CPU."""
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, n, k).reshape(-1, n, k)
    b3 = b.expand(*batch, k, m).reshape(-1, k, m)
    return _MatmulFP32Out.apply(a3, b3).view(*batch, n, m)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated in fp32 with an fp32 result (float64 kept), whatever the operand dtypes.

    bf16 operands on CUDA: `bmm_fp32_out` (tensor cores, fp32 accumulation, fp32 output: sums over
    thousands of tokens never pass through bf16). Elsewhere the operands are upcast, which for bf16 values is
    exact, so the CPU computes the GPU's math. fp32 operands: the plain product, unchanged.
    """
    if a.dtype == b.dtype == torch.bfloat16 and a.device.type == "cuda":
        return bmm_fp32_out(a, b)
    dtype = torch.promote_types(compute_dtype(a), compute_dtype(b))
    return a.to(dtype) @ b.to(dtype)


def matmul_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` at fp32 accuracy for a bf16 ``a`` and an fp32 ``b`` that must not be rounded (it feeds an
    exponential): ``b`` is split into bf16 halves (`split_bf16`) and ``a @ hi + a @ lo`` accumulated in
    fp32. Two bf16 products instead of one fp32 product; for fp32 / float64 ``a``, the plain product."""
    if a.dtype != torch.bfloat16:
        return matmul_fp32(a, b)
    hi, lo = split_bf16(b.to(compute_dtype(b)))
    high, low = matmul_fp32(a, hi), matmul_fp32(a, lo)
    return high.add_(low) if not high.requires_grad else high + low


def matmul_split_left(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`matmul_split` with the roles swapped: ``a @ b`` for an fp32 ``a`` that must not be rounded and a bf16
    ``b`` (``hi @ b + lo @ b``, fp32 accumulation), so a caller keeps the product in its natural layout
    instead of transposing ``(bᵀ aᵀ)ᵀ`` (a strided softmax over it costs a copy). For fp32 / float64 ``b``,
    the plain product."""
    if b.dtype != torch.bfloat16:
        return matmul_fp32(a, b)
    hi, lo = split_bf16(a.to(compute_dtype(a)))
    high, low = matmul_fp32(hi, b), matmul_fp32(lo, b)
    return high.add_(low) if not high.requires_grad else high + low
