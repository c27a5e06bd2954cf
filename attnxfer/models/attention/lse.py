"""Softmax attention that also returns its row log-sum-exp with a gradient: the distillation CE
``lse_s − s·⟨q_s, P̄_t K_s⟩`` then costs one more attention instead of a pass over the student's logits.

Backends: ``flex`` (CUDA: one compiled FlexAttention kernel, whose backward takes the lse's gradient; CPU
has no FlexAttention backward, and uncompiled it materialises the scores) and ``twin`` (any device: SDPA
plus the chunked `row_logsumexp`, which recomputes each chunk's logits in backward)."""

from __future__ import annotations

import functools
import inspect
from enum import StrEnum

import torch

from .numerics import compute_dtype, fp32_section, matmul_fp32, row_chunk, row_slices


class _RowLogSumExp(torch.autograd.Function):
    """lse_i = log Σ_j exp(scale · q_i·k_j), chunked over queries, recomputed in backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
        out = torch.empty(q.shape[:-1], dtype=compute_dtype(q), device=q.device)
        kt = k.transpose(-2, -1)
        for rows in row_slices(0, q.shape[-2], chunk):
            out[..., rows] = torch.logsumexp(matmul_fp32(q[..., rows, :], kt).mul_(scale), dim=-1)
        ctx.save_for_backward(q, k, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # backward may run inside the caller's autocast region: keep the recomputation fp32.
        with fp32_section(grad.device.type):
            grad = grad.float()
            q, k, lse = ctx.saved_tensors
            scale, chunk = ctx.scale, ctx.chunk
            dtype = lse.dtype
            dq = torch.empty(q.shape, dtype=dtype, device=q.device) if ctx.needs_input_grad[0] else None
            dk = torch.zeros(k.shape, dtype=dtype, device=k.device) if ctx.needs_input_grad[1] else None
            kt = k.transpose(-2, -1)
            k_c, q_c = k.to(dtype), q.to(dtype)
            for rows in row_slices(0, q.shape[-2], chunk):
                # d lse_i / d logits_ij = p_ij; weight by the incoming gradient of each row.
                z = matmul_fp32(q[..., rows, :], kt).mul_(scale)
                w = z.sub_(lse[..., rows, None]).exp_().mul_(grad[..., rows, None])
                if dq is not None:
                    dq[..., rows, :] = (w @ k_c) * scale
                if dk is not None:
                    dk += (w.transpose(-2, -1) @ q_c[..., rows, :]) * scale
            return (
                dq.to(q.dtype) if dq is not None else None,
                dk.to(k.dtype) if dk is not None else None,
                None,
                None,
            )


def row_logsumexp(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Row log-sum-exp of ``scale · q kᵀ`` (B, H, N) in fp32 with O(chunk·N) memory, also in backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with fp32_section(q.device.type):
        if q.dtype != k.dtype or not q.is_cuda:
            q, k = q.to(compute_dtype(q)), k.to(compute_dtype(q))
        return _RowLogSumExp.apply(q, k, scale, row_chunk(q, k.shape[-2], chunk))


class LSEBackend(StrEnum):
    """How `attention_with_lse` computes a softmax attention and its row log-sum-exp."""

    FLEX = "flex"  # one compiled FlexAttention kernel (CUDA)
    TWIN = "twin"  # SDPA + the chunked `row_logsumexp` (any device)


@functools.cache
def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return False
    params = inspect.signature(flex_attention).parameters
    return "return_aux" in params or "return_lse" in params


def lse_backend_for(device: torch.device | str, dropout_p: float = 0.0) -> LSEBackend:
    """The one place that picks the backend: FlexAttention on CUDA without dropout, else the twin."""
    if torch.device(device).type == "cuda" and dropout_p == 0.0 and flex_attention_available():
        return LSEBackend.FLEX
    return LSEBackend.TWIN


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (uncompiled it would build the N×N scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, compiled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.attention import flex_attention as flex

    fn = _compiled_flex() if compiled else flex.flex_attention
    if "return_aux" in inspect.signature(flex.flex_attention).parameters:
        out, aux = fn(q, k, v, scale=scale, return_aux=flex.AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, scale=scale, return_lse=True)  # torch < 2.9
