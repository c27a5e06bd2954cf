"""Stage 1 of `attnxfer convert` as a run: its batches, its checkpoints (the store every run saves through),
and picking it up again by the one resume rule, compared over the keys stage 1 reads."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ...checkpoints.resume_point import ResumePoint, starts_over
from ...checkpoints.store import (
    CheckpointManager,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    set_aside,
)
from ...config import RESUMABLE_KEYS, TrainConfig, to_dict
from ...data import ResumableSampler, build_loader, data_identity
from ...errors import InputError
from ...models.efficient.swap import options_in_effect
from ...speak import say, warn
from ...train.distributed import rank_and_world
from ...train.stage1 import Stage1Result, stage1_transfer
from ...transfer.conversion import ConversionPlan
from ..run.loaders import data_seed
from ..run.parts import RunParts
from ..run.resume import check_same_data, check_teacher_content, judge
from ..run.training import plugin_origins

#: the config keys stage 1 reads: a change of any other (stage 2's, the report's) leaves its checkpoints valid
STAGE1_KEYS = (
    "seed",
    "teacher.",
    "data.",
    "convert.attention",
    "convert.attention_kwargs",
    "convert.stage1_steps",
    "convert.stage1_lr",
    "convert.stage1_batch_size",
    "convert.stage1_warmup_steps",
    "convert.stage1_weight_decay",
    "convert.stage1_clip_grad",
    "convert.stage1_train",
    "convert.map_loss",
    "convert.output_mse",
)


@dataclass
class Stage1Job:
    """One student's stage 1, opened: ``done``, the complete result an earlier run left, or where the fit goes
    on (the `Stage1Fit` options, and ``first_batch``: the place in `stage1_batches` its next step reads)."""

    saved: _Stage1Saves
    device: torch.device
    done: Stage1Result | None = None
    options: dict[str, Any] = field(default_factory=dict)
    first_batch: int = 0
    earlier: float = 0.0  # seconds spent by the runs it goes on from

    def run(self) -> Stage1Result:
        """Stage 1 alone: what an earlier run completed, else the fit to its end on its own batches."""
        if self.done is not None:
            return self.done
        s = self.saved
        batches = stage1_batches(
            s.cfg, s.parts, s.plan.stage1_batch_size, self.device, start=self.first_batch
        )
        return self.finish(stage1_transfer(s.parts.teacher, s.parts.student, s.plan, batches, **self.options))

    @property
    def batch_offset(self) -> int:
        """Place in the batch stream minus steps done (non-zero where a resume on other data restarts it)."""
        return self.first_batch - self.options.get("start_step", 0)

    def finish(self, stage1: Stage1Result) -> Stage1Result:
        stage1.seconds += self.earlier
        stage1.resumed = self.options.get("start_step", 0) > 0  # it went on from an earlier run's step
        self.saved.save(stage1.steps, None, stage1, complete=True)
        return stage1


@dataclass(frozen=True)
class Stage1Found:
    """What an earlier run left in a stage 1's folder, judged (`judge_stage1`), not yet loaded."""

    saved: _Stage1Saves
    point: ResumePoint | None  # None: it starts over (nothing there, or checkpoint.resume=none)
    fresh: bool  # checkpoint.resume=none


def judged_stage1_keys(
    cfg: TrainConfig, folder: Path, world: int, *, verify_hash: bool | None = None
) -> ResumePoint | None:
    """The checkpoint in the stage 1 ``folder`` (None where there is none, or under ``checkpoint.resume=none``),
    judged over the keys stage 1 reads (`STAGE1_KEYS`) and, stopped before its end, on ``world`` processes: a
    change it cannot resume with is refused here, before the teacher loads (`judge_stage1` judges its teacher
    and plan once they are built)."""
    if starts_over(cfg.checkpoint.resume):
        return None
    found = ResumePoint.find(folder, "auto", verify_hash=verify_hash)
    # data.batch_size is not stage 1's where convert.stage1_batch_size is set, now and when it was saved
    recorded = (found.config or {}).get("convert", {}) if found is not None else {}
    own_batch = cfg.convert.stage1_batch_size is not None and recorded.get("stage1_batch_size") is not None
    resumable = (*RESUMABLE_KEYS, "data.batch_size") if own_batch else RESUMABLE_KEYS
    point = judge(
        found,
        cfg,
        resumable=resumable,
        compared=STAGE1_KEYS,
        run_dir=folder,
        what="stage 1",
        command="convert",
    )
    if point is not None and not point.record("complete"):
        what = f"{point.path} is a stage 1 stopped at step {point.step}"
        refuse_another_world(what, point.world_size, world, cfg, "start stage 1 over")
    return point


def judge_stage1(
    cfg: TrainConfig, parts: RunParts, plan: ConversionPlan, folder: Path, *, main: bool
) -> Stage1Found:
    """The stage 1 in ``folder`` this run may go on from, judged before any work is done (a key stage 1 reads
    changed, another teacher or plan: refused before the teacher is measured); nothing is loaded yet. Rank 0
    (``main``) alone writes files: under ``checkpoint.resume=none`` it keeps the earlier checkpoints aside."""
    saved = _Stage1Saves(cfg, parts, plan, folder, main)
    # checkpoint.resume names stage 2's checkpoints (a PATH); stage 1 resumes unless it says none
    fresh = starts_over(cfg.checkpoint.resume)
    if fresh and main:  # it starts over: what an earlier stage 1 saved is kept aside, as stage 2's is
        for old in saved.manager.step_dirs():
            warn(
                f"checkpoint.resume=none: stage 1 starts over; kept its earlier {old.name} as {set_aside(old, 'replaced')}"
            )
    point = judged_stage1_keys(cfg, folder, rank_and_world()[1])
    if plan.stage1_steps > 0 and (point is None or not point.record("complete")):
        refuse_a_batch_over_the_set(len(parts.train_loader.dataset), plan.stage1_batch_size)
    # judged as any resume (over `STAGE1_KEYS`), its teacher by content and its data by identity
    if point is not None:
        check_teacher_content(point, parts.teacher_record, cfg.teacher.spec, run=folder)
        _refuse_other_plan(f"{point.path} holds a stage 1", point.record("plan"), plan)
        # on other data the step and weights go on; the batches restart
        if not check_same_data(point, saved.data, cfg):
            point = dataclasses.replace(point, restart_epoch=True)
    return Stage1Found(saved, point, fresh)


def refuse_a_batch_over_the_set(images: int, batch_size: int) -> None:
    """Stage 1 drops a last short batch: a batch (per rank x ranks) over the training set gives it none."""
    world = rank_and_world()[1]
    if images < batch_size * world:
        raise InputError(
            f"convert.stage1_batch_size={batch_size} per rank x {world} rank(s) is larger than the training set "
            f"({images} images); lower convert.stage1_batch_size (unset: data.batch_size is stage 1's)"
        )


def refuse_another_world(what: str, recorded: int | None, world: int, cfg: TrainConfig, over: str) -> None:
    """Stage 1's steps (``what`` did them) on ``recorded`` processes (None: not recorded), to go on on ``world``:
    refused where they differ, naming both. Stage 1 has no accumulation steps: on other processes its global
    batch, and the data it goes on with, would change unsaid. ``over``: how to start over instead."""
    if recorded in (None, world):
        return
    batch = cfg.convert.stage1_batch_size or cfg.data.batch_size  # its plan's stage1_batch_size
    raise InputError(
        f"{what} on {recorded} process(es) (global batch {batch * recorded} = {batch} per rank x {recorded}) "
        f"and this run has {world}: stage 1 cannot keep its global batch (it has no accumulation steps); nothing "
        f"was written. Resume it on {recorded} process(es), or {over} (checkpoint.resume=none)"
    )


def _refuse_other_plan(held: str, recorded: Any, plan: ConversionPlan) -> None:
    """``held`` (a stage 1's checkpoint or result) refused where its ``recorded`` plan is not ``plan``, the
    attention options of each as ``plan``'s layers are built with them (a default written out, or left out, is
    the same plan)."""
    now = json.loads(json.dumps(plan.to_dict()))
    if isinstance(recorded, dict) and recorded.keys() == now.keys():
        names = [layer.attention for layer in plan.layers]
        old, new = (
            {**p, "attention_kwargs": options_in_effect(names, p["attention_kwargs"])}
            for p in (recorded, now)
        )
        if old == new:
            return
    raise InputError(
        f"{held} of a different conversion plan; use a new run_dir or checkpoint.resume=none to redo stage 1"
    )


def open_stage1(found: Stage1Found, device: torch.device) -> Stage1Job:
    """The stage 1 ``found``, as far as the earlier run left it: complete (its weights loaded into the
    student), stopped at a step (weights and optimiser loaded), or not started."""
    saved, point, fresh = found.saved, found.point, found.fresh
    cfg, parts, plan, folder = saved.cfg, saved.parts, saved.plan, saved.manager.run_dir
    if point is not None and point.record("complete"):
        parts.student.load_state_dict(point.load_tensors(str(device))["model"])
        say(f"stage 1: resumed from {point.path} ({point.step} steps done earlier)")
        done = Stage1Result(
            point.step, point.record("seconds"), point.record("history"), True, point.record("memory")
        )
        return Stage1Job(saved, device, done)
    legacy = _legacy_result(parts.student, folder, plan) if point is None and not fresh else None
    if legacy is not None:
        say(f"stage 1: resumed from {folder} ({legacy.steps} steps done earlier)")
        return Stage1Job(saved, device, legacy)
    earlier, done, optimizer_state = 0.0, 0, None
    if point is not None:
        say(f"stage 1: resumed from {point.path} (step {point.step} of {plan.stage1_steps})")
        earlier, done = point.record("seconds"), point.step
        tensors = point.load_tensors(str(device))
        parts.student.load_state_dict(tensors["model"])
        optimizer_state = optimizer_state_from_tensors(tensors["optimizer"], point.record("optimizer_meta"))

    def save(step: int, state: dict[str, Any], result: Stage1Result) -> str | None:
        return saved.save(step, state, dataclasses.replace(result, seconds=result.seconds + earlier))

    c = cfg.convert
    if c.stage1_warmup_steps > plan.stage1_steps:  # the plan's lr is then never reached
        warn(
            f"warning: convert.stage1_warmup_steps={c.stage1_warmup_steps} is longer than stage 1 "
            f"(convert.stage1_steps={plan.stage1_steps}): its lr only rises, to "
            f"{plan.stage1_lr * plan.stage1_steps / c.stage1_warmup_steps:g} of {plan.stage1_lr:g}, and never "
            f"decays; set convert.stage1_warmup_steps below {plan.stage1_steps}"
        )
    options = {
        "warmup_steps": c.stage1_warmup_steps,
        "weight_decay": c.stage1_weight_decay,
        "clip_grad": c.stage1_clip_grad,
        "log_every": cfg.log.every_steps,
        "start_step": done,
        "optimizer_state": optimizer_state,
        "history": point.record("history") if point else (),
        "on_save": save,
        "save_every": cfg.checkpoint.every_steps,
        "log_window": (point.record("log_window") or []) if point and not point.restart_epoch else (),
    }
    first = 0 if point is not None and point.restart_epoch else done
    return Stage1Job(saved, device, None, options, first, earlier)


class _Stage1Saves:
    """Where stage 1's checkpoints go and what each holds (rank 0 writes; every rank reads)."""

    def __init__(self, cfg: TrainConfig, parts: RunParts, plan: ConversionPlan, folder: Path, main: bool):
        self.cfg, self.parts, self.plan, self.main = cfg, parts, plan, main
        self.data = data_identity(parts.train_loader.dataset)
        self.manager = CheckpointManager(folder, keep_last=1)

    def save(
        self,
        step: int,
        optimizer_state: dict[str, Any] | None,
        result: Stage1Result,
        *,
        complete: bool = False,
    ) -> str | None:
        """Checkpoint ``step`` (the optimiser too while stage 1 is incomplete); returns where (rank 0)."""
        if not self.main:
            return None
        tensors = {"model": self.parts.student.state_dict()}
        state = {
            "step": step,
            "complete": complete,
            "seconds": result.seconds,
            "history": result.history,
            "log_window": result.window,
            "memory": result.memory,
            "plan": self.plan.to_dict(),
            "config": to_dict(self.cfg, "convert"),
            "teacher": self.parts.teacher_record,
            "data": self.data,
            "world_size": rank_and_world()[1],
            # as run.json's, which stage 2 writes: a resume of a stage 1 stopped before it names what to install
            **({"plugins": origins} if (origins := plugin_origins(self.cfg)) else {}),
        }
        if optimizer_state is not None:
            tensors["optimizer"], state["optimizer_meta"] = optimizer_state_to_tensors(optimizer_state)
        return str(self.manager.save(step, tensors, state, replace=True))


def _cycle(loader, sampler, start: int = 0) -> Iterator[torch.Tensor]:
    """Input batches forever, a new shuffle each pass, from batch ``start`` on (a resumed stage 1)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.set_position(skip * loader.batch_size * sampler.world_size)
        skip = 0
        for x, *_ in loader:  # images only
            yield x
        epoch += 1


def stage1_batches(
    cfg: TrainConfig, parts: RunParts, batch_size: int, device: torch.device, start: int = 0
) -> Iterator[torch.Tensor]:
    """This rank's share of the training images (labels unused), shuffled with its own seed."""
    dataset = parts.train_loader.dataset
    refuse_a_batch_over_the_set(len(dataset), batch_size)
    rank, world = rank_and_world()
    sampler = ResumableSampler(
        len(dataset), shuffle=True, seed=data_seed(cfg) + 1, rank=rank, world_size=world, drop_last=True
    )
    loader = build_loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        seed=data_seed(cfg) + 1,
    )
    return (x.to(device, non_blocking=True) for x in _cycle(loader, sampler, start))


def _legacy_result(student: nn.Module, folder: Path, plan: ConversionPlan) -> Stage1Result | None:
    """A complete stage 1 written before it saved through the checkpoint store (``student.safetensors`` and
    ``stage1.json``), loaded into ``student``; None where there is none."""
    weights, info = folder / "student.safetensors", folder / "stage1.json"
    if not (weights.is_file() and info.is_file()):
        return None
    meta = json.loads(info.read_text())
    _refuse_other_plan(f"{folder} holds a stage-1 result", meta.get("plan"), plan)
    student.load_state_dict(load_file(str(weights), device=str(next(student.parameters()).device)))
    return Stage1Result(
        meta["steps"], meta["seconds"], meta["history"], resumed=True, memory=meta.get("memory")
    )
