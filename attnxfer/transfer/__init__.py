"""The dual teacher–student wrapper, transfer plans, losses and optimiser groups."""
from .dual import DualViT, TransferOutput
from .losses import (AttentionLoss, attention_ce_reference, attention_distillation_loss, row_logsumexp,
                     teacher_entropy)
from .optim import student_param_groups
from .plan import MODES, PlanError, TransferMode, TransferPlan, build_plan, map_layers, select_layers

__all__ = ["DualViT", "TransferOutput", "AttentionLoss", "attention_ce_reference", "attention_distillation_loss",
           "row_logsumexp", "teacher_entropy", "student_param_groups", "MODES", "PlanError", "TransferMode",
           "TransferPlan", "build_plan", "map_layers", "select_layers"]
