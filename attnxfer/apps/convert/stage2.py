"""What stage 2 of `attnxfer convert` optimises, and so which head the converted student gets.

A classifier teacher on labelled data keeps the labelled stage 2 (the task loss on its head, with
``transfer.feature_distill`` available beside it). A headless teacher (MAE, DINOv2/v3, CLIP/SigLIP towers,
EVA-02 encoders) converts into a headless encoder: stage 2 pulls the student's final token features onto the
teacher's (feature distillation) with no task loss, so no label is read and no head is needed; so does any
conversion on data without labels. ``transfer.task_weight`` / ``transfer.feature_distill`` left null take
these defaults; set, they are taken as they are. The choice, and why, is printed and kept in report.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ...config import TrainConfig
from ...errors import InputError


@dataclass(frozen=True)
class Stage2Objective:
    """Stage 2's task-loss and feature-distillation weights, and in words what that is and why."""

    task_weight: float
    feature_distill: float
    reason: str

    @property
    def label_free(self) -> bool:
        return self.task_weight == 0

    @property
    def overrides(self) -> dict[str, float]:
        """The config keys stage 2 runs with where they differ from what null means to `attnxfer train` (task
        weight 1, no feature distillation): what its config.yaml records."""
        out = {"transfer.task_weight": self.task_weight} if self.task_weight != 1.0 else {}
        return out | ({"transfer.feature_distill": self.feature_distill} if self.feature_distill else {})

    def describe(self) -> str:
        """``label-free feature distillation (the teacher is headless)``, ``labelled fine-tuning (...)``."""
        if self.label_free:
            what = "label-free " + ("feature distillation" if self.feature_distill else "distillation")
        else:
            what = "labelled fine-tuning" + (" with feature distillation" if self.feature_distill else "")
        return f"{what} ({self.reason})"


def stage2_objective(cfg: TrainConfig, teacher: nn.Module, labelled: bool) -> Stage2Objective:
    """The weights stage 2 trains with: ``transfer.task_weight`` and ``transfer.feature_distill`` where set,
    else the defaults of the module docstring (``labelled``: the data hands out labels)."""
    t = cfg.transfer
    classes = int(getattr(teacher, "num_classes", 0) or 0)
    if t.task_weight is not None:
        task, reason = float(t.task_weight), f"transfer.task_weight={t.task_weight:g}"
    elif not classes and not cfg.model.num_classes:
        task, reason = 0.0, "the teacher is headless"
    elif not labelled:
        task, reason = 0.0, "the data has no labels"
    elif classes:
        task, reason = 1.0, f"the teacher's {classes}-class head"
    else:
        task, reason = 1.0, f"a new {cfg.model.num_classes}-class head: model.num_classes"
    features = float(t.feature_distill) if t.feature_distill is not None else (1.0 if task == 0 else 0.0)
    return Stage2Objective(task, features, reason)


def student_head(
    cfg: TrainConfig, teacher: nn.Module, objective: Stage2Objective, num_classes: int
) -> int | None:
    """The converted student's head (`build_efficient_student`'s ``num_classes``; None keeps the teacher's).

    A classifier teacher's student keeps its head, trained on ``num_classes`` labels where stage 2 has a task
    loss. A headless teacher's student stays headless (0), or gets ``model.num_classes``; a task loss with
    neither is refused before any work, saying the two ways out."""
    if getattr(teacher, "num_classes", 0):
        return num_classes if objective.task_weight > 0 else None
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if objective.task_weight > 0:
        raise InputError(
            f"the teacher has no classifier head (num_classes=0: an MAE, DINO or CLIP-style encoder), so its "
            f"converted student has none for stage 2's task loss (transfer.task_weight="
            f"{objective.task_weight:g}); set model.num_classes=K to give it a new K-class head trained on "
            "the labels, or transfer.task_weight=0 to convert it without labels (feature distillation)"
        )
    return 0
