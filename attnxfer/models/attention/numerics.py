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
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

__all__ = [
    "ROW_CHUNK_ELEMENTS",
    "compute_dtype",
    "fp32_section",
    "logits_matmul",
    "row_chunk",
    "row_slices",
    "upcast",
]

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


def logits_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (same leading dims) in the compute dtype (fp32; float64 stays float64), products exact.

    bf16/fp16 operands on CUDA use the tensor cores with an fp32 output (``bmm(..., out_dtype=)``): a product
    of two bf16 numbers is exact in fp32 and the sums accumulate in fp32, so this is the fp32 matmul of the
    same values at tensor-core speed. Elsewhere (CPU has no such kernel) the operands are upcast: the same
    math, which is what the CPU tests check.
    """
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    if (
        a.is_cuda
        and a.dtype == b.dtype
        and a.dtype in (torch.bfloat16, torch.float16)
        and _bmm_has_out_dtype()
    ):
        lead = a.shape[:-2]
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=dtype)
        return out.reshape(*lead, a.shape[-2], b.shape[-1])
    return torch.matmul(a.to(dtype), b.to(dtype))


@functools.cache
def _bmm_has_out_dtype() -> bool:
    """Whether this torch has ``bmm(..., out_dtype=)`` (2.8+), probed once on the meta device."""
    x = torch.empty(1, 1, 1, dtype=torch.bfloat16, device="meta")
    try:
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


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
