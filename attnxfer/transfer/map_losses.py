"""Map-distillation losses: how close a student layer's attention map is to a softmax teacher's,
dispatched on the student layer's declared map kind.

The teacher's map is P_t = softmax(s·q_t k_tᵀ). The student layer's `MapKind` chooses the loss by
default, and a table (`MAP_LOSS_RULES`) says how each (kind, loss) pair is computed:

====================  ===========  ==========================================================================
student map kind      default      computed by
====================  ===========  ==========================================================================
``softmax``           ``ce``       the exact O(N) row cross-entropy (`losses.attention_distillation_loss`):
                                   no N×N map, teacher heads averaged in groups, unequal head dims allowed
``row_stochastic``    ``ce``       −Σ_j P_t log A_s from the layer's implicit rows, in checkpointed row chunks
``signed``            ``mse``      mean over (batch, head, query, key) of (A_s − P_t)², in row chunks
                                   (Nyström, Linformer: rows may go negative, so no log)
``none``              ``output``   not a map loss: the caller compares attention outputs (`output_mse`)
====================  ===========  ==========================================================================

``mse`` also applies to softmax and row-stochastic maps. Where the teacher's keys are a reduction of the
student's (PVTv2's spatial reduction: N_k = N / sr² keys, each made from an sr×sr block of tokens), a
`KeyPooling` pools the student's row onto the teacher's keys (its mass on each block, `MapLossRule.pooled`):
CE and MSE then compare rows over the N_k keys. A softmax student's pooled log-mass is an exact log-sum-exp
per block; a kernel map φ(q)·φ(k_j)/Z pools φ(k) per block (Σ_{j∈block} φ(k_j)), so a row chunk never
holds more than N_k entries; any other map pools its `attention_map` rows, a chunk at a time. Every loss comes with an agreement metric:
KL = CE − H(P_t) beside CE, the loss itself for MSE. Everything runs in fp32 with autocast off. Under
autograd each implicit chunk is checkpointed, so the backward pass recomputes a chunk's rows instead
of keeping every chunk's (B, H, rows, N) tensors. Zeros in a row-stochastic student map (window
attention outside its window) are floored at fp32's smallest normal number (log ≈ −87.3): the CE
stays finite and large where the student cannot put weight that the teacher does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import InputError
from ..models.attention import MapKind, TransferableAttention
from ..models.attention.bias_rows import BiasRows, bias_block
from ..models.attention.key_pooling import KeyPooling
from ..models.attention.numerics import fp32_section, row_chunk
from ..models.efficient.kernels import KernelAttention
from .losses import CEPath, attention_distillation_loss, biased_attention_ce, ce_path_for

__all__ = [
    "DEFAULT_MAP_LOSS",
    "MAP_LOSSES",
    "MAP_LOSS_RULES",
    "MapAgreement",
    "MapLoss",
    "MapLossRule",
    "check_map_loss",
    "default_map_loss",
    "implicit_map_loss",
    "map_distillation_loss",
    "map_loss_rule",
    "output_mse",
]


class MapLoss(StrEnum):
    """A way to compare a student layer with its teacher; its value is the config's name for it."""

    AUTO = "auto"  # the default for the student layer's map kind (`DEFAULT_MAP_LOSS`)
    CE = "ce"
    MSE = "mse"
    OUTPUT = "output"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def metric(self) -> str:
        """Name of the agreement metric reported beside the loss."""
        return _METRICS[self]

    @property
    def term(self) -> str:
        """Key prefix of the loss among a training step's terms (``attn_ce/3``)."""
        return _TERMS[self]

    @property
    def logged_metric(self) -> str | None:
        """Key prefix under which the metric is logged beside the loss (KL beside CE), or None."""
        return "attn_kl" if self is MapLoss.CE else None


_METRICS = {MapLoss.CE: "kl", MapLoss.MSE: "map_mse", MapLoss.OUTPUT: "output_mse"}
_TERMS = {MapLoss.CE: "attn_ce", MapLoss.MSE: "attn_mse", MapLoss.OUTPUT: "attn_output_mse"}


class MapAgreement(NamedTuple):
    """One layer's loss (differentiable w.r.t. the student) and its detached agreement metric (None when
    not asked for and not free)."""

    loss: torch.Tensor
    metric: torch.Tensor | None
    metric_name: str
    kind: MapLoss = MapLoss.CE


# --------------------------------------------------------------------------------------- the computations
def _teacher_rows(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    rows: slice,
    scale_t: float | None = None,
    bias_t: torch.Tensor | BiasRows | None = None,
) -> torch.Tensor:
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    z = (q_t[..., rows, :] * scale_t) @ k_t.transpose(-2, -1)
    if bias_t is not None:
        z = z + bias_block(bias_t, rows).to(z.dtype)
    return z.softmax(dim=-1)


def _plain_kernel_map(attn: TransferableAttention) -> bool:
    """Whether ``attn``'s map is exactly KernelAttention's φ(q)·φ(k_j) / Σ_j φ(q)·φ(k_j)."""
    cls = type(attn)
    return (
        isinstance(attn, KernelAttention)
        and cls._map_context is KernelAttention._map_context
        and cls._map_rows is KernelAttention._map_rows
    )


def _student_rows(attn, q_s, k_s, rows: slice, pooling: KeyPooling | None) -> torch.Tensor:
    """Rows of the student's map, pooled onto the teacher's reduced keys where ``pooling`` is given."""
    if pooling is None:
        return attn.attention_map(q_s, k_s, rows)
    if _plain_kernel_map(attn):  # pool φ(k) per block: (rows × N_k), never (rows × N)
        phi_q, phi_k = attn.features(q_s, k_s)
        phi_q = phi_q[:, :, rows]
        z = phi_q @ phi_k.sum(-2, keepdim=True).transpose(-2, -1)
        return (phi_q @ pooling.pool_tokens(phi_k).transpose(-2, -1)) / z
    return pooling.pool(attn.attention_map(q_s, k_s, rows))


def _student_log_rows(attn, q_s, k_s, rows: slice, pooling: KeyPooling | None) -> torch.Tensor:
    """log of `_student_rows` (zeros floored at fp32's tiny); a softmax student's pooled rows exactly, as
    log-sum-exp per block minus the row's log-sum-exp."""
    if pooling is not None and attn.map_kind is MapKind.SOFTMAX:
        logits = (q_s[:, :, rows] * attn.logit_scale(q_s)) @ k_s.transpose(-2, -1)
        return pooling.log_pool(logits) - logits.logsumexp(-1, keepdim=True)
    a_s = _student_rows(attn, q_s, k_s, rows, pooling)
    return torch.log(a_s.clamp_min(torch.finfo(a_s.dtype).tiny))


def _ce_chunk(attn, q_s, k_s, q_t, k_t, start: int, stop: int, scale_t=None, bias_t=None, pooling=None):
    """Sums over the chunk of −Σ_j P_t log A_s and of the teacher's entropy (no gradient)."""
    rows = slice(start, stop)
    log_a = _student_log_rows(attn, q_s, k_s, rows, pooling)
    p_t = _teacher_rows(q_t, k_t, rows, scale_t, bias_t)
    ce = -(p_t * log_a).sum()
    entropy = -torch.special.xlogy(p_t, p_t).sum()
    return ce, entropy


def _mse_chunk(attn, q_s, k_s, q_t, k_t, start: int, stop: int, scale_t=None, bias_t=None, pooling=None):
    rows = slice(start, stop)
    diff = _student_rows(attn, q_s, k_s, rows, pooling) - _teacher_rows(q_t, k_t, rows, scale_t, bias_t)
    return diff.pow(2).sum(), diff.new_zeros(())


def _check_equal_shapes(q_s, k_s, q_t, k_t, pooling: KeyPooling | None = None) -> None:
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
        return
    if q_s.shape[:3] != q_t.shape[:3] or k_s.shape[-2] != k_t.shape[-2]:
        raise InputError(
            f"teacher and student attention shapes differ: q {tuple(q_t.shape)} vs {tuple(q_s.shape)}; "
            "the student needs the teacher's heads and tokens"
        )


def _refuse_student_bias_and_padding(bias_s, valid) -> None:
    """What the implicit-map loss cannot take: a student's own logit bias, a padded batch."""
    if bias_s is not None:
        raise InputError(
            "the implicit-map loss reads the student's map from attention_map(q, k), which has no logit bias"
        )
    if valid is not None:
        raise InputError(
            "padded batches (a padding mask over their patches) are distilled into softmax students only: the "
            "implicit-map loss has no padding mask; batch images of one size, or use a softmax student"
        )


def _summed_chunks(fn, attn, q_s, k_s, q_t, k_t, step: int, scale_t, bias_t, key_pooling):
    """``fn``'s (loss sum, entropy sum) over query-row chunks of ``step`` rows; under autograd each chunk
    is checkpointed, so its rows are rebuilt in backward instead of kept."""
    N = q_s.shape[2]
    grad = torch.is_grad_enabled() and (
        q_s.requires_grad or k_s.requires_grad or any(p.requires_grad for p in attn.parameters())
    )
    total = entropy = q_s.new_zeros(())
    for start in range(0, N, step):
        args = (attn, q_s, k_s, q_t, k_t, start, min(start + step, N), scale_t, bias_t, key_pooling)
        part, ent = checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)
        total = total + part
        entropy = entropy + ent.detach()
    return total, entropy


def _implicit_loss(
    loss: MapLoss,
    attn: TransferableAttention,
    q_s,
    k_s,
    q_t,
    k_t,
    *,
    with_metric: bool = True,
    chunk: int | None = None,
    ce_path: CEPath | str | None = None,
    lse_s: torch.Tensor | None = None,
    scale_t: float | None = None,
    bias_t: torch.Tensor | BiasRows | None = None,
    scale_s: float | None = None,
    bias_s: torch.Tensor | BiasRows | None = None,
    valid: torch.Tensor | None = None,
    key_pooling: KeyPooling | None = None,
) -> MapAgreement:
    """CE or MSE from the layer's rows (`attention_map`), in checkpointed row chunks; the metric is free.
    (``ce_path``/``lse_s`` concern softmax layers' exact CE only; the teacher's logits take ``scale_t`` and
    ``bias_t``; a student with a logit bias of its own is refused here: its map is not ``attention_map``.)
    With ``key_pooling`` the student's rows are pooled onto the teacher's reduced keys first."""
    _refuse_student_bias_and_padding(bias_s, valid)
    _check_equal_shapes(q_s, k_s, q_t, k_t, key_pooling)
    fn = _ce_chunk if loss is MapLoss.CE else _mse_chunk
    B, H, N, _ = q_s.shape
    compared = k_t.shape[-2]  # the teacher's keys: a row's entries the loss compares
    # a chunk keeps a few (B, H, rows, M) tensors alive: student rows, teacher rows, their product
    step = row_chunk(q_s, k_s.shape[-2], chunk, live_tensors=4)
    with fp32_section(q_s.device.type):
        q_t, k_t = q_t.detach().float(), k_t.detach().float()
        bias_t = bias_t.detach() if bias_t is not None else None
        q_s, k_s = q_s.float(), k_s.float()
        total, entropy = _summed_chunks(fn, attn, q_s, k_s, q_t, k_t, step, scale_t, bias_t, key_pooling)
        if loss is MapLoss.CE:
            value = total / (B * H * N)
            metric = value.detach() - entropy / (B * H * N)
        else:
            value = total / (B * H * N * compared)
            metric = value.detach()
    return MapAgreement(value, metric, loss.metric, loss)


def _exact_softmax_ce(
    attn: TransferableAttention,
    q_s,
    k_s,
    q_t,
    k_t,
    *,
    with_metric: bool = True,
    chunk: int | None = None,
    ce_path: CEPath | str | None = None,
    lse_s: torch.Tensor | None = None,
    scale_t: float | None = None,
    bias_t: torch.Tensor | BiasRows | None = None,
    scale_s: float | None = None,
    bias_s: torch.Tensor | BiasRows | None = None,
    valid: torch.Tensor | None = None,
) -> MapAgreement:
    """The exact CE of a softmax student layer (no map built; head groups; unequal head dims): the O(N)
    identity for plain q·kᵀ logits, also where the key set differs from the queries (CaiT's class
    attention: one query row; spatially reduced keys), and the chunked biased path
    (`biased_attention_ce`) when either side's logits carry a bias (relative-position tables) or the
    batch is padded (``valid``). The ``triton`` kernels take square maps only: other shapes take the
    device's default path."""
    if ce_path is not None and CEPath(ce_path) is CEPath.TRITON and q_s.shape[-2] != k_s.shape[-2]:
        ce_path = ce_path_for(q_s.device)
    if bias_t is not None or bias_s is not None or valid is not None:
        res = biased_attention_ce(
            q_t,
            k_t,
            q_s,
            k_s,
            bias_t=bias_t,
            bias_s=bias_s,
            scale_t=scale_t,
            scale_s=scale_s,
            chunk=chunk,
            with_kl=with_metric,
            valid=valid,
        )
        return MapAgreement(res.ce, res.kl, MapLoss.CE.metric, MapLoss.CE)
    res = attention_distillation_loss(
        q_t,
        k_t,
        q_s,
        k_s,
        scale_t=scale_t,
        scale_s=scale_s,
        chunk=chunk,
        with_kl=with_metric,
        path=ce_path,
        lse_s=lse_s,
    )
    return MapAgreement(res.ce, res.kl, MapLoss.CE.metric, MapLoss.CE)


@dataclass(frozen=True)
class MapLossRule:
    """How one (student map kind, loss) pair is computed, and what it allows."""

    compute: Callable[..., MapAgreement]
    #: the teacher may have a whole multiple of the student's heads (its maps averaged in groups)
    groups_heads: bool = False
    #: how the pair is computed when the teacher's keys pool the student's (a `KeyPooling`: PVTv2's spatial
    #: reduction); None: refused
    pooled: Callable[..., MapAgreement] | None = None
    #: what the loss compares, in words (what a transfer plan prints for the layer)
    describe: str = ""


_POOLED_CE = partial(_implicit_loss, MapLoss.CE)
_POOLED_MSE = partial(_implicit_loss, MapLoss.MSE)
MAP_LOSS_RULES: dict[tuple[MapKind, MapLoss], MapLossRule] = {
    (MapKind.SOFTMAX, MapLoss.CE): MapLossRule(
        _exact_softmax_ce,
        groups_heads=True,
        pooled=_POOLED_CE,
        describe="CE between teacher and student attention rows (exact, no N x N map)",
    ),
    (MapKind.ROW_STOCHASTIC, MapLoss.CE): MapLossRule(
        partial(_implicit_loss, MapLoss.CE),
        pooled=_POOLED_CE,
        describe="CE between the teacher's attention rows and the rows of the student's row-stochastic map",
    ),
    (MapKind.SOFTMAX, MapLoss.MSE): MapLossRule(
        partial(_implicit_loss, MapLoss.MSE),
        pooled=_POOLED_MSE,
        describe="MSE between teacher and student attention maps",
    ),
    (MapKind.ROW_STOCHASTIC, MapLoss.MSE): MapLossRule(
        partial(_implicit_loss, MapLoss.MSE),
        pooled=_POOLED_MSE,
        describe="MSE between the teacher's attention map and the student's row-stochastic map",
    ),
    (MapKind.SIGNED, MapLoss.MSE): MapLossRule(
        partial(_implicit_loss, MapLoss.MSE),
        pooled=_POOLED_MSE,
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
#: loss -> the map kinds it applies to (``output`` compares attention outputs, so it applies to every kind)
MAP_LOSSES: dict[MapLoss, tuple[MapKind, ...]] = {
    loss: tuple(kind for kind in MapKind if (kind, loss) in MAP_LOSS_RULES or loss is MapLoss.OUTPUT)
    for loss in MapLoss
    if loss is not MapLoss.AUTO
}


def default_map_loss(kind: MapKind | str) -> MapLoss:
    return DEFAULT_MAP_LOSS[MapKind(kind)]


def check_map_loss(loss: MapLoss | str, kind: MapKind | str, where: str = "") -> MapLoss:
    """``loss`` ('auto' resolves by kind) as a `MapLoss` if it applies to ``kind``, else a ValueError saying
    what does. This is where a config's loss name becomes data."""
    kind = MapKind(kind)
    try:
        loss = MapLoss(loss)
    except ValueError:
        raise InputError(
            f"unknown map loss {loss!r}; choose one of {', '.join(m.value for m in MapLoss)}"
        ) from None
    if loss is MapLoss.AUTO:
        return default_map_loss(kind)
    if kind not in MAP_LOSSES[loss]:
        fits = [name.value for name, kinds in MAP_LOSSES.items() if kind in kinds]
        why = {
            MapKind.SIGNED: "its map has negative entries, so log A is undefined",
            MapKind.NONE: "it has no attention map",
        }.get(kind, "")
        raise InputError(
            f"{where}map loss {loss.value!r} does not apply to a {kind.value!r} attention ({why}); use "
            f"{' or '.join(repr(f) for f in fits)} (or 'auto')"
        )
    return loss


def map_loss_rule(kind: MapKind | str, loss: MapLoss | str = "auto") -> MapLossRule:
    """The table entry for a student layer of ``kind`` under ``loss``; a ValueError where it is not a map loss."""
    loss = check_map_loss(loss, kind)
    if loss is MapLoss.OUTPUT:
        raise InputError("the 'output' loss compares attention outputs, not maps: use output_mse()")
    return MAP_LOSS_RULES[(MapKind(kind), loss)]


def map_distillation_loss(
    attn: TransferableAttention,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    loss: MapLoss | str = "auto",
    *,
    with_metric: bool = True,
    chunk: int | None = None,
    ce_path: CEPath | str | None = None,
    lse_s: torch.Tensor | None = None,
    scale_t: float | None = None,
    bias_t: torch.Tensor | BiasRows | None = None,
    scale_s: float | None = None,
    bias_s: torch.Tensor | BiasRows | None = None,
    valid: torch.Tensor | None = None,
    key_pooling: KeyPooling | None = None,
) -> MapAgreement:
    """The ``loss`` ('auto': by map kind) between the student layer ``attn``'s map on (q_s, k_s) and the
    softmax map of the teacher's (q_t, k_t), dispatched on ``attn.map_kind`` through `MAP_LOSS_RULES`.

    q/k are (B, H, N, d); ``q_t``/``k_t`` get no gradient. Returns the loss (mean over rows for CE, over
    entries for MSE) and the detached metric: KL for CE (for softmax layers only ``with_metric``, as it
    costs a teacher pass), the loss itself for MSE. A softmax layer's exact CE takes ``ce_path`` (default:
    by device) and, for ``attention_lse``, the layer's own log-sum-exp ``lse_s``. ``scale_*``/``bias_*``:
    the layers' logit scales (default d^-0.5) and additive logit biases (adapters' ``logit_bias``).
    ``valid`` (B, N): a padded batch's real tokens (`losses.padding_from_mask`): padded keys and rows are
    left out (softmax students). ``key_pooling``: the teacher's keys are a reduction of the student's (PVTv2's
    spatial reduction, captured with the teacher's q and k): the student's rows are pooled onto them
    (`MapLossRule.pooled`).
    """
    rule = map_loss_rule(attn.map_kind, loss)
    extra = {
        k: v
        for k, v in dict(scale_t=scale_t, bias_t=bias_t, scale_s=scale_s, bias_s=bias_s, valid=valid).items()
        if v is not None
    }
    compute = rule.compute
    if key_pooling is not None:
        if rule.pooled is None:
            raise InputError(
                f"map loss {check_map_loss(loss, attn.map_kind).value!r} on a {attn.map_kind.value!r} "
                "attention cannot compare maps over the teacher's reduced keys"
            )
        if scale_s is not None or bias_s is not None:
            raise InputError("a pooled map loss takes the student's own logit scale and no student bias")
        compute, extra = rule.pooled, {**extra, "key_pooling": key_pooling}
    return compute(
        attn, q_s, k_s, q_t, k_t, with_metric=with_metric, chunk=chunk, ce_path=ce_path, lse_s=lse_s, **extra
    )


def implicit_map_loss(
    attn: TransferableAttention,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    loss: MapLoss | str = "auto",
    chunk: int | None = None,
) -> MapAgreement:
    """The ``loss`` ('ce' or 'mse'; 'auto' by map kind) computed from ``attn``'s rows (`attention_map`),
    whatever its kind: the chunked path (for softmax layers too), equal heads and tokens."""
    loss = check_map_loss(loss, attn.map_kind)
    if loss is MapLoss.OUTPUT:
        raise InputError("the 'output' loss compares attention outputs, not maps: use output_mse()")
    return _implicit_loss(loss, attn, q_s, k_s, q_t, k_t, chunk=chunk)


def output_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """MSE between two attention-module outputs (B, N, C) in fp32; the teacher's gets no gradient."""
    with fp32_section(student_out.device.type):
        return F.mse_loss(student_out.float(), teacher_out.detach().float())
