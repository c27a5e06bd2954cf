"""The algorithm: transfer plans, the dual teacher–student wrapper and the losses (no config, no I/O)."""
from .conversion import ConversionPlan, LayerConversion, Stage1Train, build_conversion_plan
from .dual import DualViT, TransferOutput, logit_distillation_loss
from .map_losses import MapLoss, implicit_map_loss, map_distillation_loss
from .losses import (AttentionLoss, attention_ce_reference, attention_distillation_loss, row_logsumexp,
                     teacher_entropy)
from .plan import MODES, Distill, PlanError, TransferMode, TransferPlan, build_plan, map_layers, select_layers

__all__ = ["ConversionPlan", "LayerConversion", "Stage1Train", "build_conversion_plan", "logit_distillation_loss", "implicit_map_loss", "MapLoss",
           "map_distillation_loss", "Distill", "DualViT",
           "TransferOutput", "AttentionLoss", "attention_ce_reference", "attention_distillation_loss",
           "row_logsumexp", "teacher_entropy", "MODES", "PlanError", "TransferMode",
           "TransferPlan", "build_plan", "map_layers", "select_layers"]
