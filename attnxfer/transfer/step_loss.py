"""A training step's loss: the one type that carries a loss (`Loss`) and the one place it is summed
(`compose_loss`): ``total = task_weight * task + sum(c.weight * loss_c for each comparison c, in order)``,
logged as ``task``, ``transfer`` (the comparisons' weighted sum; ``attn`` in runs logged before it had its
name, which nothing reads back), each comparison's unweighted loss by its name (``map#2`` where an earlier
one took it), their parts, ``total``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

#: the keys a step's log record holds beside the comparisons' (this sum's, the engine's, the metrics file's): a
#: loss or term of such a name would overwrite one of them in the log, or be overwritten
STEP_KEYS = frozenset({"task", "transfer", "total", "grad_norm", "lr", "split", "step", "epoch", "time"})


class Weighed(Protocol):
    """What the sum reads of a comparison (`comparisons.Comparison`): its logged name and its weight."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


@dataclass
class Loss:
    """``total`` (differentiable), ``terms`` (named parts, logged and watched for NaN/inf) and ``logs``
    (detached diagnostics logged beside them, e.g. ``attn_kl/3`` beside ``attn_ce/3``)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def compose_loss(
    compared: Sequence[tuple[Weighed, Loss]],
    task: torch.Tensor | None = None,
    task_weight: float = 1.0,
) -> Loss:
    """The step's loss (the module docstring's sum; ``task`` None: no task loss), task term first."""
    terms: dict[str, torch.Tensor] = {} if task is None else {"task": task}
    logs: dict[str, torch.Tensor] = {}
    transfer: torch.Tensor | None = None
    for (c, loss), (name, parts, part_logs) in zip(compared, marked_parts(compared), strict=True):
        terms.update(parts)
        logs.update(part_logs)
        terms[name] = loss.total
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


def marked_parts(
    compared: Sequence[tuple[Weighed, Loss]],
) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Each comparison's name as logged, with its terms and logs: one whose name an earlier one took
    (``map#2``) marks its parts too (``attn_ce#2/3``), so two entries of one loss on the same layers both
    show, in a run's logs as in `TransferOutput`, and neither overwrites the other; two comparisons of other
    losses that log one name (a KL of one's own as ``attn_kl/0`` beside the map's) are refused."""
    named: list[str] = []
    owners: dict[str, str] = {}  # each name logged so far: the comparison that logs it
    for c, loss in compared:
        name = _unused(c.name, named)
        named.append(name)
        mark = name[len(c.name) :]
        parts = {_marked(k, mark): v for k, v in loss.terms.items()}
        logs = {_marked(k, mark): v for k, v in loss.logs.items()}
        for key in (name, *parts, *logs):
            if (owner := owners.setdefault(key, name)) != name:
                head, slash, layer = key.partition("/")
                raise ValueError(
                    f"comparisons {owner!r} and {name!r} both log {key!r}, and the log keeps one value under "
                    f"that name: name the terms of one of them apart, e.g. after its loss "
                    f"({name + slash + layer if slash else f'{name}_{head}'!r})"
                )
        yield name, parts, logs


def _marked(key: str, mark: str) -> str:
    """``key`` with ``mark`` after its first part: ``attn_ce/3`` marked ``#2`` is ``attn_ce#2/3``."""
    head, slash, layer = key.partition("/")
    return f"{head}{mark}{slash}{layer}"


def _unused(name: str, named: list[str]) -> str:
    """``name``, or ``name#2``, ``name#3``, ... where comparisons before it took the name."""
    n, key = 1, name
    while key in named:
        n += 1
        key = f"{name}#{n}"
    return key
