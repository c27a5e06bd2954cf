"""Resuming on another number of processes keeps the global batch, and with it the lr, the steps per epoch
and the schedule (docs/troubleshooting.md): unchanged ``data.batch_size`` / ``optim.accum_steps`` are
re-split for the new ranks (no rank gets a larger batch than before), explicit ones must multiply to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...checkpoints.resume_point import ResumePoint
from ...config import ConfigError, TrainConfig
from ...speak import say

#: the config keys a resume may change when the global batch stays the same
BATCH_SPLIT_KEYS: tuple[str, ...] = ("data.batch_size", "optim.accum_steps")


@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is made: ``per_rank`` samples per micro-batch x ``world`` ranks x ``accum`` steps."""

    per_rank: int
    world: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world * self.accum

    def describe(self) -> str:
        ranks = "process" if self.world == 1 else "processes"
        steps = "accumulation step" if self.accum == 1 else "accumulation steps"
        return f"{self.per_rank} per rank x {self.world} {ranks} x {self.accum} {steps}"

    def overrides(self) -> str:
        return f"data.batch_size={self.per_rank} optim.accum_steps={self.accum}"


def split_for_world(global_batch: int, world: int, max_per_rank: int) -> BatchSplit | None:
    """The split of ``global_batch`` over ``world`` ranks with the fewest accumulation steps whose per-rank
    batch is at most ``max_per_rank``; None when ``world`` does not divide ``global_batch``."""
    if global_batch % world:
        return None
    per_world = global_batch // world
    for accum in range(1, per_world + 1):
        if per_world % accum == 0 and per_world // accum <= max(1, max_per_rank):
            return BatchSplit(per_world // accum, world, accum)
    return None  # unreachable: accum = per_world gives a per-rank batch of 1


def recorded_split(point: ResumePoint | None) -> BatchSplit | None:
    """The split recorded with the checkpoint (None: no checkpoint, or one without its config)."""
    if point is None:
        return None
    config: Any = point.config
    try:
        return BatchSplit(
            int(config["data"]["batch_size"]), int(point.world_size), int(config["optim"]["accum_steps"])
        )
    except (KeyError, TypeError, ValueError):
        return None


def _current_split(cfg: TrainConfig, world: int) -> BatchSplit:
    return BatchSplit(cfg.data.batch_size, world, cfg.optim.accum_steps)


def keeps_global_batch(point: ResumePoint | None, cfg: TrainConfig, world: int) -> bool:
    """Whether ``cfg`` on ``world`` ranks makes the global batch the checkpoint was trained with."""
    recorded = recorded_split(point)
    return recorded is not None and recorded.global_batch == _current_split(cfg, world).global_batch


def fit_world_size(
    cfg: TrainConfig, world: int, point: ResumePoint | None, *, said: bool = True
) -> TrainConfig:
    """``cfg`` for resuming ``point`` on ``world`` ranks with the recorded global batch (a `ConfigError`,
    nothing written, where it cannot be kept); a fresh run, or one on the recorded world size, unchanged.
    ``said`` False: the split kept unsaid (a study's student: the study says it once, for all)."""
    recorded = recorded_split(point)
    if recorded is None or recorded.world == world:
        return cfg  # same ranks: apps.run.resume judges any change of the batch keys
    asked = _current_split(cfg, world)
    gb = recorded.global_batch
    where = (
        f"{Path(cfg.run_dir)} was trained by {recorded.world} process{'es' if recorded.world > 1 else ''} "
        f"({point.name}: global batch {gb} = {recorded.describe()}) and "
        f"this run has {world}"
    )
    if asked.global_batch == gb:
        chosen = asked  # the user's explicit split keeps the global batch
    elif (asked.per_rank, asked.accum) != (recorded.per_rank, recorded.accum):
        fitting = split_for_world(gb, world, asked.per_rank)
        keep = f"resume with {fitting.overrides()}, or drop both overrides" if fitting else ""
        raise ConfigError(
            f"{where}, with {asked.overrides()}, a global batch of {asked.global_batch}: the lr, the steps "
            f"per epoch and the schedule would change; nothing was written. To keep the run's global batch, "
            f"{keep or 'use a number of processes that divides ' + str(gb)}; to train with the new batch, "
            "start a new run elsewhere (run_dir=...)"
        )
    else:
        chosen = split_for_world(gb, world, recorded.per_rank)
        if chosen is None:
            raise ConfigError(
                f"{where}, which cannot share a global batch of {gb} (the lr, the steps per epoch and the "
                f"schedule depend on it); nothing was written. Resume with a number of processes that divides "
                f"{gb} ({', '.join(str(d) for d in range(1, gb + 1) if gb % d == 0)}), or start a new run elsewhere (run_dir=...)"
            )
    if said:
        say(
            f"resume: {where}: the global batch stays {gb} ({recorded.describe()} -> {chosen.describe()}: "
            f"{chosen.overrides()}), so the lr, the steps per epoch and the lr schedule are unchanged and each "
            "step averages the same samples; the ranks' RNG streams (dropout, drop-path) restart, mixup is "
            "seeded by each batch's place in the data"
        )
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=chosen.per_rank),
        optim=dataclasses.replace(cfg.optim, accum_steps=chosen.accum),
    )
