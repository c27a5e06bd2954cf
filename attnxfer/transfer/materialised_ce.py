"""The ``materialised`` CE path: both N×N maps built and autograd through them, as the reference code does,
and what its maps cost in memory (`materialised_bytes`, which `attnxfer.transfer.ce_select` compares with
its budget before timing the path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..models.attention.numerics import compute_dtype, fp32_section as _fp32, matmul_fp32
from .row_ce import grouped_mean


def half_on_accelerator(*tensors: torch.Tensor) -> bool:
    """bf16/fp16 tensors of one dtype on CUDA: SDPA then runs its flash kernel (fp32 accumulation inside,
    a rounded output); everything else is upcast to the compute dtype."""
    dtype = tensors[0].dtype
    return all(t.is_cuda and t.dtype == dtype for t in tensors) and dtype in (torch.bfloat16, torch.float16)


class ScaledLogits(torch.autograd.Function):
    """s·q kᵀ in fp32 whose backward stays fp32 too: autograd's matmul backward would follow an autocast
    region that encloses ``backward()`` and round dq, dk through bf16 products."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        ctx.scale = scale
        return matmul_fp32(q, k.transpose(-2, -1)).mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k = ctx.saved_tensors
        with _fp32(grad.device.type):
            g = grad.to(compute_dtype(grad)) * ctx.scale
            dq = matmul_fp32(g, k).to(q.dtype) if ctx.needs_input_grad[0] else None
            dk = matmul_fp32(g.transpose(-2, -1), q).to(k.dtype) if ctx.needs_input_grad[1] else None
        return dq, dk, None


def materialised_ce(
    q_t, k_t, q_s, k_s, scale_t: float, scale_s: float, with_kl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE, its detached KL or None) by the ``materialised`` path: P̄_t and the student's logits as N×N tensors, the CE by torch's
    cross-entropy with probability targets (its log-softmax and backward in one kernel each), autograd
    through the maps. What the reference code does; fastest where the maps are small and the device's
    GEMMs dominate, and its memory grows as N² per distilled layer (`materialised_bytes`)."""
    if not half_on_accelerator(q_t, k_t, q_s, k_s):  # bf16 on CUDA: tensor-core GEMMs, fp32 logits
        dtype = compute_dtype(q_s)
        q_t, k_t, q_s, k_s = q_t.to(dtype), k_t.to(dtype), q_s.to(dtype), k_s.to(dtype)
    groups = q_t.shape[1] // q_s.shape[1]
    with torch.no_grad():
        p_t = grouped_mean(torch.softmax(matmul_fp32(q_t, k_t.transpose(-2, -1)).mul_(scale_t), -1), groups)
    z_s = ScaledLogits.apply(q_s, k_s, scale_s)
    N = z_s.shape[-1]
    ce = F.cross_entropy(z_s.reshape(-1, N), p_t.reshape(-1, N))
    return ce, (ce.detach() + torch.special.xlogy(p_t, p_t).sum(-1).mean()) if with_kl else None


def materialised_bytes(batch: int, tokens: int, student_heads: int, teacher_heads: int, layers: int) -> int:
    """Bytes the ``materialised`` path's maps take at a step's peak with ``layers`` distilled softmax layers."""
    # N×N fp32 maps: two kept per distilled layer until backward (P̄_t, the student's log-softmax), plus three
    # transient ones of one layer (the teacher's logits before the head-group mean, the student's, their gradient)
    per_map = 4 * batch * tokens * tokens
    kept = 2 * student_heads * layers
    return per_map * (kept + 3 * max(student_heads, teacher_heads))
