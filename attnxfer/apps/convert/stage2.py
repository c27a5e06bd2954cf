"""What stage 2 of `attnxfer convert` optimises, and so which head the converted student gets.

A classifier teacher on labelled data of its classes keeps the task loss on its head. A headless teacher (MAE,
DINO, CLIP towers), or data without labels, converts into a headless encoder by feature distillation: no label
read, no head needed. A head with other outputs than the data's classes (CLIP's image projection, an ImageNet
head on a 10-class set) is kept as the teacher's, and stage 2 is label-free. ``transfer.task_weight`` /
``transfer.feature_distill`` set are taken as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ...config import TrainConfig
from ...errors import InputError
from ...speak import say
from ...transfer.pairing import (
    attends_within_regions,
    block_attentions,
    layer_names,
    partitions,
    select_layers,
)
from ..run.training import check_eval_metrics


@dataclass(frozen=True)
class Stage2Objective:
    """Stage 2's task-loss and feature-distillation weights, and why."""

    task_weight: float
    feature_distill: float
    reason: str

    @property
    def overrides(self) -> dict[str, float]:
        """The keys stage 2 runs with where they differ from what null means to `attnxfer train`."""
        out = {"transfer.task_weight": self.task_weight} if self.task_weight != 1.0 else {}
        return out | ({"transfer.feature_distill": self.feature_distill} if self.feature_distill else {})

    def describe(self) -> str:
        """``label-free feature distillation (the teacher is headless)``, ``labelled fine-tuning (...)``."""
        if self.task_weight == 0:  # label-free
            what = "label-free " + ("feature distillation" if self.feature_distill else "distillation")
        else:
            what = "labelled fine-tuning" + (" with feature distillation" if self.feature_distill else "")
        return f"{what} ({self.reason})"


def stage2_objective(
    cfg: TrainConfig, teacher: nn.Module, labelled: bool, data_classes: int
) -> Stage2Objective:
    """The weights stage 2 trains with: those set, else the module docstring's defaults."""
    t = cfg.transfer
    classes = int(getattr(teacher, "num_classes", 0) or 0)
    if t.task_weight is not None:
        task, reason = float(t.task_weight), f"transfer.task_weight={t.task_weight:g}"
    elif not classes and not cfg.model.num_classes:
        task, reason = 0.0, "the teacher is headless"
    elif not labelled:
        task, reason = 0.0, "the data has no labels"
    # a head of other outputs than the data's classes, trained on them, would be lost: kept as the teacher's
    elif classes and classes != data_classes and not cfg.model.num_classes:
        task, reason = 0.0, f"the teacher's head has {classes} outputs, not the data's {data_classes} classes"
    elif classes:
        task, reason = 1.0, f"the teacher's {classes}-class head"
    else:
        task, reason = 1.0, f"a new {cfg.model.num_classes}-class head: model.num_classes"
    features = float(t.feature_distill) if t.feature_distill is not None else (1.0 if task == 0 else 0.0)
    return Stage2Objective(task, features, reason)


def stage2_layers(cfg: TrainConfig, student: nn.Module) -> dict[str, list[int]]:
    """``transfer.layers`` for stage 2 where some student blocks have no map it can distil and the config names
    no layers: the layers ``transfer.end_layer`` selects, less blocks without an attention map (``none``,
    Hydra: stage 1 fits only the others' maps) and blocks whose rows are restricted to a shifted window's
    regions (Swin: stage 1 fits those with the regions' mass; the distillation loss takes whole rows). Empty
    where every block can be distilled, layers are named, or none can (the plan then says what to change)."""
    attentions = block_attentions(student)
    parts = partitions(student, layer_names(student), attentions)
    shifted = [attends_within_regions(a, p) for a, p in zip(attentions, parts)]
    no_map = [not a.map_kind.has_map for a in attentions]
    if (
        cfg.transfer.layers is not None
        or not any(no_map + shifted)
        or (cfg.transfer.mode == "none" and not cfg.transfer.losses)
    ):
        return {}
    chosen = select_layers(len(attentions), cfg.transfer.end_layer)
    layers = [i for i in chosen if not no_map[i] and not shifted[i]]
    if not layers:
        return {}
    why = (
        [f"blocks {[i for i, n in enumerate(no_map) if n]} have no attention map to distil"]
        if any(no_map)
        else []
    )
    if any(shifted):
        why.append(
            f"blocks {[i for i, s in enumerate(shifted) if s]} attend within a shifted window's regions, whose "
            "rows the distillation loss does not take"
        )
    say(f"stage 2: transfer.layers={layers} ({'; '.join(why)})")
    return {"transfer.layers": layers}


def student_head(
    cfg: TrainConfig, teacher: nn.Module, objective: Stage2Objective, num_classes: int
) -> int | None:
    """The converted student's head (`build_efficient_student`'s ``num_classes``; None keeps the teacher's): a
    headless teacher's student stays headless (0) unless ``model.num_classes`` gives it one. Where stage 2 has
    no task loss, ``eval.metrics=top1`` stops here too, as soon as the teacher is known."""
    check_eval_metrics(cfg, task_weight=objective.task_weight, why=objective.reason)
    if classes := getattr(teacher, "num_classes", 0):
        if objective.task_weight > 0 and num_classes != classes:  # the student is the teacher, its head too
            raise InputError(
                f"the teacher's head has {classes} outputs but the data has {num_classes} classes, and stage 2 "
                f"({objective.reason}) trains that head on them: convert on data of the teacher's {classes} "
                "classes, or set transfer.task_weight=0 to convert it without labels (the student keeps the "
                "teacher's head)"
            )
        return num_classes if objective.task_weight > 0 else None
    if cfg.model.num_classes and objective.task_weight == 0:  # a head nothing trains: random in the export
        raise InputError(
            f"model.num_classes={cfg.model.num_classes} gives the headless teacher's student a new head, which "
            f"stage 2 without a task loss ({objective.reason}) never trains: drop "
            "model.num_classes to convert the encoder alone, or train the head on labels (transfer.task_weight "
            "> 0 with labelled data)"
        )
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
