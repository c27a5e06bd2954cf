"""Stage 1 of `attnxfer convert` as a run: its batches, the result it saves, and picking it up again.

A finished stage 1 is kept in ``RUN_DIR/stage1`` (the student's weights and ``stage1.json``), so a second
``attnxfer convert`` into the same run dir goes straight to stage 2; a stage 1 stopped by SIGTERM keeps its
step (weights, optimiser state, progress; no pickle) in ``stage1/partial`` and continues there.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..checkpoints.resume_from import ResumeFrom, ResumePolicy
from ..checkpoints.store import atomic_write_json, optimizer_state_from_tensors, optimizer_state_to_tensors
from ..config import TrainConfig
from ..data import ResumableSampler, build_loader
from ..errors import InputError
from ..train.distributed import rank_and_world
from ..train.stage1 import Stage1Result, stage1_transfer
from ..transfer.conversion import ConversionPlan
from .run_parts import RunParts

__all__ = ["PARTIAL", "run_stage1"]

#: where a SIGTERM'd stage 1 keeps its step (weights, optimiser state, progress) until it completes
PARTIAL = "partial"


def run_stage1(
    cfg: TrainConfig,
    parts: RunParts,
    plan: ConversionPlan,
    folder: Path,
    device: torch.device,
    *,
    main: bool,
    log: Callable[[str], None],
) -> Stage1Result:
    """Stage 1 into ``folder``, or what an earlier run left of it: its finished result, or the step a
    SIGTERM stopped it at (unless ``checkpoint.resume=none``). Rank 0 (``main``) alone writes files."""
    may_resume = ResumeFrom.parse(cfg.checkpoint.resume).policy is not ResumePolicy.FRESH
    finished = _load_stage1(parts.student, folder, plan) if may_resume else None
    if finished is not None:
        log(f"stage 1: resumed from {folder} ({finished.steps} steps done earlier)")
        return finished
    partial = _load_stage1_partial(parts.student, folder, plan) if may_resume else None
    if partial:
        log(f"stage 1: resumed from {folder / PARTIAL} (step {partial['step']} of {plan.stage1_steps})")
    stage1 = _fit(cfg, parts, plan, folder, device, partial, main=main, log=log)
    if main:
        _save_stage1(parts.student, folder, stage1, plan)
        shutil.rmtree(folder / PARTIAL, ignore_errors=True)  # the complete result replaces it
    return stage1


def _fit(
    cfg: TrainConfig,
    parts: RunParts,
    plan: ConversionPlan,
    folder: Path,
    device: torch.device,
    partial: dict[str, Any] | None,
    *,
    main: bool,
    log: Callable[[str], None],
) -> Stage1Result:
    """`stage1_transfer` from the step ``partial`` stopped at (or 0); its seconds count the earlier runs'."""
    earlier = partial["seconds"] if partial else 0.0
    done = partial["step"] if partial else 0
    student = parts.student

    def on_stop(step: int, optimizer_state: dict[str, Any], result: Stage1Result) -> str | None:
        result.seconds += earlier
        if not main:
            return None
        return _save_stage1_partial(student, folder, step, optimizer_state, result, plan)

    c = cfg.convert
    batches = _stage1_batches(cfg, parts, plan.stage1_batch_size, device, start=done)
    stage1 = stage1_transfer(
        parts.teacher,
        student,
        plan,
        batches,
        warmup_steps=c.stage1_warmup_steps,
        weight_decay=c.stage1_weight_decay,
        clip_grad=c.stage1_clip_grad,
        log_every=cfg.log.every_steps,
        log=log,
        start_step=done,
        optimizer_state=partial["optimizer"] if partial else None,
        history=partial["history"] if partial else (),
        on_stop=on_stop,
    )
    stage1.seconds += earlier
    return stage1


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


def _stage1_batches(
    cfg: TrainConfig, parts: RunParts, batch_size: int, device: torch.device, start: int = 0
) -> Iterator[torch.Tensor]:
    """This rank's share of the training images (labels unused), shuffled with its own seed."""
    dataset = parts.train_loader.dataset
    rank, world = rank_and_world()
    if len(dataset) < batch_size * world:
        raise InputError(
            f"convert.stage1_batch_size={batch_size} per rank x {world} rank(s) is larger than "
            f"the training set ({len(dataset)})"
        )
    sampler = ResumableSampler(
        len(dataset), shuffle=True, seed=cfg.seed + 1, rank=rank, world_size=world, drop_last=True
    )
    loader = build_loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        seed=cfg.seed + 1,
    )
    return (x.to(device, non_blocking=True) for x in _cycle(loader, sampler, start))


def _save_stage1(student: nn.Module, folder: Path, result: Stage1Result, plan: ConversionPlan) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "student.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp))
    tmp.replace(folder / "student.safetensors")
    atomic_write_json(
        folder / "stage1.json",
        {
            "steps": result.steps,
            "seconds": result.seconds,
            "history": result.history,
            "memory": result.memory,
            "plan": plan.to_dict(),
        },
    )


def _save_stage1_partial(
    student: nn.Module, folder: Path, step: int, optimizer_state: dict[str, Any], result: Stage1Result, plan
) -> str:
    """Stage 1 stopped at ``step`` (SIGTERM): keep everything it needs to continue there, no pickle."""
    part = folder / PARTIAL
    part.mkdir(parents=True, exist_ok=True)
    tensors, meta = optimizer_state_to_tensors(optimizer_state)
    for name, group in (("student", student.state_dict()), ("optimizer", tensors)):
        tmp = part / f"{name}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp))
        tmp.replace(part / f"{name}.safetensors")
    progress = {"step": step, "seconds": result.seconds, "history": result.history, "optimizer": meta}
    atomic_write_json(part / "progress.json", {**progress, "plan": plan.to_dict()})
    return str(part)


def _load_stage1_partial(student: nn.Module, folder: Path, plan: ConversionPlan) -> dict[str, Any] | None:
    """The progress of a stage 1 stopped by SIGTERM (its weights loaded into ``student``), or None."""
    part = folder / PARTIAL
    if not (part / "progress.json").is_file():
        return None
    progress = json.loads((part / "progress.json").read_text())
    if progress.get("plan") != json.loads(json.dumps(plan.to_dict())):
        raise InputError(
            f"{part} holds a stopped stage 1 of a different conversion plan; use a new run_dir or "
            "checkpoint.resume=none to redo stage 1"
        )
    device = str(next(student.parameters()).device)
    student.load_state_dict(load_file(str(part / "student.safetensors"), device=device))
    tensors = load_file(str(part / "optimizer.safetensors"), device=device)
    progress["optimizer"] = optimizer_state_from_tensors(tensors, progress["optimizer"])
    return progress


def _load_stage1(student: nn.Module, folder: Path, plan: ConversionPlan) -> Stage1Result | None:
    weights, info = folder / "student.safetensors", folder / "stage1.json"
    if not (weights.is_file() and info.is_file()):
        return None
    meta = json.loads(info.read_text())
    if meta.get("plan") != json.loads(json.dumps(plan.to_dict())):
        raise InputError(
            f"{folder} holds a stage-1 result of a different conversion plan; use a new run_dir or "
            "checkpoint.resume=none to redo stage 1"
        )
    student.load_state_dict(load_file(str(weights), device=str(next(student.parameters()).device)))
    return Stage1Result(
        meta["steps"], meta["seconds"], meta["history"], resumed=True, memory=meta.get("memory")
    )
