"""A training step's loss: the one type that carries a loss (`Loss`) and the one place it is summed
(`compose_loss`).

Every comparison of a plan (`attnxfer.transfer.comparisons`) returns a `Loss` (unweighted; the attention CE of
`losses` and the map losses of `map_losses` under it return one too, their KL or agreement metric in
``logs``); a `TeacherStudent`
hands them over with the student's logits (`TransferOutput.compared`); the objective
(`attnxfer.train.objective.TransferObjective.loss`, what the engine calls each step) adds the task loss and
composes the step's loss here::

    total = task_weight * task + sum(c.weight * loss_c for each comparison c, in the plan's order)

The logged terms say what they sum: ``task``, ``transfer`` (the weighted sum of every comparison), each
comparison's unweighted loss by its name (``map``, ``logit_kd``, ``feature_distill``, ``mse_q``, ...), the
comparisons' own parts (``attn_ce/3``, ``feat_cos``, ...) and ``total``. Runs logged before ``transfer`` had
its name call it ``attn`` in their metrics files; nothing reads either name back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Weighed(Protocol):
    """What the sum reads of a comparison (`comparisons.Comparison`): its logged name and its weight."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


@dataclass
class Loss:
    """A loss and what it is made of: ``total`` (differentiable: what backpropagates, or what a larger loss
    weighs in), ``terms`` (named parts, logged and watched for NaN/inf) and ``logs`` (detached diagnostics
    logged beside them, e.g. ``attn_kl/3`` beside ``attn_ce/3``)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def compose_loss(
    compared: Sequence[tuple[Weighed, Loss]],
    task: torch.Tensor | None = None,
    task_weight: float = 1.0,
) -> Loss:
    """The step's loss: ``task_weight * task`` (None: no task loss) plus each comparison's loss at its weight
    (see the module docstring for the terms). The sum runs in the plan's order, the task's term first."""
    terms: dict[str, torch.Tensor] = {} if task is None else {"task": task}
    logs: dict[str, torch.Tensor] = {}
    transfer: torch.Tensor | None = None
    named: list[str] = []
    for c, loss in compared:
        terms.update(loss.terms)
        logs.update(loss.logs)
        named.append(_unused(c.name, named))
        terms[named[-1]] = loss.total
        weighted = c.weight * loss.total
        transfer = weighted if transfer is None else transfer + weighted
    total = transfer
    if task is not None:
        task = task if task_weight == 1.0 else task_weight * task
        total = task if transfer is None else task + transfer
    if transfer is not None:
        terms["transfer"] = transfer
    terms["total"] = total
    return Loss(total, terms, logs)


def _unused(name: str, named: list[str]) -> str:
    """``name``, or ``name#2``, ``name#3``, ... where comparisons before it took the name."""
    n, key = 1, name
    while key in named:
        n += 1
        key = f"{name}#{n}"
    return key
