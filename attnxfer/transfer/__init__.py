"""The dual teacher–student wrapper, transfer plans, losses and optimiser groups."""
from .convert import build_efficient_student, convert
from .dual import DualViT, TransferOutput, logit_distillation_loss
from .map_losses import MapLoss, implicit_map_loss, map_distillation_loss
from .losses import (AttentionLoss, attention_ce_reference, attention_distillation_loss, row_logsumexp,
                     teacher_entropy)
from .optim import student_param_groups
from .plan import MODES, Distill, PlanError, TransferMode, TransferPlan, build_plan, map_layers, select_layers

__all__ = ["build_efficient_student", "convert", "logit_distillation_loss", "implicit_map_loss", "MapLoss",
           "map_distillation_loss", "Distill", "DualViT",
           "TransferOutput", "AttentionLoss", "attention_ce_reference", "attention_distillation_loss",
           "row_logsumexp", "teacher_entropy", "student_param_groups", "MODES", "PlanError", "TransferMode",
           "TransferPlan", "build_plan", "map_layers", "select_layers"]
