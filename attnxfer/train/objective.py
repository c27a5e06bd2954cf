"""What the engine trains: an `Objective`, one protocol for every kind of run (attention transfer,
`TransferObjective`; a module that returns its own loss, `ModuleObjective`; stage 1, `Stage1Objective`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..analysis.knn import Autocast
from ..data.seeding import seeded_global_rngs
from ..transfer.step_loss import Loss, compose_loss
from ..transfer.teacher_student import TeacherStudent
from .evaluation import evaluate, evaluate_features

Evaluator = Callable[[nn.Module, Any, Any], dict[str, float]]
#: pictures drawn after an evaluation (rank 0): the trained module -> {tag: (C, H, W) in [0, 1] or (H, W, 3) uint8}
Pictures = Callable[[nn.Module], dict[str, Any]]


@dataclass
class TaskLoss:
    """The task's loss and its batch transform (timm's Mixup/CutMix, or None)."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixup: Callable | None = None


class Objective(Protocol):
    """What the engine needs of a run's objective (see the module docstring). A class that subclasses it
    takes its defaults: batches as they come, the EMA scored alone, nothing before a step."""

    #: what the engine prepares (DDP, device) and calls on a batch
    module: nn.Module
    #: the weights that train: the optimiser's, the checkpoints', the EMA's
    trained: nn.Module
    #: a printed description for the trackers' hyper-parameters (the transfer plan), or None
    description: str | None
    #: the config keys that weigh its terms besides the task's, in words (a non-finite term's advice), or ""
    weight_keys: str = ""

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch as the loss takes it (mixup), seeded by the batch's own ``seed`` (its epoch and place)."""
        return x, y

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None,
        autocast: Autocast,
        handover: Any = None,
    ) -> Loss:
        """The `Loss` of one prepared batch (``y`` None: no labels); ``model`` is `module` as the engine wrapped
        it; ``handover``: the teacher's pass where a study computed it once (None: the objective runs its own)."""
        ...

    def kept_for_backward(self) -> AbstractContextManager:
        """What a step's forward and backward run inside: the pair's `TeacherStudent.kept_for_backward` (what
        it lends a checkpointing student's blocks, kept for their recompute)."""
        return contextlib.nullcontext()

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Scores over a validation loader, summed over ranks (the run's selection metric among them): by
        default the objective's ``evaluator``."""
        return self.evaluator(model, loader, accelerator)

    def ema_model(self, ema: nn.Module) -> nn.Module:
        """What scores the EMA's copy of `trained`."""
        return ema

    def before_step(self, log_now: bool) -> None:
        """Called before each micro-batch; ``log_now`` when the coming step is a log step."""


class TransferObjective(Objective):
    """Attention transfer: the `TeacherStudent`'s transfer loss plus the task loss at the plan's
    ``task_weight``; with ``task_weight=0`` no label is read."""

    def __init__(self, pair: TeacherStudent, task: TaskLoss, evaluator: Evaluator = evaluate) -> None:
        self.module, self.trained, self.plan = pair, pair.student, pair.plan
        self.task, self.evaluator = task, evaluator
        self.description = pair.plan.describe()
        self.weight_keys = " or ".join(
            "transfer.atd_weight"
            if c.origin.startswith("mode ")
            else f"{c.origin} weight"
            if c.origin.startswith("transfer.losses")
            else c.origin
            for c in pair.plan.comparisons
        )

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mixup/CutMix where the run has a task loss; timm's Mixup draws from the global RNGs, seeded for this
        call and put back after, so the mix depends on the batch's place, never on a model's streams."""
        if not (self.plan.task_weight > 0 and y is not None) or self.task.mixup is None:
            return x, y
        with seeded_global_rngs(seed):
            return self.task.mixup(x, y)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None,
        autocast: Autocast,
        handover: Any = None,
    ) -> Loss:
        """The pair's forward and the task loss on its logits, composed in `compose_loss`."""
        weight = self.plan.task_weight
        if weight > 0 and y is None:
            raise ValueError(
                "the task loss needs labels, and this batch has none (set transfer.task_weight=0)"
            )
        with autocast():
            out = model(x) if handover is None else model(x, handover)
        task = self.task.loss_fn(out.logits.float(), y) if weight > 0 else None
        return compose_loss(out.compared, task, weight)

    def kept_for_backward(self) -> AbstractContextManager:
        return self.module.kept_for_backward()

    def ema_model(self, ema: nn.Module) -> nn.Module:
        """With the teacher when the mode attends with its q/k at evaluation too, or when the run is scored
        against the teacher (final-feature agreement)."""
        pair = self.module
        if self.plan.mode.teacher_at_eval or self.evaluator is evaluate_features:
            return TeacherStudent(pair.teacher, ema, self.plan)
        return ema

    def before_step(self, log_now: bool) -> None:
        self.module.log_kl = log_now  # the KL diagnostics cost a pass: on log steps only


class ModuleObjective(Objective):
    """A module that is its own objective: its forward returns ``loss``, ``terms`` and ``logs`` (MAE)."""

    def __init__(self, module: nn.Module, evaluator: Evaluator, description: str | None = None) -> None:
        self.module = self.trained = module
        self.evaluator, self.description = evaluator, description

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None,
        autocast: Autocast,
        handover: Any = None,
    ) -> Loss:
        with autocast():
            out = model(x)
        return Loss(out.loss, {**out.terms, "total": out.loss}, dict(out.logs))
