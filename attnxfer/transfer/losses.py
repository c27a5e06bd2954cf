"""Attention-transfer losses without N×N maps: the row CE −Σ_j P̄_t log P_s and its KL, in fp32.

Rows of P̄_t sum to 1, so CE_i = lse_s,i − s_s·⟨q_s,i, (P̄_t K_s)_i⟩: one more attention (SDPA with v = k_s)
and the student's row log-sum-exp (`row_logsumexp`, chunked, recomputed in backward). Five exact
evaluations of it (`CEPath`) are timed on the run's device (`attnxfer.transfer.ce_select`); `ce_path_for`
is the unmeasured default. ``rows`` computes CE and gradient in one pass over row chunks (four N²d matmuls,
as autograd of the maps, without the maps); ``materialised`` builds both maps as the reference code does
(memory N² a layer, so ``auto`` times it within a budget only). `attention_ce_reference` is the tests' and
benchmarks' oracle, never the training path.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.attention import sdpa
from ..models.attention.bias_rows import BiasRows
from ..models.attention.lse import row_logsumexp

# fp32 sections and row chunks (one chunk of logits B·H·rows·N within the shared 64 MiB budget)
from ..models.attention.numerics import compute_dtype, fp32_section as _fp32, row_chunk as _auto_chunk
from .materialised_ce import half_on_accelerator, materialised_bytes as materialised_bytes, materialised_ce
from .row_ce import FusedBiasedRowCE, FusedRowCE, grouped_mean, rows_path_chunk
from .step_loss import Loss
from .triton_ce import CEPathUnavailable as CEPathUnavailable, triton_row_ce


class CEPath(StrEnum):
    """How `attention_distillation_loss` evaluates the exact CE."""

    ROWS = "rows"  # one pass over row chunks computes CE and its gradient: fastest on CPU
    SDPA = "sdpa"  # P̄_t K_s through SDPA's fused kernel, lse_s by the chunked `row_logsumexp`
    ATTENTION_LSE = "attention_lse"  # P̄_t K_s through SDPA, lse_s from the student's own attention kernel
    TRITON = "triton"  # fused Triton kernels, online softmax of both rows (CUDA; TRITON_INTERPRET=1 on CPU)
    MATERIALISED = "materialised"  # the reference's way: both N×N maps built, autograd through them

    @property
    def needs_student_lse(self) -> bool:
        """The student layer must hand out its log-sum-exp (`AttentionIO.return_lse`)."""
        return self is CEPath.ATTENTION_LSE


CE_PATHS = tuple(CEPath)


def ce_path_for(device: torch.device | str) -> CEPath:
    """The CE path where nothing was measured: ``rows`` on CPU (fastest there, docs/benchmarks.md), else ``sdpa``."""
    return CEPath.ROWS if torch.device(device).type == "cpu" else CEPath.SDPA


def _ce_loss(ce: torch.Tensor, kl: torch.Tensor | None) -> Loss:
    """``total`` the CE, ``logs["kl"]`` the detached KL beside it where asked for."""
    return Loss(ce, {}, {} if kl is None else {"kl": kl})


def group_heads_ok(teacher_heads: int, student_heads: int) -> bool:
    """Distillation needs equal heads or a teacher with a whole multiple of the student's."""
    return teacher_heads >= student_heads and teacher_heads % student_heads == 0


def _checked_scales(q_t, k_t, q_s, k_s, scale_t, scale_s) -> tuple[float, float]:
    """The logit scales (default timm's d^-0.5), once the shapes are checked."""
    if q_t.dim() != 4 or q_s.dim() != 4:
        raise ValueError("attention tensors must be (batch, heads, tokens, head_dim)")
    if q_t.shape[0] != q_s.shape[0]:
        raise ValueError(f"batch sizes differ: teacher {q_t.shape[0]}, student {q_s.shape[0]}")
    # a key of another batch or head count would broadcast silently (SDPA, matmul): a loss of other maps
    for who, q, k in (("teacher", q_t, k_t), ("student", q_s, k_s)):
        if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"the {who}'s keys {tuple(k.shape)} do not go with its queries {tuple(q.shape)}: both are "
                "(batch, heads, tokens, head_dim), of one batch, head count and head dim"
            )
    # a user's pairing the plan cannot see (a CaiT teacher's blocks leave out the class token a ViT's keep)
    if q_t.shape[-2] != q_s.shape[-2] or k_t.shape[-2] != k_s.shape[-2]:
        raise InputError(
            f"token counts differ: teacher queries/keys {q_t.shape[-2]}/{k_t.shape[-2]}, student "
            f"{q_s.shape[-2]}/{k_s.shape[-2]}; teacher and student need the same image size, patch size and "
            "prefix tokens"
        )
    if not group_heads_ok(q_t.shape[1], q_s.shape[1]):
        raise ValueError(
            f"teacher has {q_t.shape[1]} heads, student {q_s.shape[1]}: the teacher's head count must equal "
            "or be a whole multiple of the student's (its maps are then averaged in groups)"
        )
    return (
        q_t.shape[-1] ** -0.5 if scale_t is None else scale_t,
        q_s.shape[-1] ** -0.5 if scale_s is None else scale_s,
    )


def _teacher_times(q_t, k_t, values, scale_t):
    """(P̄_t V): the teacher's map (head groups averaged) applied to ``values``, via SDPA."""
    groups = q_t.shape[1] // values.shape[1]
    values = values.repeat_interleave(groups, dim=1) if groups > 1 else values
    return grouped_mean(sdpa(q_t, k_t, values, scale=scale_t), groups)


@torch.no_grad()
def teacher_entropy(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    student_heads: int | None = None,
    scale_t: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Row entropies H(P̄_t) (B, H_s, N) in fp32, head groups averaged first."""
    # else a count that does not divide the teacher's failed deep in the rows' copy (0: a ZeroDivisionError)
    if student_heads is not None and not (student_heads > 0 and group_heads_ok(q_t.shape[1], student_heads)):
        raise ValueError(
            f"student_heads={student_heads}: the teacher's {q_t.shape[1]} heads are averaged in groups, so it "
            "must divide them"
        )
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    with _fp32(q_t.device.type):
        q_t, k_t = q_t.float(), k_t.float()
        if student_heads in (None, q_t.shape[1]):
            # H_i = lse_i − s⟨q_i, (P K)_i⟩: no map needed.
            lse = row_logsumexp(q_t, k_t, scale_t, chunk)
            pk = F.scaled_dot_product_attention(q_t, k_t, k_t, scale=scale_t)
            return lse - scale_t * (q_t * pk).sum(-1)
        groups = q_t.shape[1] // student_heads
        step = _auto_chunk(q_t, k_t.shape[-2], chunk)
        B, _, N, _ = q_t.shape
        out = q_t.new_empty(B, student_heads, N)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            p = torch.softmax((q_t[..., rows, :] @ k_t.transpose(-2, -1)) * scale_t, dim=-1)
            p = grouped_mean(p, groups)
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
) -> Loss:
    """Mean row CE −Σ_j P̄_t log P_s over (batch, head, query), O(N) memory; the teacher's H_t heads (a
    multiple of the student's H_s) are averaged in consecutive groups, and get no gradient. ``with_kl`` adds
    the detached KL = CE − H(P̄_t) as ``logs["kl"]``. ``lse_s``: the student's row log-sum-exp with its
    gradient from its own attention kernel (`AttentionIO(return_lse=True)`), which ``attention_lse`` needs."""
    scale_t, scale_s = _checked_scales(q_t, k_t, q_s, k_s, scale_t, scale_s)
    try:
        path = ce_path_for(q_s.device) if path is None else CEPath(path)
    except ValueError:
        raise ValueError(f"unknown CE path {path!r}; choose one of {', '.join(CE_PATHS)}") from None
    if path is CEPath.ATTENTION_LSE and lse_s is None:
        raise ValueError(
            "the attention_lse path takes the student's log-sum-exp from its attention kernel: pass lse_s "
            "(run the student layer with AttentionIO(return_lse=True))"
        )
    q_t, k_t = q_t.detach(), k_t.detach()
    with _fp32(q_s.device.type):
        if path is CEPath.ROWS:
            want = [torch.is_grad_enabled() and t.requires_grad for t in (q_s, k_s)]
            rows = rows_path_chunk(q_t, k_s.shape[-2], chunk)  # cache-sized on CPU
            half = half_on_accelerator(q_t, k_t, q_s, k_s)
            ce, ent = FusedRowCE.apply(q_s, k_s, q_t, k_t, scale_s, scale_t, rows, with_kl, *want, half)
            return _ce_loss(ce, ce.detach() - ent if with_kl else None)
        if path is CEPath.MATERIALISED:  # both N×N maps, autograd through them
            return _ce_loss(*materialised_ce(q_t, k_t, q_s, k_s, scale_t, scale_s, with_kl))
        if path is CEPath.TRITON:  # the fused kernels' per-row CE and entropy, averaged
            ce_rows, ent_rows = triton_row_ce(
                q_t, k_t, q_s, k_s, scale_t=scale_t, scale_s=scale_s, with_entropy=with_kl
            )
            ce = ce_rows.mean()
            return _ce_loss(ce, ce.detach() - ent_rows.mean() if with_kl else None)
        # sdpa and attention_lse: CE_i = lse_s,i − s·⟨q_s,i, (P̄_t K_s)_i⟩, lse_s given or `row_logsumexp`'s
        if not half_on_accelerator(q_t, k_t, q_s, k_s):
            dtype = compute_dtype(q_s)
            q_t, k_t, q_s, k_s = (t.to(dtype) for t in (q_t, k_t, q_s, k_s))
        if lse_s is None:
            lse_s = row_logsumexp(q_s, k_s, scale_s, chunk)
        # P̄_t K_s: one more attention, in the inputs' dtype (a bf16 flash kernel on GPU, fp32 elsewhere)
        pt_ks = _teacher_times(q_t, k_t, k_s, scale_t)
        dtype = lse_s.dtype
        ce = (lse_s - scale_s * (q_s.to(dtype) * pt_ks.to(dtype)).sum(-1)).mean()
        kl = ce.detach() - teacher_entropy(q_t, k_t, q_s.shape[1], scale_t, chunk).mean() if with_kl else None
        return _ce_loss(ce, kl)


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
) -> Loss:
    """The exact row CE of logits with an additive bias, z = s·q kᵀ + B (relative-position tables), in one pass
    over query-row chunks that also computes the gradient (`FusedBiasedRowCE`). A bias is a tensor
    (B or 1, H, N_q, N_k) or a `BiasRows` (rows gathered from a table per chunk, never the whole bias).
    ``valid`` (B, N) marks a padded batch's real tokens (`padding_from_mask`): padded keys get no weight in
    either map and padded rows do not count, so each sample's loss is that of the sample alone, unpadded."""
    scale_t, scale_s = _checked_scales(q_t, k_t, q_s, k_s, scale_t, scale_s)
    b_t, b_s = (
        b if b is None or isinstance(b, BiasRows) else BiasRows.of_tensor(b) for b in (bias_t, bias_s)
    )
    b_t = b_t.detach() if b_t is not None else None
    grad = torch.is_grad_enabled()
    if not grad and b_s is not None:
        b_s = b_s.detach()
    want = [grad and t.requires_grad for t in (q_s, k_s)]
    rows, inputs = rows_path_chunk(q_s, k_s.shape[-2], chunk), b_s.inputs if b_s is not None else ()
    q_t, k_t, pad = q_t.detach(), k_t.detach(), _padding(valid, q_s, k_s)
    with _fp32(q_s.device.type):
        ce, ent = FusedBiasedRowCE.apply(
            q_s, k_s, q_t, k_t, b_s, b_t, pad, scale_s, scale_t, rows, with_kl, *want, *inputs
        )
    return _ce_loss(ce, ce.detach() - ent if with_kl else None)


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
    """The real tokens (B, N) of a padded batch from timm's attention mask (NaFlexViT's additive
    (B, 1, N, N) or key-only (B, 1, 1, N); bool: True = attend); None when nothing is padded. A mask that is
    not padding (a query sees some real keys but not others) is a ValueError."""
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


def attention_ce_reference(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    scale_t: float | None = None,
    scale_s: float | None = None,
) -> Loss:
    """The same loss with both N×N maps materialised: the oracle (and the slow path)."""
    scale_t, scale_s = _checked_scales(q_t, k_t, q_s, k_s, scale_t, scale_s)
    with _fp32(q_s.device.type):
        dtype = compute_dtype(q_s)
        q_t, k_t, q_s, k_s = q_t.detach().to(dtype), k_t.detach().to(dtype), q_s.to(dtype), k_s.to(dtype)
        p_t = torch.softmax((q_t @ k_t.transpose(-2, -1)) * scale_t, dim=-1)
        p_t = grouped_mean(p_t, p_t.shape[1] // q_s.shape[1])
        log_p_s = torch.log_softmax((q_s @ k_s.transpose(-2, -1)) * scale_s, dim=-1)
        ce = -(p_t * log_p_s).sum(-1).mean()
        entropy = -(p_t * torch.log(p_t.clamp_min(torch.finfo(p_t.dtype).tiny))).sum(-1).mean()
    return _ce_loss(ce, ce.detach() - entropy)
