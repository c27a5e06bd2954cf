"""Logit distillation: the comparison loss ``logit_kd`` (``transfer.logit_distill`` is an entry of it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..models.attention.numerics import fp32_section
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
from .step_loss import Loss


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch, in fp32 (Hinton et al.'s scaling keeps
    the gradient's size independent of T)."""
    # kl_div broadcasts: a teacher's batch of 1 (or one class) would be compared with every student row
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit distillation compares logits of one shape (batch, classes): student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:  # 0 gave NaN, a negative one the KL of the inverted distributions
        raise ValueError(f"logit distillation needs a temperature > 0, got {temperature}")
    with fp32_section(student_logits.device.type):
        t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@comparison_loss("logit_kd")
class LogitDistillation(ComparisonLoss):
    """KL between the teacher's and the student's class distributions at ``temperature`` (T²-scaled)."""

    signals = (Signal.LOGITS,)
    options: ClassVar[Mapping[str, Any]] = {"temperature": 1.0}

    def check(self, comparison: Comparison, models: PlanModels) -> None:
        temperature = comparison.option("temperature")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise PlanError(
                f"{comparison.origin or self.name}: logit distillation needs temperature > 0, got {temperature}"
            )
        drop = drop_hint(comparison)
        if models.teacher is None:
            raise PlanError(
                f"logit distillation ({asked_by(comparison)}) needs a teacher; set teacher.spec, or {drop}"
            )
        t_classes = getattr(models.teacher, "num_classes", 0)
        s_classes = getattr(models.student, "num_classes", 0)
        if not t_classes:
            raise PlanError(
                "the teacher has no classifier head (num_classes=0, e.g. an MAE encoder), so there are "
                f"no teacher logits to distil; {drop}"
            )
        if t_classes != s_classes:
            raise PlanError(
                f"logit distillation needs the teacher's classes: teacher has {t_classes}, student "
                f"{s_classes}; {drop}, or use a teacher trained on this label set"
            )

    def describe(self, comparison: Comparison) -> list[str]:
        return [
            f"  logit distillation: weight {comparison.weight:g}, temperature "
            f"{comparison.option('temperature'):g} (KL between teacher and student class distributions)"
        ]

    def compare(
        self, comparison: Comparison, student: torch.Tensor, teacher: torch.Tensor, step: Step
    ) -> Loss:
        kd = logit_distillation_loss(student, teacher, float(comparison.option("temperature")))
        return Loss(kd, {"logit_kd": kd})
