"""Attention-transfer losses, computed without N×N maps.

For one layer with teacher map P_t = softmax(s_t q_t k_tᵀ) and student map
P_s = softmax(s_s q_s k_sᵀ), the paper's loss is the row cross-entropy
``CE = mean_{b,h,i} −Σ_j P_t[i,j] log P_s[i,j]``. Because rows of P_t sum to 1,

    CE_i = lse_s,i − s_s · ⟨q_s,i, (P_t K_s)_i⟩,

where ``P_t K_s = SDPA(q_t, k_t, v=k_s)`` (flash/SDPA, O(N) memory, gradient to
k_s through SDPA's value path) and ``lse_s`` is the student's row log-sum-exp,
computed in chunks by `row_logsumexp`, whose backward recomputes each chunk's
logits instead of keeping them. ``KL = CE − H(P_t)`` is reported beside it.
Everything runs in fp32 whatever the surrounding autocast.

Five exact evaluations of the same loss (`CEPath`); a run measures them on its device
(`attnxfer.transfer.ce_select`, ``transfer.ce_path: auto``), `ce_path_for` is the unmeasured default:

* ``rows`` (CPU): one autograd Function that walks query-row chunks once, computing both rows' logits,
  the CE's sum and (for the logged KL) H(P̄_t) from the same chunk, and, because a scalar's gradient is
  linear in the incoming one, the gradient itself: dz = P_s − P̄_t, dq ∝ dz K_s, dk ∝ dzᵀ Q_s. Four
  N²d matmuls per layer, as autograd of the materialised maps does, without the maps; backward only
  scales dq, dk.
* ``sdpa`` (accelerators): P̄_t K_s through SDPA's fused kernel, lse_s by `row_logsumexp` (chunked,
  logits on the tensor cores for bf16 inputs, recomputed in backward).
* ``attention_lse``: as ``sdpa``, but lse_s comes with its gradient from the student's own attention
  kernel (FlexAttention on CUDA, `attnxfer.models.attention.lse`): the loss then costs one more
  attention, P̄_t K_s.
* ``triton`` (CUDA, chosen explicitly until measured): fused Triton kernels with an online softmax of both
  rows, flash-attention style (`attnxfer.transfer.triton_ce`): no N×N tensor, every tile product on the
  tensor cores, the logged entropy from the same pass (one teacher head per student head).
* ``materialised``: the reference code's way, both N×N maps built and autograd through them; memory
  N² per distilled layer (`materialised_bytes`), so ``auto`` times it only within a memory budget.

`attention_ce_reference` materialises both maps too, written out plainly: it is the oracle for tests and
the "distill_ref" line of the benchmarks, never the training path.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..models.attention import sdpa
from ..models.attention.bias_rows import BiasRows
from ..models.attention.lse import row_logsumexp

# fp32 sections and row chunks (one chunk of logits B·H·rows·N within the shared 64 MiB budget)
from ..models.attention.numerics import compute_dtype, matmul_fp32, row_slices
from ..models.attention.numerics import fp32_section as _fp32
from ..models.attention.numerics import row_chunk as _auto_chunk
from .triton_ce import triton_row_ce

__all__ = [
    "CE_PATHS",
    "AttentionLoss",
    "CEPath",
    "attention_ce_reference",
    "attention_distillation_loss",
    "biased_attention_ce",
    "ce_path_for",
    "group_heads_ok",
    "materialised_bytes",
    "padding_from_mask",
    "row_logsumexp",
    "teacher_entropy",
]


def _grouped_mean(p: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_t, r, N) -> (B, H_t / groups, r, N): teacher heads averaged in consecutive groups."""
    if groups == 1:
        return p
    B, H, r, N = p.shape
    return p.reshape(B, H // groups, groups, r, N).mean(2)


class _FusedRowCE(torch.autograd.Function):
    """Mean CE = −Σ_j P̄_t log P_s (and the logged mean H(P̄_t)) with its gradient, in ONE pass over row chunks.

    A scalar loss's gradient is linear in the incoming gradient g, so forward also computes, chunk by chunk,
    dz = P_s − P̄_t and from it dq = (s/n)·dz k_s and dk = (s/n)·dzᵀ q_s (n = B·H_s·N rows); backward only
    scales them by g. Per layer that is four N²d matmuls (two logits, two gradient products), the count of
    the materialised autograd graph, without its two N×N maps: memory is one chunk of logits plus dq, dk
    (the size of q_s, k_s; the teacher's q/k are not kept). Keys may be fewer than queries (N_k ≠ N_q:
    PVTv2's spatial reduction, Twins' sub-sampled global attention): rows are N_q, columns N_k. The
    earlier row path recomputed every chunk in backward: six matmuls. ``want_q``/``want_k`` come from the caller: ``ctx.needs_input_grad`` ignores
    ``torch.no_grad()``, and evaluation must not pay for gradients.
    """

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, scale_s, scale_t, chunk, entropy, want_q, want_k, keep_half):
        B, H, N, _ = q_s.shape
        M = k_s.shape[-2]  # keys: N_k may differ from N_q (spatial-reduction / sub-sampled keys)
        groups = q_t.shape[1] // H
        n = B * H * N  # rows averaged over
        dtype = compute_dtype(q_s)
        # Contiguous once (q/k arrive as strided views of a fused qkv output; a matmul would copy them per
        # chunk). fp32: the logit scales fold into q (N·d multiplies instead of N² per chunk). keep_half:
        # bf16 operands stay bf16 for the tensor cores and the fp32 logits are scaled instead (s·q in bf16
        # would round).
        if keep_half:
            qs, ks, qt, kt = (t.contiguous() for t in (q_s, k_s, q_t, k_t))
            post_s, post_t, q_scale = scale_s, scale_t, scale_s
        else:
            qs, ks = _scaled_contiguous(q_s.to(dtype), scale_s), k_s.to(dtype).contiguous()
            qt, kt = _scaled_contiguous(q_t.to(dtype), scale_t), k_t.to(dtype).contiguous()
            post_s = post_t = None
            q_scale = 1.0  # already in qs
        ks_T, kt_T = ks.transpose(-2, -1), kt.transpose(-2, -1)
        # The value sums B·H·N² terms: each row's N in fp32, the rows in float64 (one fp32 dot over a whole
        # chunk erred by 4e-6 relative at N = 785, 60x the materialised reference; now 3e-8, its order)
        ce, ent = (
            torch.zeros((), dtype=torch.float64, device=qs.device),
            torch.zeros((), dtype=torch.float64, device=qs.device),
        )
        dq = torch.empty(qs.shape, dtype=dtype, device=qs.device) if want_q else None
        dk = torch.empty(ks.shape, dtype=dtype, device=ks.device) if want_k else None
        # (B·H, N, ·) fp32 views for the gradient products: scaled and accumulated inside the GEMMs
        qs3, ks3 = qs.to(dtype).view(B * H, N, -1), ks.to(dtype).view(B * H, M, -1)
        for i, rows in enumerate(row_slices(0, N, chunk)):
            z_t = matmul_fp32(qt[..., rows, :], kt_T)
            z_s = matmul_fp32(qs[..., rows, :], ks_T)
            p_t = _grouped_mean(torch.softmax(z_t if post_t is None else z_t.mul_(post_t), dim=-1), groups)
            log_p_s = torch.log_softmax(z_s if post_s is None else z_s.mul_(post_s), dim=-1)
            ce -= torch.linalg.vecdot(p_t, log_p_s).sum(dtype=torch.float64)  # fp32 within a row
            if entropy:
                ent -= torch.special.xlogy(p_t, p_t).sum(dtype=torch.float64)
            if dq is None and dk is None:
                continue
            dz = log_p_s.exp_().sub_(p_t).view(B * H, -1, M)  # P_s − P̄_t: d CE_i / d logits_i
            if dq is not None:  # dq = (s/n)·dz K_s
                part = dq.view(B * H, N, -1)[:, rows]
                torch.baddbmm(part, dz, ks3, beta=0, alpha=scale_s / n, out=part)
            if dk is not None:  # dk = (s/n)·dzᵀ Q_s, summed over chunks
                dk3 = dk.view(B * H, M, -1)
                torch.baddbmm(
                    dk3, dz.transpose(1, 2), qs3[:, rows], beta=int(i > 0), alpha=q_scale / n, out=dk3
                )
        ctx.save_for_backward(*(t for t in (dq, dk) if t is not None))
        ctx.has = (dq is not None, dk is not None)
        ctx.dtypes = (q_s.dtype, k_s.dtype)
        ctx.mark_non_differentiable(ent)
        return (ce / n).to(dtype), (ent / n).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, _grad_ent):
        saved = iter(ctx.saved_tensors)
        dq = (next(saved) * grad_ce).to(ctx.dtypes[0]) if ctx.has[0] else None
        dk = (next(saved) * grad_ce).to(ctx.dtypes[1]) if ctx.has[1] else None
        return dq, dk, None, None, None, None, None, None, None, None, None


def _scaled_contiguous(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale`` as a new contiguous tensor in one pass (``(t * scale).contiguous()`` takes two for a
    strided ``t``: elementwise results keep their input's layout)."""
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))


#: Elements of one (B, H_t, rows, N) logits block of the ``rows`` path on CPU: 512K fp32 = 2 MiB, about a
#: core's L2 (each block is touched several times). Measured on this project's 2-core CPU at N = 785
#: (B·H = 6, loss forward + backward, one thread, the earlier recompute-in-backward form):
#: 785-row chunks 214 ms, 128 rows 192 ms, 64 rows 179 ms, 32 rows 207 ms.
ROWS_PATH_ELEMENTS = 1 << 19


def rows_path_chunk(q: torch.Tensor, n_keys: int, chunk: int | None = None) -> int:
    """Query rows per chunk of the ``rows`` path: cache-sized blocks on CPU; on accelerators the shared
    64 MiB budget for the (B, H, rows, N) fp32 blocks alive at once (both logits, P_t, log P_s and a
    group average: fewer, larger kernels)."""
    if q.device.type == "cpu":
        return _auto_chunk(q, n_keys, chunk, budget=ROWS_PATH_ELEMENTS)
    return _auto_chunk(q, n_keys, chunk, live_tensors=5)


class CEPath(StrEnum):
    """How `attention_distillation_loss` evaluates the exact CE."""

    ROWS = "rows"  # one pass over row chunks computes CE and its gradient: fastest on CPU
    SDPA = "sdpa"  # P̄_t K_s through SDPA's fused kernel, lse_s by the chunked `row_logsumexp`
    ATTENTION_LSE = "attention_lse"  # P̄_t K_s through SDPA, lse_s from the student's own attention kernel
    TRITON = "triton"  # fused Triton kernels, online softmax of both rows (CUDA; TRITON_INTERPRET=1 on CPU)
    MATERIALISED = "materialised"  # the reference's way: both N×N maps built, autograd through them

    @property
    def needs_cuda(self) -> bool:
        """The path runs its kernels only on CUDA (Triton's interpreter aside)."""
        return self is CEPath.TRITON

    @property
    def builds_maps(self) -> bool:
        """The path holds N×N maps per distilled layer until backward: `materialised_bytes` says how much."""
        return self is CEPath.MATERIALISED

    @property
    def needs_student_lse(self) -> bool:
        """The student layer must hand out its log-sum-exp (`AttentionIO.return_lse`)."""
        return self is CEPath.ATTENTION_LSE


CE_PATHS = tuple(CEPath)


def ce_path_for(device: torch.device | str) -> CEPath:
    """The CE evaluation for a device when nothing was measured (a `DualViT` built without ``ce_path``, an
    evaluation): ``rows`` on CPU (measured fastest there, docs/benchmarks.md), ``sdpa`` elsewhere. Training
    runs measure instead (``transfer.ce_path: auto``, `attnxfer.transfer.ce_select`)."""
    return CEPath.ROWS if torch.device(device).type == "cpu" else CEPath.SDPA


class AttentionLoss(NamedTuple):
    """One layer's attention-distillation loss (CE, differentiable) and KL (detached, for logging)."""

    ce: torch.Tensor
    kl: torch.Tensor | None


def group_heads_ok(teacher_heads: int, student_heads: int) -> bool:
    """Distillation needs equal heads or a teacher with a whole multiple of the student's."""
    return teacher_heads >= student_heads and teacher_heads % student_heads == 0


def _check_shapes(q_t, k_t, q_s, k_s):
    if q_t.dim() != 4 or q_s.dim() != 4:
        raise ValueError("attention tensors must be (batch, heads, tokens, head_dim)")
    if q_t.shape[0] != q_s.shape[0]:
        raise ValueError(f"batch sizes differ: teacher {q_t.shape[0]}, student {q_s.shape[0]}")
    if q_t.shape[-2] != q_s.shape[-2] or k_t.shape[-2] != k_s.shape[-2]:
        raise ValueError(
            f"token counts differ: teacher {q_t.shape[-2]}, student {q_s.shape[-2]}; "
            "teacher and student need the same image size, patch size and prefix tokens"
        )
    if not group_heads_ok(q_t.shape[1], q_s.shape[1]):
        raise ValueError(
            f"teacher has {q_t.shape[1]} heads, student {q_s.shape[1]}: the teacher's head count must equal "
            "or be a whole multiple of the student's (its maps are then averaged in groups)"
        )


def _teacher_times(q_t, k_t, values, scale_t):
    """(P̄_t V): the teacher's map (head groups averaged) applied to ``values``, via SDPA."""
    groups = q_t.shape[1] // values.shape[1]
    if groups > 1:
        values = values.repeat_interleave(groups, dim=1)
    out = sdpa(q_t, k_t, values, scale=scale_t)
    if groups > 1:
        B, _, N, d = out.shape
        out = out.reshape(B, -1, groups, N, d).mean(dim=2)
    return out


@torch.no_grad()
def teacher_entropy(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    student_heads: int | None = None,
    scale_t: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Row entropies H(P̄_t) (B, H_s, N) in fp32, head groups averaged first."""
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    with _fp32(q_t.device.type):
        q_t, k_t = q_t.float(), k_t.float()
        heads = q_t.shape[1]
        student_heads = heads if student_heads is None else student_heads
        if student_heads == heads:
            # H_i = lse_i − s⟨q_i, (P K)_i⟩: no map needed.
            lse = row_logsumexp(q_t, k_t, scale_t, chunk)
            pk = F.scaled_dot_product_attention(q_t, k_t, k_t, scale=scale_t)
            return lse - scale_t * (q_t * pk).sum(-1)
        groups = heads // student_heads
        step = _auto_chunk(q_t, k_t.shape[-2], chunk)
        B, _, N, _ = q_t.shape
        out = q_t.new_empty(B, student_heads, N)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            p = torch.softmax((q_t[..., rows, :] @ k_t.transpose(-2, -1)) * scale_t, dim=-1)
            p = p.reshape(B, student_heads, groups, p.shape[-2], p.shape[-1]).mean(2)
            out[..., rows] = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
        return out


def attention_distillation_loss(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    scale_t: float | None = None,
    scale_s: float | None = None,
    chunk: int | None = None,
    with_kl: bool = True,
    path: CEPath | str | None = None,
    lse_s: torch.Tensor | None = None,
) -> AttentionLoss:
    """Mean row cross-entropy −Σ_j P_t log P_s over (batch, head, query), O(N) memory.

    Args:
        q_t, k_t: teacher queries/keys (B, H_t, N, d_t); no gradient flows into them.
        q_s, k_s: student queries/keys (B, H_s, N, d_s); H_t must be a multiple of H_s
            (teacher heads ``h·g … h·g+g−1`` are averaged into student head ``h``).
        scale_t, scale_s: logit scales, default ``d^-0.5`` (timm's).
        chunk: query rows per chunk (default: `rows_path_chunk` / the shared 64 MiB budget).
        with_kl: also return the detached KL = CE − H(P̄_t).
        path: one of `CE_PATHS`; default `ce_path_for` the inputs' device.
        lse_s: the student's row log-sum-exp (B, H_s, N) with its gradient, from the student's own
            attention kernel (`AttentionIO(return_lse=True)`): required by ``attention_lse``, used by
            ``sdpa`` when given, ignored by ``rows``.
    """
    _check_shapes(q_t, k_t, q_s, k_s)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else scale_s
    try:
        path = ce_path_for(q_s.device) if path is None else CEPath(path)
    except ValueError:
        raise ValueError(f"unknown CE path {path!r}; choose one of {', '.join(CE_PATHS)}") from None
    if path is CEPath.ATTENTION_LSE and lse_s is None:
        raise ValueError(
            "the attention_lse path takes the student's log-sum-exp from its attention kernel: pass lse_s "
            "(run the student layer with AttentionIO(return_lse=True))"
        )
    with _fp32(q_s.device.type):
        q_t, k_t = q_t.detach(), k_t.detach()
        if path is CEPath.ROWS:
            grad = torch.is_grad_enabled()
            ce, ent = _FusedRowCE.apply(
                q_s,
                k_s,
                q_t,
                k_t,
                scale_s,
                scale_t,
                rows_path_chunk(q_t, k_s.shape[-2], chunk),  # cache-sized on CPU
                with_kl,
                grad and q_s.requires_grad,
                grad and k_s.requires_grad,
                _half_on_accelerator(q_t, k_t, q_s, k_s),
            )
            return AttentionLoss(ce, ce.detach() - ent if with_kl else None)
        if path is CEPath.MATERIALISED:
            return _materialised_ce(q_t, k_t, q_s, k_s, scale_t, scale_s, with_kl)
        if path is CEPath.TRITON:
            ce_rows, ent_rows = triton_row_ce(
                q_t, k_t, q_s, k_s, scale_t=scale_t, scale_s=scale_s, with_entropy=with_kl
            )
            ce = ce_rows.mean()
            return AttentionLoss(ce, ce.detach() - ent_rows.mean() if with_kl else None)
        if not _half_on_accelerator(q_t, k_t, q_s, k_s):
            dtype = compute_dtype(q_s)
            q_t, k_t, q_s, k_s = (t.to(dtype) for t in (q_t, k_t, q_s, k_s))
        if lse_s is None:
            lse_s = row_logsumexp(q_s, k_s, scale_s, chunk)
        # P̄_t K_s: one more attention, in the inputs' dtype (a bf16 flash kernel on GPU, fp32 elsewhere)
        pt_ks = _teacher_times(q_t, k_t, k_s, scale_t)
        dtype = lse_s.dtype
        ce = (lse_s - scale_s * (q_s.to(dtype) * pt_ks.to(dtype)).sum(-1)).mean()
        kl = None
        if with_kl:
            kl = ce.detach() - teacher_entropy(q_t, k_t, q_s.shape[1], scale_t, chunk).mean()
    return AttentionLoss(ce, kl)


class _FusedBiasedRowCE(torch.autograd.Function):
    """`_FusedRowCE` for logits with an additive bias, z = s·q kᵀ + B (fp32): one pass over query-row chunks
    computes the mean CE, the logged H(P̄_t) and the gradients dq = (s/n)·dz K_s, dk = (1/n)·dzᵀ (s·Q_s)
    and the bias's, dz = P_s − P̄_t. Each bias is a `BiasRows`: a chunk's rows are gathered when needed and
    their gradient (1/n)·dz (summed over the batch where B is shared by it) goes back to the tensors the
    bias is computed from (a relative-position table) chunk by chunk, by autograd through that chunk's
    gather alone. Memory: a chunk of logits and bias rows, plus the gradients of q_s, k_s and of the
    bias's inputs (a table: small; a full bias tensor: its size). The key set may differ from the queries.
    """

    @staticmethod
    def forward(
        ctx, q_s, k_s, q_t, k_t, b_s, b_t, pad, scale_s, scale_t, chunk, entropy, want_q, want_k, *b_inputs
    ):
        B, H, N, _ = q_s.shape
        groups = q_t.shape[1] // H
        dtype = compute_dtype(q_s)
        # padding: (additive key bias (B, 1, 1, N_k), query-row weights (B, 1, N_q, 1) of 1 / 0)
        key_bias, row_w = pad if pad is not None else (None, None)
        n = B * H * N if row_w is None else H * row_w.sum().item()
        qs, ks = _scaled_contiguous(q_s.to(dtype), scale_s), k_s.to(dtype).contiguous()
        qt, kt = _scaled_contiguous(q_t.to(dtype), scale_t), k_t.to(dtype).contiguous()
        ks_T, kt_T = ks.transpose(-2, -1), kt.transpose(-2, -1)
        ce = torch.zeros((), dtype=torch.float64, device=qs.device)
        ent = torch.zeros((), dtype=torch.float64, device=qs.device)
        dq = torch.empty(qs.shape, dtype=dtype, device=qs.device) if want_q else None
        dk = torch.zeros(ks.shape, dtype=dtype, device=ks.device) if want_k else None
        M = ks.shape[-2]
        qs3, ks3 = qs.view(B * H, N, -1), ks.view(B * H, M, -1)  # contiguous: views for the gradient GEMMs
        # the bias inputs that take a gradient: fresh leaves, so each chunk's gather is differentiated alone
        want_b = [t.requires_grad for t in b_inputs]
        leaves = tuple(t.detach().requires_grad_(w) for t, w in zip(b_inputs, want_b))
        db = [
            torch.zeros(t.shape, dtype=dtype, device=t.device) if w else None for t, w in zip(leaves, want_b)
        ]
        grad_leaves = [t for t, w in zip(leaves, want_b) if w]
        for rows in row_slices(0, N, chunk):
            z_s = qs[..., rows, :] @ ks_T
            bs_rows = None
            if b_s is not None:
                with torch.enable_grad():
                    bs_rows = b_s.rows_fn(rows, *leaves)
                z_s += bs_rows.detach().to(dtype)
            z_t = qt[..., rows, :] @ kt_T
            if b_t is not None:
                z_t += b_t.rows(rows).to(dtype)
            w = None
            if key_bias is not None:  # padded keys: no weight in either map; padded rows: not counted
                z_s += key_bias
                z_t += key_bias
                w = row_w[:, :, rows]
            p_t = _grouped_mean(torch.softmax(z_t, dim=-1), groups)
            log_p_s = torch.log_softmax(z_s, dim=-1)
            ce_rows = torch.linalg.vecdot(p_t, log_p_s)
            ce -= (ce_rows if w is None else ce_rows * w[..., 0]).sum(dtype=torch.float64)
            if entropy:
                ent_rows = torch.special.xlogy(p_t, p_t).sum(-1)
                ent -= (ent_rows if w is None else ent_rows * w[..., 0]).sum(dtype=torch.float64)
            if dq is None and dk is None and not grad_leaves:
                continue
            dz = log_p_s.exp_().sub_(p_t)  # n · d mean-CE / d logits of these rows (1/n in the GEMMs)
            if w is not None:
                dz.mul_(w)
            dz3 = dz.view(B * H, -1, M)
            if dq is not None:  # dq = (s/n)·dz K_s, written into its rows
                part = dq.view(B * H, N, -1)[:, rows]
                torch.baddbmm(part, dz3, ks3, beta=0, alpha=scale_s / n, out=part)
            if dk is not None:  # dk = (1/n)·dzᵀ (s·Q_s), summed over chunks
                dk3 = dk.view(B * H, M, -1)
                torch.baddbmm(dk3, dz3.transpose(1, 2), qs3[:, rows], beta=1, alpha=1 / n, out=dk3)
            if grad_leaves and bs_rows is not None and bs_rows.requires_grad:
                g = dz.sum(0, keepdim=True) if bs_rows.shape[0] == 1 < B else dz
                parts = iter(
                    torch.autograd.grad(bs_rows, grad_leaves, g.to(bs_rows.dtype), allow_unused=True)
                )
                for i, w in enumerate(want_b):
                    if w:
                        part = next(parts)
                        if part is not None:
                            db[i] += part
        for d in db:
            if d is not None:
                d.div_(n)
        ctx.save_for_backward(*(t for t in (dq, dk, *db) if t is not None))
        ctx.has = (dq is not None, dk is not None, *(d is not None for d in db))
        ctx.dtypes = (q_s.dtype, k_s.dtype, *(t.dtype for t in b_inputs))
        ctx.mark_non_differentiable(ent)
        return (ce / n).to(dtype), (ent / n).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, _grad_ent):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_ce).to(dt) if has else None for has, dt in zip(ctx.has, ctx.dtypes)]
        dq, dk, *db = grads
        return (dq, dk, None, None, None, None, None, None, None, None, None, None, None, *db)


def biased_attention_ce(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    bias_t: torch.Tensor | BiasRows | None = None,
    bias_s: torch.Tensor | BiasRows | None = None,
    scale_t: float | None = None,
    scale_s: float | None = None,
    chunk: int | None = None,
    with_kl: bool = True,
    valid: torch.Tensor | None = None,
) -> AttentionLoss:
    """The row CE of logits with an additive bias, z = s·q kᵀ + B (relative-position tables), exact:
    CE_i = lse_s,i − Σ_j P̄_t,ij z_s,ij, in one pass over query-row chunks that also computes the gradient
    (`_FusedBiasedRowCE`), so no more than a chunk of the N_q×N_k logits is alive. A bias is a tensor
    (B or 1, H, N_q, N_k) or a `BiasRows` (an adapter's ``logit_bias_rows``: rows gathered from a table
    per chunk, never the whole bias or its gradient); the gradient reaches q_s, k_s and what ``bias_s`` is
    computed from. Teacher heads are averaged in groups as in `attention_distillation_loss`; the key set
    may differ from the queries (N_k ≠ N_q).

    ``valid`` (B, N) bool marks a padded batch's real tokens (NaFlexViT's ``patch_valid`` with its prefix
    tokens, `padding_from_mask`): padded keys get no weight in either map (logits at fp32's lowest, as
    timm masks them) and padded query rows count for nothing: the mean is over real rows only, so each
    sample's rows are those of the sample alone, unpadded. Self-attention only (N_q = N_k = N)."""
    _check_shapes(q_t, k_t, q_s, k_s)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else scale_s
    bias_t = _as_rows(bias_t)
    bias_s = _as_rows(bias_s)
    grad = torch.is_grad_enabled()
    if not grad and bias_s is not None:
        bias_s = bias_s.detach()
    with _fp32(q_s.device.type):
        ce, ent = _FusedBiasedRowCE.apply(
            q_s,
            k_s,
            q_t.detach(),
            k_t.detach(),
            bias_s,
            bias_t.detach() if bias_t is not None else None,
            _padding(valid, q_s, k_s),
            scale_s,
            scale_t,
            rows_path_chunk(q_s, k_s.shape[-2], chunk),
            with_kl,
            grad and q_s.requires_grad,
            grad and k_s.requires_grad,
            *(bias_s.inputs if bias_s is not None else ()),
        )
    return AttentionLoss(ce, ce.detach() - ent if with_kl else None)


def _padding(valid: torch.Tensor | None, q_s: torch.Tensor, k_s: torch.Tensor):
    """(key bias (B, 1, 1, N), row weights (B, 1, N, 1)) in the compute dtype for ``valid`` (B, N)."""
    if valid is None:
        return None
    B, _, N, _ = q_s.shape
    if k_s.shape[-2] != N or tuple(valid.shape) != (B, N):
        raise ValueError(
            f"valid must be (batch, tokens) = {(B, N)} for self-attention over N tokens, got "
            f"{tuple(valid.shape)} with {k_s.shape[-2]} keys"
        )
    dtype = compute_dtype(q_s)
    valid = valid.to(device=q_s.device, dtype=torch.bool)
    key_bias = torch.zeros(B, 1, 1, N, dtype=dtype, device=q_s.device)
    key_bias.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
    return key_bias, valid[:, None, :, None].to(dtype)


def padding_from_mask(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The real tokens (B, N) of a padded batch from timm's attention mask (NaFlexViT's ``attn_mask``:
    additive (B, 1, N, N) at fp32's lowest value where query or key is padding, or key-only (B, 1, 1, N);
    bool masks True = attend); None when nothing is padded. Any other mask (a query that sees some real
    keys but not others) is not padding: a ValueError."""
    if mask is None:
        return None
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if seen.dim() != 4 or seen.shape[-1] != tokens or seen.shape[-2] not in (1, tokens):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} is not a padding mask over {tokens} tokens"
        )
    valid = seen.any(dim=-2).all(dim=1)  # a key is real if some query sees it
    if seen.shape[-2] == tokens:  # symmetric: real rows see exactly the real keys, padded rows nothing
        want = valid[:, None, :, None] & valid[:, None, None, :]
    else:
        want = valid[:, None, None, :]
    if not torch.equal(seen, want.expand_as(seen)):
        raise ValueError(
            "the attention mask is not a padding mask (some query sees some real keys but not others): "
            "attention distillation leaves out padded tokens only"
        )
    return None if bool(valid.all()) else valid


def _as_rows(bias: torch.Tensor | BiasRows | None) -> BiasRows | None:
    if bias is None or isinstance(bias, BiasRows):
        return bias
    return BiasRows.of_tensor(bias)


def _half_on_accelerator(*tensors: torch.Tensor) -> bool:
    """bf16/fp16 tensors of one dtype on CUDA: SDPA then runs its flash kernel (fp32 accumulation inside,
    a rounded output); everything else is upcast to the compute dtype."""
    dtype = tensors[0].dtype
    return all(t.is_cuda and t.dtype == dtype for t in tensors) and dtype in (torch.bfloat16, torch.float16)


class _ScaledLogits(torch.autograd.Function):
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


def _materialised_ce(q_t, k_t, q_s, k_s, scale_t: float, scale_s: float, with_kl: bool) -> AttentionLoss:
    """The ``materialised`` path: P̄_t and the student's logits as N×N tensors, the CE by torch's
    cross-entropy with probability targets (its log-softmax and backward in one kernel each), autograd
    through the maps. What the reference code does; fastest where the maps are small and the device's
    GEMMs dominate, and its memory grows as N² per distilled layer (`materialised_bytes`)."""
    if not _half_on_accelerator(q_t, k_t, q_s, k_s):  # bf16 on CUDA: tensor-core GEMMs, fp32 logits
        dtype = compute_dtype(q_s)
        q_t, k_t, q_s, k_s = q_t.to(dtype), k_t.to(dtype), q_s.to(dtype), k_s.to(dtype)
    groups = q_t.shape[1] // q_s.shape[1]
    with torch.no_grad():
        p_t = _grouped_mean(torch.softmax(matmul_fp32(q_t, k_t.transpose(-2, -1)).mul_(scale_t), -1), groups)
    z_s = _ScaledLogits.apply(q_s, k_s, scale_s)
    N = z_s.shape[-1]
    ce = F.cross_entropy(z_s.reshape(-1, N), p_t.reshape(-1, N))
    kl = None
    if with_kl:
        kl = ce.detach() + torch.special.xlogy(p_t, p_t).sum(-1).mean()
    return AttentionLoss(ce, kl)


#: N×N fp32 maps alive at the peak of the ``materialised`` path: two kept per distilled layer until
#: backward (P̄_t, the student's log-softmax), plus the transient ones of one layer (the teacher's logits
#: before the head-group mean, the student's logits, their gradient).
MAPS_KEPT_PER_LAYER = 2
MAPS_TRANSIENT = 3


def materialised_bytes(batch: int, tokens: int, student_heads: int, teacher_heads: int, layers: int) -> int:
    """Bytes the ``materialised`` path's maps take at a step's peak, ``layers`` distilled softmax layers:
    what `attnxfer.transfer.ce_select` compares with the memory budget before it times the path."""
    per_map = 4 * batch * tokens * tokens
    kept = MAPS_KEPT_PER_LAYER * student_heads * layers
    return per_map * (kept + MAPS_TRANSIENT * max(student_heads, teacher_heads))


def attention_ce_reference(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    scale_t: float | None = None,
    scale_s: float | None = None,
) -> AttentionLoss:
    """The same loss with both N×N maps materialised: the oracle (and the slow path)."""
    _check_shapes(q_t, k_t, q_s, k_s)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else scale_s
    with _fp32(q_s.device.type):
        dtype = compute_dtype(q_s)
        q_t, k_t, q_s, k_s = q_t.detach().to(dtype), k_t.detach().to(dtype), q_s.to(dtype), k_s.to(dtype)
        p_t = torch.softmax((q_t @ k_t.transpose(-2, -1)) * scale_t, dim=-1)
        B, H_t, N, M = p_t.shape
        H_s = q_s.shape[1]
        p_t = p_t.reshape(B, H_s, H_t // H_s, N, M).mean(2)
        log_p_s = torch.log_softmax((q_s @ k_s.transpose(-2, -1)) * scale_s, dim=-1)
        ce = -(p_t * log_p_s).sum(-1).mean()
        entropy = -(p_t * torch.log(p_t.clamp_min(torch.finfo(p_t.dtype).tiny))).sum(-1).mean()
    return AttentionLoss(ce, ce.detach() - entropy)
