"""The algorithm: transfer plans, the teacher–student wrapper and the losses (no config, no I/O).

Importing the package imports every module in it, so a comparison loss registered in a new file here is
found by name, as an attention is in ``models/efficient/``."""

import importlib
import pkgutil
import warnings

from ..models.handover import Chunks, Signal
from .comparisons import (
    COMPARISON_LOSSES,
    Comparison,
    ComparisonLoss,
    LayerPair,
    Step,
    comparison_loss,
)
from .conversion import ConversionPlan, LayerConversion, Stage1Train, build_conversion_plan
from .logit_loss import logit_distillation_loss
from .losses import (
    attention_ce_reference,
    attention_distillation_loss,
    row_logsumexp,
    teacher_entropy,
)
from .map_losses import LayerLogits, MapLoss, implicit_map_loss, map_distillation_loss
from .plan import MODES, PlanError, TransferMode, TransferPlan, build_plan, map_layers, select_layers
from .step_loss import Loss, compose_loss
from .teacher_pass import TeacherHandover, TeacherNeeds, run_teacher
from .teacher_student import TeacherStudent, TransferOutput

__all__ = [
    "COMPARISON_LOSSES",
    "MODES",
    "Chunks",
    "Comparison",
    "ComparisonLoss",
    "ConversionPlan",
    "LayerConversion",
    "LayerLogits",
    "LayerPair",
    "Loss",
    "MapLoss",
    "PlanError",
    "Signal",
    "Stage1Train",
    "Step",
    "TeacherHandover",
    "TeacherNeeds",
    "TeacherStudent",
    "TransferMode",
    "TransferOutput",
    "TransferPlan",
    "attention_ce_reference",
    "attention_distillation_loss",
    "build_conversion_plan",
    "build_plan",
    "comparison_loss",
    "compose_loss",
    "implicit_map_loss",
    "logit_distillation_loss",
    "map_distillation_loss",
    "map_layers",
    "row_logsumexp",
    "run_teacher",
    "select_layers",
    "teacher_entropy",
]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")  # registers the comparison losses it defines


def __getattr__(name: str) -> type:
    """`DualViT`, the name `TeacherStudent` had in earlier releases (it runs every family, not only ViTs), read
    with a DeprecationWarning as ``attnxfer.DualViT`` is; never in `__all__`."""
    if name != "DualViT":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.DualViT is deprecated and will be removed in a future release; use "
        f"{__name__}.TeacherStudent (the same object)",
        DeprecationWarning,
        stacklevel=2,
    )
    return TeacherStudent
