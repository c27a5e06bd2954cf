"""Map-distillation losses: a student layer's attention map against a softmax teacher's P_t, by the loss of
its `MapKind` (`MAP_LOSS_RULES`), each with an agreement metric (KL beside CE, the loss itself for MSE).

Softmax students take the exact O(N) row CE (`losses`); other maps are read from the layer's implicit rows
in checkpointed row chunks: CE for row-stochastic maps, MSE for signed ones (rows may go negative: no log).
Where the teacher's keys pool the student's tokens (PVTv2) a `KeyPooling` pools the student's rows onto
them (a kernel map pools φ(k) per block, so a chunk holds no more than N_k entries). Zeros of a
row-stochastic map (window attention) are floored at fp32's smallest normal (log ≈ −87.3): the CE stays
finite and large where the student cannot put the teacher's weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import InputError
from ..models.attention import MapKind, TransferableAttention
from ..models.attention.bias_rows import BiasRows, bias_block
from ..models.attention.key_pooling import KeyPooling
from ..models.attention.numerics import fp32_section, row_chunk
from ..models.efficient.kernels import KernelAttention
from .losses import CEPath, attention_distillation_loss, biased_attention_ce
from .step_loss import Loss
from .triton_ce import CEPathUnavailable


class MapLoss(StrEnum):
    """A way to compare a student layer with its teacher; its value is the config's name for it."""

    AUTO = "auto"  # the default for the student layer's map kind (`DEFAULT_MAP_LOSS`)
    CE = "ce"
    MSE = "mse"
    OUTPUT = "output"

    @property
    def metric(self) -> str:
        """Name of the agreement metric reported beside the loss."""
        return {"ce": "kl", "mse": "map_mse", "output": "output_mse"}[self]

    @property
    def term(self) -> str:
        """Key prefix of the loss among a training step's terms (``attn_ce/3``)."""
        return {"ce": "attn_ce", "mse": "attn_mse", "output": "attn_output_mse"}[self]


def map_agreement(loss: MapLoss, value: torch.Tensor, metric: torch.Tensor | None) -> Loss:
    """One layer's map loss as a `Loss`: one term named by its kind (``attn_ce``), the detached metric in ``logs``."""
    return Loss(value, {loss.term: value}, {} if metric is None else {loss.metric: metric})


def agreement(res: Loss) -> torch.Tensor | None:
    """The detached agreement metric beside a map loss (`map_agreement`), or None."""
    return next(iter(res.logs.values()), None)


@dataclass(frozen=True)
class LayerLogits:
    """One side of a map loss: q and k (B, H, N, d) as they enter the layer's logits, and what else makes its map."""

    q: torch.Tensor
    k: torch.Tensor
    #: the layer's logit scale where it is not timm's d^-0.5 (None: d^-0.5)
    scale: float | None = None
    #: the additive logit bias (an adapter's ``logit_bias``: relative positions, a shift mask), or None
    bias: torch.Tensor | BiasRows | None = None
    #: (B, N) the real tokens of a padded batch (`losses.padding_from_mask`); None: every token is real
    valid: torch.Tensor | None = None
    #: the teacher's keys as a pooling of the student's tokens (PVTv2's spatial reduction); None: the same keys
    key_pooling: KeyPooling | None = None
    #: the student's rows' log-sum-exp from its own attention kernel (``CEPath.ATTENTION_LSE``), or None
    lse: torch.Tensor | None = None


def _teacher_rows(teacher: LayerLogits, rows: slice) -> torch.Tensor:
    q_t, k_t = teacher.q, teacher.k
    scale_t = q_t.shape[-1] ** -0.5 if teacher.scale is None else teacher.scale
    z = (q_t[..., rows, :] * scale_t) @ k_t.transpose(-2, -1)
    if teacher.bias is not None:
        z = z + bias_block(teacher.bias, rows).to(z.dtype)
    return z.softmax(dim=-1)


def _student_rows(attn, q_s, k_s, rows: slice, pooling: KeyPooling | None) -> torch.Tensor:
    """Rows of the student's map, pooled onto the teacher's reduced keys where ``pooling`` is given."""
    if pooling is None:
        return attn.attention_map(q_s, k_s, rows)
    # a map that is exactly KernelAttention's φ(q)·φ(k_j) / Σ_j φ(q)·φ(k_j): pool φ(k) per block, (rows × N_k),
    # never (rows × N)
    if (
        isinstance(attn, KernelAttention)
        and type(attn)._map_context is KernelAttention._map_context
        and type(attn)._map_rows is KernelAttention._map_rows
    ):
        phi_q, phi_k = attn.features(q_s, k_s)
        phi_q = phi_q[:, :, rows]
        z = phi_q @ phi_k.sum(-2, keepdim=True).transpose(-2, -1)
        return (phi_q @ pooling.pool_tokens(phi_k).transpose(-2, -1)) / z
    return pooling.pool(attn.attention_map(q_s, k_s, rows))


def _student_log_rows(attn, q_s, k_s, rows: slice, pooling: KeyPooling | None) -> torch.Tensor:
    """log of `_student_rows` (zeros floored at fp32's tiny); a softmax student's pooled rows exactly."""
    if pooling is not None and attn.map_kind is MapKind.SOFTMAX:
        logits = (q_s[:, :, rows] * attn.logit_scale(q_s)) @ k_s.transpose(-2, -1)
        return pooling.log_pool(logits) - logits.logsumexp(-1, keepdim=True)
    a_s = _student_rows(attn, q_s, k_s, rows, pooling)
    return torch.log(a_s.clamp_min(torch.finfo(a_s.dtype).tiny))


def _ce_chunk(attn, q_s, k_s, teacher: LayerLogits, start: int, stop: int):
    """Sums over the chunk of −Σ_j P_t log A_s and of the teacher's entropy (no gradient)."""
    rows = slice(start, stop)
    log_a = _student_log_rows(attn, q_s, k_s, rows, teacher.key_pooling)
    p_t = _teacher_rows(teacher, rows)
    return -(p_t * log_a).sum(), -torch.special.xlogy(p_t, p_t).sum()


def _mse_chunk(attn, q_s, k_s, teacher: LayerLogits, start: int, stop: int):
    rows = slice(start, stop)
    diff = _student_rows(attn, q_s, k_s, rows, teacher.key_pooling) - _teacher_rows(teacher, rows)
    return diff.pow(2).sum(), diff.new_zeros(())


def _summed_chunks(fn, attn, q_s, k_s, teacher: LayerLogits, step: int):
    """``fn``'s (loss sum, entropy sum) over row chunks, each checkpointed under autograd (rebuilt in backward)."""
    N = q_s.shape[2]
    grad = torch.is_grad_enabled() and (
        q_s.requires_grad or k_s.requires_grad or any(p.requires_grad for p in attn.parameters())
    )
    total = entropy = q_s.new_zeros(())
    for start in range(0, N, step):
        args = (attn, q_s, k_s, teacher, start, min(start + step, N))
        part, ent = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
        total = total + part
        entropy = entropy + ent.detach()
    return total, entropy


def _implicit_loss(
    rule: MapLossRule,
    attn: TransferableAttention,
    student: LayerLogits,
    teacher: LayerLogits,
    chunk: int | None,
) -> Loss:
    """The rule's loss from the layer's rows (`attention_map`, at the layer's own scale); the metric is free."""
    if student.bias is not None:
        raise InputError(
            "the implicit-map loss reads the student's map from attention_map(q, k), which has no logit bias"
        )
    if student.valid is not None:
        raise InputError(
            "padded batches (a padding mask over their patches) are distilled into softmax students only: the "
            "implicit-map loss has no padding mask; batch images of one size, or use a softmax student"
        )
    q_s, k_s, q_t, k_t, pooling = student.q, student.k, teacher.q, teacher.k, teacher.key_pooling
    if pooling is not None:
        if q_s.shape[:3] != q_t.shape[:3]:
            raise InputError(
                f"teacher and student queries differ: {tuple(q_t.shape)} vs {tuple(q_s.shape)}; the "
                "student needs the teacher's heads and query tokens"
            )
        if k_s.shape[-2] != pooling.num_tokens or k_t.shape[-2] != pooling.num_keys:
            raise InputError(
                f"the teacher's {k_t.shape[-2]} keys are a pooling of a {pooling.grid[0]}x{pooling.grid[1]} "
                f"grid into {pooling.num_keys}, but the student has {k_s.shape[-2]} keys and the teacher "
                f"{k_t.shape[-2]}"
            )
    elif q_s.shape[:3] != q_t.shape[:3] or k_s.shape[-2] != k_t.shape[-2]:
        raise InputError(
            f"teacher and student attention shapes differ: q {tuple(q_t.shape)} vs {tuple(q_s.shape)}; "
            "the student needs the teacher's heads and tokens"
        )
    B, H, N, _ = q_s.shape
    count = B * H * N * (k_t.shape[-2] if rule.per_entry else 1)  # per entry: over the teacher's keys too
    # a chunk keeps a few (B, H, rows, M) tensors alive: student rows, teacher rows, their product
    step = row_chunk(q_s, k_s.shape[-2], chunk, live_tensors=4)
    with fp32_section(q_s.device.type):
        teacher = replace(
            teacher,
            q=q_t.detach().float(),
            k=k_t.detach().float(),
            bias=teacher.bias.detach() if teacher.bias is not None else None,
        )
        total, entropy = _summed_chunks(rule.rows, attn, q_s.float(), k_s.float(), teacher, step)
        value = total / count
    return map_agreement(rule.loss, value, value.detach() - entropy / count)


@dataclass(frozen=True)
class MapLossRule:
    """How one (student map kind, loss) pair is computed, and what it allows."""

    loss: MapLoss
    #: (attn, q_s, k_s, teacher, start, stop) -> sums over rows start:stop of the loss and of what its metric
    #: takes off it (the teacher's entropy: KL beside CE), from the layer's implicit rows
    rows: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    #: averaged over each row's entries (MSE), not over rows (CE)
    per_entry: bool = False
    #: the exact O(N) row CE of a softmax layer; else the layer's implicit rows, chunked
    exact: bool = False
    #: the teacher may have a whole multiple of the student's heads (its maps averaged in groups)
    groups_heads: bool = False
    #: what the loss compares, in words (what a transfer plan prints for the layer)
    describe: str = ""


MAP_LOSS_RULES: dict[tuple[MapKind, MapLoss], MapLossRule] = {
    (MapKind.SOFTMAX, MapLoss.CE): MapLossRule(
        MapLoss.CE,
        _ce_chunk,
        exact=True,
        groups_heads=True,
        describe="CE between teacher and student attention rows (exact, no N x N map)",
    ),
    (MapKind.ROW_STOCHASTIC, MapLoss.CE): MapLossRule(
        MapLoss.CE,
        _ce_chunk,
        describe="CE between the teacher's attention rows and the rows of the student's row-stochastic map",
    ),
    (MapKind.SOFTMAX, MapLoss.MSE): MapLossRule(
        MapLoss.MSE, _mse_chunk, per_entry=True, describe="MSE between teacher and student attention maps"
    ),
    (MapKind.ROW_STOCHASTIC, MapLoss.MSE): MapLossRule(
        MapLoss.MSE,
        _mse_chunk,
        per_entry=True,
        describe="MSE between the teacher's attention map and the student's row-stochastic map",
    ),
    (MapKind.SIGNED, MapLoss.MSE): MapLossRule(
        MapLoss.MSE,
        _mse_chunk,
        per_entry=True,
        describe="MSE between the teacher's attention map and the student's signed map (no log: its rows "
        "may go negative)",
    ),
}
#: the loss each map kind gets unless told otherwise
DEFAULT_MAP_LOSS: dict[MapKind, MapLoss] = {
    MapKind.SOFTMAX: MapLoss.CE,
    MapKind.ROW_STOCHASTIC: MapLoss.CE,
    MapKind.SIGNED: MapLoss.MSE,
    MapKind.NONE: MapLoss.OUTPUT,
}


def default_map_loss(kind: MapKind | str) -> MapLoss:
    return DEFAULT_MAP_LOSS[MapKind(kind)]


def check_map_loss(loss: MapLoss | str, kind: MapKind | str, where: str = "") -> MapLoss:
    """``loss`` ('auto' resolves by kind) as a `MapLoss` if it applies to ``kind``, else an InputError saying what does."""
    kind = MapKind(kind)
    try:
        loss = MapLoss(loss)
    except ValueError:
        raise InputError(
            f"unknown map loss {loss!r}; choose one of {', '.join(m.value for m in MapLoss)}"
        ) from None
    if loss is MapLoss.AUTO:
        return default_map_loss(kind)
    # a loss applies where the table has it (``output`` compares attention outputs: it applies to every kind)
    if (kind, loss) not in MAP_LOSS_RULES and loss is not MapLoss.OUTPUT:
        fits = [m.value for m in MapLoss if (kind, m) in MAP_LOSS_RULES or m is MapLoss.OUTPUT]
        why = "MAP_LOSS_RULES has no rule for the two"  # a fork's new loss: where it goes, not CE's reason
        if kind is MapKind.NONE:
            why = "it has no attention map"
        elif (kind, loss) == (MapKind.SIGNED, MapLoss.CE):
            why = "its map has negative entries, so log A is undefined"
        raise InputError(
            f"{where}map loss {loss.value!r} does not apply to a {kind.value!r} attention ({why}); use "
            f"{' or '.join(repr(f) for f in fits)} (or 'auto')"
        )
    return loss


def map_loss_rule(kind: MapKind | str, loss: MapLoss | str = "auto") -> MapLossRule:
    """The table entry for a student layer of ``kind`` under ``loss``; an InputError where it is not a map loss."""
    loss = check_map_loss(loss, kind)
    if loss is MapLoss.OUTPUT:
        raise InputError("the 'output' loss compares attention outputs, not maps: use output_mse()")
    return MAP_LOSS_RULES[(MapKind(kind), loss)]


def map_distillation_loss(
    attn: TransferableAttention,
    student: LayerLogits,
    teacher: LayerLogits,
    loss: MapLoss | str = "auto",
    *,
    with_metric: bool = True,
    chunk: int | None = None,
    ce_path: CEPath | str | None = None,
    ce_path_forced: bool = True,
) -> Loss:
    """The ``loss`` ('auto': by map kind) between ``attn``'s map on ``student``'s q, k and the softmax map of
    ``teacher``'s (no gradient), through `MAP_LOSS_RULES`; the metric is KL for CE (for softmax layers only
    ``with_metric``: it costs a teacher pass), the loss itself for MSE. ``ce_path_forced``: ``ce_path`` was
    named, not resolved by ``transfer.ce_path: auto``, so where it cannot run on this call (attention_lse
    without the student's log-sum-exp) a `CEPathUnavailable` says why instead of the same CE by sdpa."""
    rule = map_loss_rule(attn.map_kind, loss)
    if teacher.key_pooling is not None:
        if student.scale is not None or student.bias is not None:
            raise InputError("a pooled map loss takes the student's own logit scale and no student bias")
    elif rule.exact:  # the O(N) identity, or the chunked biased path for logit biases and padded batches
        q_s, k_s = student.q, student.k
        if ce_path is not None and CEPath(ce_path) is CEPath.TRITON and q_s.shape[-2] != k_s.shape[-2]:
            raise CEPathUnavailable(
                f"the triton CE path takes square maps only, and this student layer's are {q_s.shape[-2]} "
                f"queries x {k_s.shape[-2]} keys (class attention or reduced keys): use transfer.ce_path=auto, "
                "rows or sdpa"
            )
        common = dict(scale_t=teacher.scale, scale_s=student.scale, chunk=chunk, with_kl=with_metric)
        if teacher.bias is not None or student.bias is not None or student.valid is not None:
            extra = dict(bias_t=teacher.bias, bias_s=student.bias, valid=student.valid)
            res = biased_attention_ce(teacher.q, teacher.k, q_s, k_s, **common, **extra)
        else:
            if student.lse is None and ce_path is not None and CEPath(ce_path) is CEPath.ATTENTION_LSE:
                if ce_path_forced:  # a named path runs as named or stops the run, never replaced unsaid
                    raise CEPathUnavailable(
                        f"the attention_lse CE path takes the student layer's log-sum-exp from its attention "
                        f"kernel, and this {type(attn).__name__} handed out none on this call (its logits "
                        "carried an attention mask, or it ran without AttentionIO(return_lse=True)): use "
                        "transfer.ce_path=auto or sdpa, the same CE with the log-sum-exp computed apart"
                    )
                ce_path = CEPath.SDPA  # auto's choice gives way to the same CE by sdpa
            res = attention_distillation_loss(
                teacher.q, teacher.k, q_s, k_s, **common, path=ce_path, lse_s=student.lse
            )
        return map_agreement(MapLoss.CE, res.total, res.logs.get("kl"))
    return _implicit_loss(rule, attn, student, teacher, chunk)


def implicit_map_loss(
    attn: TransferableAttention,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    loss: MapLoss | str = "auto",
    chunk: int | None = None,
) -> Loss:
    """The ``loss`` from ``attn``'s rows (`attention_map`) whatever its kind (softmax too): equal heads and tokens."""
    rule = map_loss_rule(attn.map_kind, loss)
    return _implicit_loss(rule, attn, LayerLogits(q_s, k_s), LayerLogits(q_t, k_t), chunk)


def output_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """MSE between two attention-module outputs (B, N, C) in fp32; the teacher's gets no gradient."""
    with fp32_section(student_out.device.type):
        return F.mse_loss(student_out.float(), teacher_out.detach().float())
