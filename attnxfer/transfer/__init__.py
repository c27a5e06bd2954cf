"""The algorithm: transfer plans, the dual teacher–student wrapper and the losses (no config, no I/O)."""

from ..models.handover import Chunks, Signal
from .conversion import ConversionPlan, LayerConversion, Stage1Train, build_conversion_plan
from .dual import DualViT, TransferOutput, logit_distillation_loss
from .losses import (
    AttentionLoss,
    attention_ce_reference,
    attention_distillation_loss,
    row_logsumexp,
    teacher_entropy,
)
from .map_losses import MapLoss, implicit_map_loss, map_distillation_loss
from .plan import MODES, PlanError, TransferMode, TransferPlan, build_plan, map_layers, select_layers

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
