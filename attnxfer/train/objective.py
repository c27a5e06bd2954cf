"""What the engine trains: an objective, one protocol for every kind of run.

The engine (`attnxfer.train.engine`) drives an `Objective` and asks it nothing else: which module to wrap
(DDP) and call, which weights train (optimiser, checkpoints, EMA), the loss of a batch with its logged
terms, how to score a validation loader, and what evaluates the EMA's weights. A new objective is one
class here (or beside its model) meeting the protocol, wired in `attnxfer.apps`:

- `TransferObjective`: attention transfer, a `TeacherStudent` (teacher + student: attention, logit and feature
  distillation, as its plan says) plus the task loss at the plan's ``task_weight``; scored by val top-1
  (`evaluate`), or, without a task loss (``task_weight=0``: no label is read), by final-feature agreement
  with the teacher (`evaluate_features`).
- `ModuleObjective`: a module whose forward returns its own ``loss``/``terms``/``logs`` (MAE
  pre-training, `attnxfer.models.mae`); scored by its evaluator (val reconstruction loss).
- `Stage1Objective` (`attnxfer.train.stage1`, beside its loop): stage 1 of `attnxfer convert`, every
  efficient layer fitted on the teacher's hidden inputs (`attnxfer.transfer.conversion.layer_fit_loss` per
  layer; the terms are the layers' losses); scored by the held-out fit loss. Stage 1 keeps its own
  layer-parallel loop (no task loss, no epochs), on the same schedule (`attnxfer.train.schedule`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from ..data.seeding import seeded_global_rngs
from ..transfer.step_loss import Loss, compose_loss
from ..transfer.teacher_student import TeacherStudent
from .evaluation import evaluate, evaluate_features

Evaluator = Callable[[nn.Module, Any, Any], dict[str, float]]
#: pictures drawn after an evaluation (rank 0): the trained module -> {tag: (C, H, W) in [0, 1] or (H, W, 3) uint8}
Pictures = Callable[[nn.Module], dict[str, Any]]
Autocast = Callable[[], AbstractContextManager]


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

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch as the loss takes it (mixup); ``seed`` is the batch's own (its epoch and place in the data),
        so the same batch is prepared the same way by every run that reads it."""
        return x, y

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None,
        autocast: Autocast,
        handover: Any = None,
    ) -> Loss:
        """The loss of one prepared batch (its ``total``, the terms watched for NaN/inf and logged with
        ``total`` among them, and detached logs) (``y`` None: data without labels); ``model`` is `module` as the
        engine wrapped it, called under ``autocast``; ``handover``: the teacher's pass for this batch where a
        study computed it once for several students (None: the objective runs its own)."""
        ...

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Scores over a validation loader, summed over ranks (the run's selection metric among them)."""
        ...

    def ema_model(self, ema: nn.Module) -> nn.Module:
        """What scores the EMA's copy of `trained`."""
        return ema

    def before_step(self, log_now: bool) -> None:
        """Called before each micro-batch; ``log_now`` when the coming step is a log step."""


class TransferObjective(Objective):
    """Attention transfer: the `TeacherStudent`'s transfer loss (attention, logit and feature distillation, as its plan
    weighs them) plus the task loss on the student's logits at the plan's ``task_weight``. With
    ``task_weight=0`` there is no task loss and the labels are never read (``y`` may be None); the run is then
    scored by final-feature agreement with the teacher, which also scores the EMA (with the teacher beside it).
    """

    def __init__(self, pair: TeacherStudent, task: TaskLoss, evaluator: Evaluator = evaluate) -> None:
        self.module, self.trained, self.plan = pair, pair.student, pair.plan
        self.task, self.evaluator = task, evaluator
        self.description = pair.plan.describe()

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor | None, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mixup/CutMix where the run has a task loss (it mixes the labels too). timm's Mixup draws from the
        global RNGs: seeded by ``seed`` for this call and put back after, so the mix is a function of the
        batch's place in the data, never of a model's streams."""
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
        """The step's loss: the pair's forward (the student's logits and each comparison's loss), the task loss
        on the logits, both composed in `compose_loss` (``task_weight * task + sum of weight * comparison``)."""
        weight = self.plan.task_weight
        if weight > 0 and y is None:
            raise ValueError(
                "the task loss needs labels, and this batch has none (set transfer.task_weight=0)"
            )
        with autocast():
            out = model(x) if handover is None else model(x, handover)
        task = self.task.loss_fn(out.logits.float(), y) if weight > 0 else None
        return compose_loss(out.compared, task, weight)

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        return self.evaluator(model, loader, accelerator)

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

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        return self.evaluator(model, loader, accelerator)
