"""The engine's checkpoints: what a save holds (the trained weights, optimiser, EMA and every rank's RNG
beside the loop's JSON state), what a resume restores, and making room for a save; the files are
`attnxfer.checkpoints.store`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoints.resume_point import ResumeFrom, ResumePoint
from ..checkpoints.rng import capture_rng_state, restore_rng_state
from ..checkpoints.store import (
    CheckpointError,
    CheckpointManager,
    MetricMode,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    set_aside,
)
from ..run_layout import eval_scores
from ..speak import warn
from .distributed import barrier, gather_objects
from .ema import StudentEMA
from .runtime import Runtime


def _weights_checksum(model: nn.Module) -> str:
    """A bit-exact fingerprint of the weights (ranks compare them before every save)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        # reshape: 0-d tensors (Gemma4-ViT's clip bounds) cannot be viewed as bytes
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore ``optimizer``'s moments and step counts from ``state`` but keep its groups' options as this
    run built them: torch's ``load_state_dict`` also puts back every group's saved options, which would
    silently undo what a resume may change (optim.weight_decay, beta1, beta2, eps: the config's
    resumable keys), while the run says it changed them."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, configured, strict=True):
        group.update(options)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the engine saves, how many it keeps, and what it resumes from."""

    every_steps: int | None = None
    every_minutes: float | None = None
    every_epoch: bool = True
    keep_last: int = 3
    # the config's auto | none | a checkpoint directory (parsed into a ResumeFrom), or the `ResumePoint` an app
    # found and judged already (the checkpoint is then not looked for again)
    resume: ResumeFrom | ResumePoint | str = "auto"
    # False: a save leaves older checkpoints in place, for the caller to prune once it is safe (a study prunes
    # its students only after every one of them saved the step)
    prune_on_save: bool = True
    # False: a resume on another world size does not say its random streams start afresh (a study's student:
    # the study's resume line says it once for all)
    say_world: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.resume, ResumePoint):
            object.__setattr__(self, "resume", ResumeFrom.parse(self.resume))


class Checkpointing:
    """Saves and resumes one run's trained module, optimiser and EMA (see the module docstring)."""

    def __init__(
        self,
        run_dir: Path,
        policy: CheckpointPolicy,
        metric_mode: MetricMode | str,
        runtime: Runtime,
        *,
        trained: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: StudentEMA | None,
    ) -> None:
        self.run_dir, self.policy = Path(run_dir), policy
        self.trained, self.optimizer, self.ema = trained, optimizer, ema
        self.rank, self.world, self.is_main = runtime.rank, runtime.world, runtime.is_main
        self.manager = CheckpointManager(self.run_dir, keep_last=policy.keep_last, best_mode=metric_mode)
        # the step this attempt's history goes on from (0: a fresh start), then its newest save: a checkpoint
        # after it that this attempt did not write is an earlier attempt's. None until `resume` says.
        self.since: int | None = None

    def save(
        self, step: int, loop: dict[str, Any], extra: dict[str, Any], metric: float | None = None
    ) -> str | None:
        """All ranks call this (RNG states are gathered); rank 0 writes the tensors and a JSON state (``loop``,
        RNG states, optimiser layout, ranks, then ``extra``) and returns where (other ranks: None)."""
        rng = capture_rng_state()
        checksum = _weights_checksum(self.trained)
        rng_all, checksums = (list(every) for every in zip(*gather_objects((rng, checksum))))
        if len(set(checksums)) != 1:
            raise RuntimeError(
                f"ranks hold different student weights at step {step} "
                f"(checksums {checksums}); the run is not data-parallel consistent"
            )
        where = None
        if self.is_main:
            opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
            tensors = {"model": self.trained.state_dict(), "optimizer": opt_tensors}
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            state = {
                **loop,
                "rng": rng_all,
                "optimizer_meta": opt_meta,
                "world_size": self.world,
                "rank_checksums": checksums,
                **extra,
            }
            info = self.manager.save(
                step,
                tensors,
                state,
                metric=metric,
                replace=self._make_room(step, checksum),
                prune=self.policy.prune_on_save,
            )
            where = str(info)
        self.since = step
        barrier()
        return where

    def _make_room(self, step: int, checksum: str) -> bool:
        """Whether this step's save replaces an intact checkpoint of the same step with the same weights (a
        periodic save an epoch save follows; a resume from an earlier checkpoint retracing its history)
        atomically. Where the history differs (other weights, or no save of this step), the step's own and
        every later checkpoint are an earlier attempt's, which checkpoint.resume=none or a PATH went back
        before, and so is one between the step this attempt went on from (`since`) and this one: each is set
        aside, reported, and so are `attnxfer eval`'s scores of them. Left in place, the next auto would resume
        them, export would take them, pruning would keep them over this run's own saves (or delete an earlier
        attempt's last one, under keep_last), and the scores would read as those of this run's checkpoints."""
        existing = self.manager.path_for(step)
        old = None
        if existing.is_dir():  # a broken one: the store moves it aside and writes a fresh one
            with contextlib.suppress(CheckpointError, OSError):
                old = ResumePoint.find(self.run_dir, existing)
        if old is not None and old.record("rank_checksums") and old.record("rank_checksums")[0] == checksum:
            return True
        if old is not None:
            aside = set_aside(existing, "replaced")
            warn(f"a different checkpoint for step {step} existed; kept it as {aside}")
        since = step - 1 if self.since is None else min(self.since, step - 1)
        for info in self.manager.list(verify_hash=False):
            if info.step > step:
                aside = set_aside(info.path, "replaced")
                warn(
                    f"{info.path.name} was saved after step {step} by an earlier attempt; kept it as {aside}"
                )
            elif since < info.step < step:
                went = "started over" if since == 0 else f"went on from step {since}"
                aside = set_aside(info.path, "replaced")
                warn(
                    f"{info.path.name} was saved by an earlier attempt (this one {went}); kept it as {aside}"
                )
        for scores in eval_scores(self.run_dir, since=since + 1):
            warn(
                f"{scores.name} scored an earlier attempt's checkpoint; kept it as {set_aside(scores, 'replaced')}"
            )
        return False

    def require_checkpoint(self) -> None:
        """Refuse, in one line, a run whose policy's resume finds no checkpoint (hashes unchecked: a cheap look)."""
        resume = self.policy.resume
        if not isinstance(resume, ResumePoint) and resume.checkpoint(self.manager, verify_hash=False) is None:
            raise CheckpointError(
                f"{self.run_dir} has no intact checkpoint in {self.manager.dir}; nothing to evaluate "
                "(train it first, or point -c at the config.yaml of a run that has checkpoints)"
            )

    def resume(self, scoring: bool = False) -> ResumePoint | None:
        """Restore the trained weights, the EMA, the optimiser and this rank's RNG from the checkpoint the
        policy picks, and return it (the loop's counters are in its state); None for a fresh start.
        ``scoring``: read to be evaluated, which draws nothing random."""
        point = self.policy.resume  # found once: an app's point is taken as it is
        if not isinstance(point, ResumePoint):
            point = ResumePoint.find(self.run_dir, point)
        self.since = 0 if point is None else point.step
        if point is None:
            return None
        info, state = point.checkpoint, point.state
        tensors = point.load_tensors()
        try:
            self.trained.load_state_dict(tensors["model"])
        except RuntimeError as e:
            detail = str(e).strip().splitlines()
            raise CheckpointError(
                f"{info} does not fit this run's student ({detail[-1].strip() if detail else e}); "
                "resume it with the config it was trained with, or start a new run elsewhere (run_dir=...)"
            ) from None
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        if "optimizer" not in tensors or "optimizer_meta" not in state:
            raise CheckpointError(
                f"{info} holds no optimiser state: not a checkpoint of a training run (a conversion's stage 1 "
                "keeps only the student); give one of this run's checkpoints"
            )
        load_optimizer_state(
            self.optimizer, optimizer_state_from_tensors(tensors["optimizer"], state["optimizer_meta"])
        )
        rng = state["rng"]
        if len(rng) == self.world:
            restore_rng_state(rng[self.rank])
        elif not scoring and self.policy.say_world:
            warn(
                f"the checkpoint was written at world size {len(rng)}, this run's is {self.world}: the random "
                "streams start afresh"
            )
        return point
