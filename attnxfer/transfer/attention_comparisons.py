"""The comparison losses of attention layers: ``map`` (a layer's map against its teacher layer's, by the loss of
its map kind) and ``mse`` (q, k or v element-wise): ``transfer.mode=distill`` and ``distill_q/k/v``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.attention import MapKind, attention_name_of
from ..models.attention.key_pooling import KeyPooling
from ..models.attention.numerics import fp32_section
from ..models.handover import Signal
from .comparisons import Comparison, ComparisonLoss, LayerPair, PlanModels, Step, comparison_loss
from .losses import CEPath, group_heads_ok, padding_from_mask
from .map_losses import LayerLogits, MapLoss, map_distillation_loss, map_loss_rule
from .modes import PlanError
from .pairing import attends_within_regions, reduced_keys
from .step_loss import Loss


@comparison_loss("map")
class MapComparison(ComparisonLoss):
    """The student layer's attention map against the teacher layer's softmax map, by its map kind's loss."""

    signals = (Signal.MAPS,)
    uses_ce_path = True

    def check_pair(self, comparison: Comparison, models: PlanModels, s: int, t: int, where: str) -> None:
        sa, ta = models.student_attn[s], models.teacher_attn[t]
        name = attention_name_of(sa)
        if not sa.map_kind.has_map:
            fix = (  # the mode's own distillation says which mode to pick instead
                "leave the layer out of transfer.layers, set transfer.mode=none (logit distillation still "
                "applies)"
                if comparison.origin.startswith("mode ")
                else f"remove {comparison.origin}"
            )
            raise PlanError(
                f"{where}: {name!r} attention has no attention map to distil (map kind 'none'); {fix} or "
                "pick a row-stochastic/signed attention"
            )
        if attends_within_regions(sa, models.student_parts[s]):
            raise PlanError(
                f"{where}: {name!r} attention in a shifted window restricts its rows to each query's region, "
                "which map distillation does not take (conversion's stage 1 fits them): leave the layer out of "
                + (
                    "transfer.layers or set transfer.mode=none"
                    if comparison.origin.startswith("mode ")
                    else f"{comparison.origin}'s layers"
                )
            )
        groups_heads = map_loss_rule(sa.map_kind).groups_heads
        if not groups_heads and ta.num_heads != sa.num_heads:
            raise PlanError(
                f"{where}: map distillation into {name!r} attention needs equal head counts (teacher "
                f"{ta.num_heads}, student {sa.num_heads}); set the student's num_heads={ta.num_heads} "
                "(model.kwargs.num_heads in a config)"
            )
        if groups_heads and not group_heads_ok(ta.num_heads, sa.num_heads):
            raise PlanError(
                f"{where}: teacher has {ta.num_heads} heads, student {sa.num_heads}; distillation needs "
                "the teacher's head count to equal or be a whole multiple of the student's "
                f"(e.g. student num_heads={ta.num_heads}: model.kwargs.num_heads in a config)"
            )

    def pools_teacher_keys(self, comparison: Comparison, models: PlanModels, s: int, t: int) -> bool:
        """A student layer keying every token of its stage (a zoo attention) against a teacher layer that says
        which tokens each of its keys was made from (PVTv2's ``key_pooling``), as conversion's stage 1 pools."""
        sa, ta = models.student_attn[s], models.teacher_attn[t]
        return (
            not models.student_parts[s] and callable(getattr(ta, "key_pooling", None)) and sa.map_kind.has_map
        )

    def note(self, comparison: Comparison, models: PlanModels, s: int, t: int) -> str:
        """What the layer's loss compares, as the map-loss table says for its map kind."""
        sa, ta = models.student_attn[s], models.teacher_attn[t]
        text = f"{attention_name_of(sa)}: {map_loss_rule(sa.map_kind).describe}"
        if ta.num_heads != sa.num_heads:  # per layer: a hierarchical model's head counts change by stage
            text += f", the teacher's maps averaged in groups of {ta.num_heads // sa.num_heads} heads"
        reduced = reduced_keys(ta)
        if models.student_parts[s] != models.teacher_parts[t] and reduced is not None:
            text += f", pooled onto the teacher's reduced keys ({reduced} of tokens)"
        return text

    def wants_lse(self, pair: LayerPair, ce_path: CEPath) -> bool:
        """A softmax layer on a path that takes the student kernel's log-sum-exp, where the teacher layer handed
        over no logit bias on this step (a teacher bias takes the biased CE, which needs none). Decided by what
        the layers do on this call, not by what their class may do: a student layer that adds a bias hands out
        no lse on that call anyway (`TransferableAttention.transfer_forward`), and one whose class may add a
        bias but whose instance adds none (SAM with rope) then really takes the attention_lse path."""
        return (
            ce_path.needs_student_lse
            and pair.student_attn.map_kind is MapKind.SOFTMAX
            and pair.teacher.get("bias") is None
        )

    def compare_layer(self, comparison: Comparison, pair: LayerPair, step: Step) -> Loss:
        s_attn, t_attn, student, teacher = pair.student_attn, pair.teacher_attn, pair.student, pair.teacher
        q_s, q_t = student["q"], teacher["q"]
        res = map_distillation_loss(
            s_attn,
            LayerLogits(
                q_s,
                student["k"],
                scale=_scale_if_own(s_attn, q_s),
                bias=student.get("bias"),
                valid=padding_from_mask(student.get("mask"), q_s.shape[-2]),
                lse=student.get("lse"),
            ),
            LayerLogits(
                q_t,
                teacher["k"],
                scale=_scale_if_own(t_attn, q_t),
                bias=teacher.get("bias"),
                key_pooling=_pooled_keys(teacher, student["k"]),
            ),
            with_metric=step.with_metric,
            ce_path=step.ce_path,
            ce_path_forced=step.ce_path_forced,
        )
        layer = pair.student_layer
        kl = res.logs.get(MapLoss.CE.metric)  # logged beside CE (an MSE's metric is the loss itself)
        logs = {} if kl is None else {f"attn_kl/{layer}": kl}
        return Loss(res.total, {f"{term}/{layer}": value for term, value in res.terms.items()}, logs)


@comparison_loss("mse")
class ProjectionMSE(ComparisonLoss):
    """MSE between the student layer's q, k or v and the teacher layer's, head by head."""

    signals = (Signal.Q, Signal.K, Signal.V)

    def check_pair(self, comparison: Comparison, models: PlanModels, s: int, t: int, where: str) -> None:
        check_heads_match(comparison.origin, where, models.teacher_attn[t], models.student_attn[s])
        check_head_dims_match(comparison.origin, where, models.teacher_attn[t], models.student_attn[s])

    def compare_layer(self, comparison: Comparison, pair: LayerPair, step: Step) -> Loss:
        c = comparison.signal
        with fp32_section(pair.student[c].device.type):
            loss = F.mse_loss(pair.student[c].float(), pair.teacher[c].detach().float())
        return Loss(loss, {f"{comparison.name}/{pair.student_layer}": loss})  # mse_q/3, its sum's mse_q


def check_heads_match(who: str, where: str, ta: nn.Module, sa: nn.Module) -> None:
    """Head-by-head pairing (copy, q/k/v distillation) needs equal head counts."""
    if ta.num_heads != sa.num_heads:
        raise PlanError(
            f"{where}: {who} needs equal head counts (teacher {ta.num_heads}, "
            f"student {sa.num_heads}); set the student's num_heads={ta.num_heads} "
            "(model.kwargs.num_heads in a config)"
            + (
                " or use mode=distill, which averages teacher heads in groups"
                if group_heads_ok(ta.num_heads, sa.num_heads)
                else ""
            )
        )


def check_head_dims_match(who: str, where: str, ta: nn.Module, sa: nn.Module) -> None:
    """Teacher and student q/k/v meeting inside one layer or one loss need equal head dims."""
    if ta.head_dim != sa.head_dim:
        raise PlanError(
            f"{where}: {who} mixes teacher and student q/k/v, so head dims must match "
            f"(teacher {ta.head_dim}, student {sa.head_dim}); set the student's embed_dim to "
            f"{sa.num_heads * ta.head_dim} (model.kwargs.embed_dim in a config)"
        )


def _pooled_keys(teacher_sig: Mapping[str, Any], k_s: torch.Tensor) -> KeyPooling | None:
    """The teacher layer's `KeyPooling` where its keys reduce the tokens the student layer keys, else None."""
    pooling = teacher_sig.get("key_pooling")
    if pooling is None or k_s.shape[-2] != pooling.num_tokens or teacher_sig["k"].shape[-2] == k_s.shape[-2]:
        return None
    return pooling


def _scale_if_own(attn: nn.Module, q: torch.Tensor) -> float | None:
    """The layer's logit scale where it is not timm's default d^-0.5 (None: the default)."""
    scale = attn.logit_scale(q)
    return None if scale == q.shape[-1] ** -0.5 else scale
