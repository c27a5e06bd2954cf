"""The ``rows`` CE path and the biased CE as autograd Functions: a scalar loss's gradient is linear in the
incoming one, so forward computes dq, dk (and a bias's inputs' gradient) chunk by chunk beside the loss and
the logged entropy, and backward only scales them. No N×N map is ever alive, only one chunk of logits."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..models.attention.numerics import compute_dtype, matmul_fp32, row_chunk as _auto_chunk, row_slices


def grouped_mean(p: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_t, r, N) -> (B, H_t / groups, r, N): teacher heads averaged in consecutive groups."""
    if groups == 1:
        return p
    B, H, r, N = p.shape
    return p.reshape(B, H // groups, groups, r, N).mean(2)


def scaled_contiguous(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale`` contiguous in one pass (``(t * scale).contiguous()`` takes two: results keep t's strides)."""
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=t.dtype, device=t.device))


#: Elements of one (B, H_t, rows, N) logits block of the ``rows`` path on CPU: 512K fp32 = 2 MiB, about a
#: core's L2 (each block is touched several times). Measured on this project's 2-core CPU at N = 785
#: (B·H = 6, loss forward + backward, one thread, the earlier recompute-in-backward form):
#: 785-row chunks 214 ms, 128 rows 192 ms, 64 rows 179 ms, 32 rows 207 ms.
ROWS_PATH_ELEMENTS = 1 << 19


def rows_path_chunk(q: torch.Tensor, n_keys: int, chunk: int | None = None) -> int:
    """Query rows per chunk of the ``rows`` path: cache-sized on CPU, else the shared 64 MiB budget for the
    five (B, H, rows, N) fp32 blocks alive at once (fewer, larger kernels)."""
    if q.device.type == "cpu":
        return _auto_chunk(q, n_keys, chunk, budget=ROWS_PATH_ELEMENTS)
    return _auto_chunk(q, n_keys, chunk, live_tensors=5)


class FusedRowCE(torch.autograd.Function):
    """Mean CE −Σ_j P̄_t log P_s (and the logged mean H(P̄_t)) with dq = (s/n)·dz k_s, dk = (s/n)·dzᵀ q_s
    (dz = P_s − P̄_t) in ONE pass over row chunks: four N²d matmuls a layer, as many as the materialised
    autograd graph and two fewer than recomputing each chunk in backward, without the maps. Keys may be
    fewer than queries. ``want_q``/``want_k`` come from the caller: ``ctx.needs_input_grad`` ignores
    ``torch.no_grad()``, and evaluation must not pay for gradients."""

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
            qs, ks = scaled_contiguous(q_s.to(dtype), scale_s), k_s.to(dtype).contiguous()
            qt, kt = scaled_contiguous(q_t.to(dtype), scale_t), k_t.to(dtype).contiguous()
            post_s, post_t, q_scale = None, None, 1.0  # the scales are in qs, qt
        ks_T, kt_T = ks.transpose(-2, -1), kt.transpose(-2, -1)
        # The value sums B·H·N² terms: each row's N in fp32, the rows in float64 (one fp32 dot over a whole
        # chunk erred by 4e-6 relative at N = 785, 60x the materialised reference; now 3e-8, its order)
        ce = torch.zeros((), dtype=torch.float64, device=qs.device)
        ent = torch.zeros((), dtype=torch.float64, device=qs.device)
        dq = torch.empty(qs.shape, dtype=dtype, device=qs.device) if want_q else None
        dk = torch.empty(ks.shape, dtype=dtype, device=ks.device) if want_k else None
        # (B·H, N, ·) fp32 views for the gradient products: scaled and accumulated inside the GEMMs
        qs3, ks3 = qs.to(dtype).view(B * H, N, -1), ks.to(dtype).view(B * H, M, -1)
        for i, rows in enumerate(row_slices(0, N, chunk)):
            z_t = matmul_fp32(qt[..., rows, :], kt_T)
            z_s = matmul_fp32(qs[..., rows, :], ks_T)
            p_t = grouped_mean(torch.softmax(z_t if post_t is None else z_t.mul_(post_t), dim=-1), groups)
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
        ctx.constants = 9  # the inputs after q_s, k_s that take no gradient
        ctx.mark_non_differentiable(ent)
        return (ce / n).to(dtype), (ent / n).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, _grad_ent):
        """The gradients forward computed (``ctx.has`` says which were saved), scaled by the incoming one."""
        saved = iter(ctx.saved_tensors)
        dq, dk, *db = [
            (next(saved) * grad_ce).to(dt) if has else None for has, dt in zip(ctx.has, ctx.dtypes)
        ]
        return dq, dk, *(None,) * ctx.constants, *db


class FusedBiasedRowCE(FusedRowCE):
    """`FusedRowCE` for logits with an additive bias, z = s·q kᵀ + B (fp32), each a `BiasRows`: a chunk's
    rows are gathered when needed and their gradient (1/n)·dz goes back to what the bias is computed from
    (a relative-position table) by autograd through that chunk's gather alone."""

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
        qs, ks = scaled_contiguous(q_s.to(dtype), scale_s), k_s.to(dtype).contiguous()
        qt, kt = scaled_contiguous(q_t.to(dtype), scale_t), k_t.to(dtype).contiguous()
        ce = torch.zeros((), dtype=torch.float64, device=qs.device)
        ent = torch.zeros((), dtype=torch.float64, device=qs.device)
        dq = torch.empty(qs.shape, dtype=dtype, device=qs.device) if want_q else None
        dk = torch.zeros(ks.shape, dtype=dtype, device=ks.device) if want_k else None
        M = ks.shape[-2]
        qs3, ks3 = qs.view(B * H, N, -1), ks.view(B * H, M, -1)  # contiguous: views for the gradient GEMMs
        bias_grads = _BiasInputGrads(b_inputs, dtype)
        ks_T, kt_T = ks.transpose(-2, -1), kt.transpose(-2, -1)
        for rows in row_slices(0, N, chunk):
            # both maps' logits z = s·q kᵀ + B, padded keys at fp32's lowest; the student's bias rows gathered
            # from the leaves with autograd on, so that this chunk's gather alone is differentiated
            z_s = qs[..., rows, :] @ ks_T
            bs_rows = None
            if b_s is not None:
                with torch.enable_grad():
                    bs_rows = b_s.rows_fn(rows, *bias_grads.leaves)
                z_s += bs_rows.detach().to(dtype)
            z_t = qt[..., rows, :] @ kt_T
            if b_t is not None:
                z_t += b_t.rows(rows).to(dtype)
            if key_bias is not None:
                z_s += key_bias
                z_t += key_bias
            w = row_w[:, :, rows] if key_bias is not None else None  # padded rows: not counted
            p_t = grouped_mean(torch.softmax(z_t, dim=-1), groups)
            log_p_s = torch.log_softmax(z_s, dim=-1)
            ce_rows = torch.linalg.vecdot(p_t, log_p_s)
            ce -= (ce_rows if w is None else ce_rows * w[..., 0]).sum(dtype=torch.float64)
            if entropy:
                ent_rows = torch.special.xlogy(p_t, p_t).sum(-1)
                ent -= (ent_rows if w is None else ent_rows * w[..., 0]).sum(dtype=torch.float64)
            if dq is None and dk is None and not bias_grads.trainable:
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
            bias_grads.add(bs_rows, dz, B)
        db = [d.div_(n) if d is not None else None for d in bias_grads.sums]  # the means over counted rows
        ctx.save_for_backward(*(t for t in (dq, dk, *db) if t is not None))
        ctx.has = (dq is not None, dk is not None, *(d is not None for d in db))
        ctx.dtypes = (q_s.dtype, k_s.dtype, *(t.dtype for t in b_inputs))
        ctx.constants = 11
        ctx.mark_non_differentiable(ent)
        return (ce / n).to(dtype), (ent / n).to(dtype)


class _BiasInputGrads:
    """The gradient of what the student's bias is computed from, summed chunk by chunk over fresh leaves."""

    def __init__(self, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
        self.want = [t.requires_grad for t in inputs]
        self.leaves = tuple(t.detach().requires_grad_(w) for t, w in zip(inputs, self.want))
        self.sums = [
            torch.zeros(t.shape, dtype=dtype, device=t.device) if w else None
            for t, w in zip(self.leaves, self.want)
        ]
        self.trainable = [t for t, w in zip(self.leaves, self.want) if w]

    def add(self, bs_rows: torch.Tensor | None, dz: torch.Tensor, batch: int) -> None:
        """Add one chunk's share, from ``dz`` (n × d mean-CE / d logits of its rows)."""
        if not (self.trainable and bs_rows is not None and bs_rows.requires_grad):
            return
        g = dz.sum(0, keepdim=True) if bs_rows.shape[0] == 1 < batch else dz
        parts = iter(torch.autograd.grad(bs_rows, self.trainable, g.to(bs_rows.dtype), allow_unused=True))
        for i, w in enumerate(self.want):
            if w:
                part = next(parts)
                if part is not None:
                    self.sums[i] += part
