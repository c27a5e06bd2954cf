"""The algorithm: transfer plans, the teacher–student wrapper and the losses (no config, no I/O)."""

from ..models.handover import Chunks, Signal
from .conversion import ConversionPlan, LayerConversion, Stage1Train, build_conversion_plan
from .losses import (
    AttentionLoss,
    attention_ce_reference,
    attention_distillation_loss,
    row_logsumexp,
    teacher_entropy,
)
from .map_losses import MapLoss, implicit_map_loss, map_distillation_loss
from .plan import MODES, PlanError, TransferMode, TransferPlan, build_plan, map_layers, select_layers
from .teacher_student import TeacherStudent, TransferOutput, logit_distillation_loss

#: The name `TeacherStudent` had in earlier releases (it runs every family, not only ViTs); kept for code written against them.
DualViT = TeacherStudent

__all__ = [
    "MODES",
    "AttentionLoss",
    "Chunks",
    "ConversionPlan",
    "DualViT",
    "LayerConversion",
    "MapLoss",
    "PlanError",
    "Signal",
    "Stage1Train",
    "TeacherStudent",
    "TransferMode",
    "TransferOutput",
    "TransferPlan",
    "attention_ce_reference",
    "attention_distillation_loss",
    "build_conversion_plan",
    "build_plan",
    "implicit_map_loss",
    "logit_distillation_loss",
    "map_distillation_loss",
    "map_layers",
    "row_logsumexp",
    "select_layers",
    "teacher_entropy",
]
