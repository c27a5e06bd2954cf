"""Feature distillation: a student's final token features (after the final norm) pulled onto its frozen
teacher's, per token ``(1 - cos(s, t)) + smooth_l1((s - mu_t) / sigma_t, (t - mu_t) / sigma_t)`` (mu_t,
sigma_t: the teacher token's channel statistics), averaged over tokens in fp32.

Why: CLIP and DINOv2 carry a few tokens of tens of times the others' norm and a few huge channels, which a
plain MSE would be all about. Standardising by the teacher token's own statistics (as Wei et al. 2022
whiten targets) puts every token on one scale without batch statistics; smooth-L1 keeps outlier channels
from dominating the gradient; the cosine aligns directions (what k-NN and linear probes read).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.handover import Signal
from .comparisons import (
    Comparison,
    ComparisonLoss,
    PlanModels,
    Step,
    asked_by,
    comparison_loss,
    drop_hint,
)
from .modes import PlanError
from .pairing import check_token_layouts
from .step_loss import Loss


def num_prefix_tokens(model: nn.Module) -> int:
    """timm's ``num_prefix_tokens`` (class and register tokens); 0 where a family has none (Swin, PVTv2)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def final_tokens(features: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``forward_features``'s output as tokens (B, N, C); a 4-D map flattened by timm's ``output_fmt`` (default NCHW)."""
    if features.ndim == 3:
        return features
    if features.ndim != 4:
        raise ValueError(f"final features of shape {tuple(features.shape)}: expected (B, N, C) or a 4-D map")
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return features.flatten(1, 2)
    return features.flatten(2).transpose(1, 2)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or wider if it already is (float64 keeps its precision for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def feature_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    num_prefix: int,
    *,
    beta: float = 1.0,
    eps: float = 1e-6,
) -> Loss:
    """The loss above between final tokens (B, N, C), the first ``num_prefix`` prefix tokens; ``beta`` in
    teacher standard deviations, ``eps`` added to the variance and the cosine's norms. Its terms are the
    detached parts ``feat_cos`` and ``feat_smooth_l1``, also per token group (``feat_cos/prefix``, ...)."""
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(
            f"student and teacher final tokens must be the same (B, N, C); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if not 0 <= num_prefix <= student.shape[1]:
        raise ValueError(f"num_prefix={num_prefix} for {student.shape[1]} tokens")
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = _wide(student), _wide(teacher.detach())
        mu = t.mean(dim=-1, keepdim=True)
        sigma = (t.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
        l1 = F.smooth_l1_loss((s - mu) / sigma, (t - mu) / sigma, beta=beta, reduction="none").mean(dim=-1)
        cos = 1.0 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp_min(eps)
        loss = cos.mean() + l1.mean()
        terms = {"feat_cos": cos.mean().detach(), "feat_smooth_l1": l1.mean().detach()}
        for group, part in (("prefix", slice(0, num_prefix)), ("patch", slice(num_prefix, None))):
            if cos[:, part].numel():
                terms[f"feat_cos/{group}"] = cos[:, part].mean().detach()
                terms[f"feat_smooth_l1/{group}"] = l1[:, part].mean().detach()
    return Loss(loss, terms)


@comparison_loss("feature_distill")
class FeatureDistillation(ComparisonLoss):
    """`feature_distill_loss` between the two models' final tokens: the same tokens, the same width."""

    signals = (Signal.FEATURES,)

    def check(self, comparison: Comparison, models: PlanModels) -> None:
        teacher, student, drop = models.teacher, models.student, drop_hint(comparison)
        if teacher is None:
            raise PlanError(
                f"feature distillation ({asked_by(comparison)}) needs a teacher; set teacher.spec, or {drop}"
            )
        check_token_layouts(teacher, student)
        t_width, s_width = getattr(teacher, "num_features", None), getattr(student, "num_features", None)
        if t_width != s_width:
            raise PlanError(
                f"feature distillation compares final tokens channel by channel: the teacher's have "
                f"{t_width} channels, the student's {s_width}; give the student the teacher's embed_dim "
                f"({t_width}), or {drop}"
            )

    def describe(self, comparison: Comparison) -> list[str]:
        return [
            f"  feature distillation: weight {comparison.weight:g}, final token features after the final "
            "norm (prefix and patch tokens): cosine distance + smooth-L1 on tokens standardised by the "
            "teacher's"
        ]

    def compare(
        self, comparison: Comparison, student: torch.Tensor, teacher: torch.Tensor, step: Step
    ) -> Loss:
        return feature_distill_loss(
            final_tokens(student, step.student),
            final_tokens(teacher, step.teacher),
            num_prefix_tokens(step.teacher),
        )
