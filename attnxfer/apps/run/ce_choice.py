"""`transfer.ce_path` of a training run: forced, reused from the checkpoint a run resumes (the paths agree
only to fp32 rounding, so measuring again could break bit-identical resume), or measured by rank 0."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ...checkpoints.resume_point import ResumePoint
from ...config import TrainConfig
from ...speak import say
from ...train.distributed import gather_objects, rank_and_world
from ...train.runtime import Runtime
from ...transfer.ce_select import CEChoice, budget_from_gib, check_forced, choose_ce_path, layer_shapes
from ...transfer.losses import CEPath, ce_path_for
from ...transfer.teacher_student import TeacherStudent


def decided_on_rank0(decide: Callable[[], CEChoice | None]) -> CEChoice | None:
    """``decide()`` on rank 0 only; every rank returns rank 0's choice (one collective; no-op alone)."""
    rank, world = rank_and_world()
    if world == 1:
        return decide()
    mine = decide() if rank == 0 else None
    record = gather_objects(None if mine is None else mine.record())[0]
    if rank == 0 or record is None:
        return mine
    return CEChoice.from_record(record, f"{record['how']} on rank 0")


def ce_choice_for_run(
    cfg: TrainConfig,
    pair: TeacherStudent,
    runtime: Runtime,
    resumed_from: ResumePoint | None,
    *,
    scoring: bool = False,
) -> CEChoice | None:
    """How ``pair``'s softmax layers evaluate their CE, set on ``pair`` and returned for the records; None
    when the run distils no softmax maps. ``scoring=True`` times nothing."""
    shapes = layer_shapes(pair, cfg.data.batch_size, runtime.device)
    if shapes is None:
        return None
    if cfg.transfer.ce_path != "auto":
        if not scoring:  # refused with why, never replaced (scoring computes no distillation CE)
            check_forced(cfg.transfer.ce_path, runtime.device, shapes)
        choice = CEChoice(
            CEPath(cfg.transfer.ce_path), "forced by transfer.ce_path", device=str(runtime.device)
        )
    else:
        # the path the resumed checkpoint was trained with (an older one without the record: measure again)
        record = None if resumed_from is None else resumed_from.record("ce_path")
        choice = None
        if isinstance(record, dict):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                choice = CEChoice.from_record(record, f"resumed from {resumed_from.name}")
        if choice is not None and choice.device and torch.device(choice.device).type != runtime.device.type:
            say(
                f"ce_path auto: {choice.path} was measured on {choice.device}; this run is on {runtime.device}"
            )
            choice = None  # another device kind: its ranking says nothing here, nor is resume bit-identical
        # deterministic: timings may rank close paths either way from run to run
        if choice is None and (scoring or cfg.deterministic):
            why = "" if scoring else ": deterministic=true keeps repeated runs identical (no timing)"
            choice = CEChoice(ce_path_for(runtime.device), f"device default{why}", device=str(runtime.device))
        if choice is None:
            choice = decided_on_rank0(
                lambda: choose_ce_path(
                    pair,
                    cfg.data.batch_size,
                    runtime.device,
                    student_dtype=runtime.precision.dtype if runtime.precision.autocasts else torch.float32,
                    budget_bytes=budget_from_gib(cfg.transfer.materialise_budget_gib),
                )
            )
    say(choice.describe())
    pair.ce_path, pair.ce_path_forced = choice.path, cfg.transfer.ce_path != "auto"
    return choice
