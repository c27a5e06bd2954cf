"""`attnxfer convert`: a pretrained softmax teacher becomes an efficient-attention student.

The config becomes objects here: the student (`build_efficient_student`), the conversion plan
(`attnxfer.transfer.conversion`), stage 1 (`attnxfer.train.stage1`), stage 2 (an ordinary training run
through `attnxfer.apps.training`), the measurements (`attnxfer.train.measure`) before and after each
stage, and the report (`report.json` + `report.md`, rendered by `attnxfer.apps.reports`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..checkpoints.resume_from import ResumeFrom, ResumePolicy
from ..checkpoints.run_dir import RunDir
from ..checkpoints.run_lock import run_lock
from ..checkpoints.store import (
    atomic_write_json,
    atomic_write_text,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
)
from ..config import TrainConfig, apply_overrides, dump_config
from ..data import ResumableSampler, build_loader, require_labels
from ..errors import InputError
from ..models.efficient import build_efficient_student, new_parameters, set_drop_path
from ..train.devices import resolve_precision
from ..train.distributed import DistributedInfo, backend_for, joined_process_group, rank_and_world
from ..train.measure import evaluate_top1, map_agreement, operation_counts, relative_speed
from ..train.runtime import resolve_device
from ..train.stage1 import Stage1Result, stage1_transfer
from ..transfer.conversion import ConversionPlan, build_conversion_plan
from .loaders import data_info
from .reports import render_conversion_report, teacher_top1_line
from .run_parts import build_run_parts
from .training import plan_from_config, prepare_trackers_from_config, train

__all__ = ["ConvertResult", "conversion_plan_from_config", "convert", "convert_main"]

_REPORT_VERSION = 1


_NO_TEACHER = (
    "attnxfer convert needs a teacher: set teacher.spec (timm name, hf-hub:ORG/NAME, local-dir:PATH or a "
    "weights file)"
)


@dataclass
class ConvertResult:
    run_dir: str
    report: dict[str, Any]


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
    cfg: TrainConfig, parts, batch_size: int, device: torch.device, start: int = 0
) -> Iterator[torch.Tensor]:
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


def conversion_plan_from_config(cfg: TrainConfig, teacher: nn.Module, student: nn.Module) -> ConversionPlan:
    """The ``convert`` section as a validated `ConversionPlan` (stage-1 batch defaults to data.batch_size)."""
    c = cfg.convert
    return build_conversion_plan(
        teacher,
        student,
        stage1_steps=c.stage1_steps,
        stage1_lr=c.stage1_lr,
        stage1_batch_size=c.stage1_batch_size or cfg.data.batch_size,
        stage1_train=c.stage1_train,
        map_loss=c.map_loss,
        output_mse=c.output_mse,
        attention_kwargs=c.attention_kwargs,
    )


def _stage2_steps(cfg: TrainConfig, parts) -> int:
    steps = (len(parts.train_loader) // cfg.optim.accum_steps) * cfg.schedule.epochs
    return steps if cfg.schedule.max_steps is None else min(steps, cfg.schedule.max_steps)


def _save_stage1(student: nn.Module, folder: Path, result: Stage1Result, plan: ConversionPlan) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "student.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp))
    tmp.replace(folder / "student.safetensors")
    atomic_write_json(
        folder / "stage1.json",
        {"steps": result.steps, "seconds": result.seconds, "history": result.history, "plan": plan.to_dict()},
    )


#: where a SIGTERM'd stage 1 keeps its step (weights, optimiser state, progress) until it completes
_PARTIAL = "partial"


def _save_stage1_partial(
    student: nn.Module, folder: Path, step: int, optimizer_state: dict[str, Any], result: Stage1Result, plan
) -> str:
    """Stage 1 stopped at ``step`` (SIGTERM): keep everything it needs to continue there, no pickle."""
    part = folder / _PARTIAL
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
    part = folder / _PARTIAL
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
    return Stage1Result(meta["steps"], meta["seconds"], meta["history"], resumed=True)


def _merge_agreement(stages: dict[str, list[dict[str, Any]] | None]) -> list[dict[str, Any]]:
    """Per layer: metric value at each stage (None where a stage did not run)."""
    first = next(rows for rows in stages.values() if rows is not None)
    merged = []
    for i, row in enumerate(first):
        entry = {k: row[k] for k in ("layer", "attention", "map_kind", "metric")}
        for stage, rows in stages.items():
            entry[stage] = rows[i]["value"] if rows is not None else None
            entry[f"output_mse_{stage}"] = rows[i]["output_mse"] if rows is not None else None
        merged.append(entry)
    return merged


def convert(
    cfg: TrainConfig, *, skip_stage1: bool = False, parts=None, log: Callable[[str], None] = print
) -> ConvertResult:
    """Run the whole conversion described by ``cfg`` (the library function behind `attnxfer convert`).

    ``parts`` (a `RunParts` whose student came from `build_efficient_student`) lets a notebook pass
    models and data it built. Writes ``report.json`` / ``report.md`` (and ``stage1/``, ``stage2/``)
    under ``cfg.run_dir``.

    Under torchrun or a submitted multi-task job every rank runs this: stage 1 is data parallel
    (each rank its share of the batches, gradients averaged), stage 2 is the engine's DDP, the
    measurements sum over ranks, and rank 0 alone writes files and logs (and holds the run dir's lock).
    """
    # the report's val top-1 and stage 2's task loss read labels: data without them stops before the run dir
    require_labels(data_info(cfg.data), "the conversion report's val top-1 (and stage 2's task loss)")
    main = DistributedInfo.from_environment().is_main_process
    with (
        run_lock(cfg.run_dir, "convert", enabled=main),
        joined_process_group(backend_for(cfg.device)) as info,
    ):
        return _convert(cfg, info, skip_stage1=skip_stage1, parts=parts, log=log)


def _convert(
    cfg: TrainConfig, info, *, skip_stage1: bool, parts, log: Callable[[str], None]
) -> ConvertResult:

    if cfg.model.attention:
        raise InputError(
            f"model.attention={cfg.model.attention!r} is the attention of a fresh student (`attnxfer train`); "
            "convert builds its student from the teacher's weights with convert.attention: set that instead"
        )
    if skip_stage1:
        cfg = apply_overrides(cfg, {"convert.stage1_steps": 0})
    c = cfg.convert
    main = info.is_main_process
    if not main:
        log = _silent
    else:  # stage 2's trackers, decided before the teacher loads (a server that does not answer stops here)
        prepare_trackers_from_config(cfg, Path(cfg.run_dir) / "stage2")
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)

    def make_student(teacher: nn.Module | None, num_classes: int) -> nn.Module:
        if teacher is None:
            raise InputError(_NO_TEACHER)
        student = build_efficient_student(teacher, c.attention, num_classes=num_classes, **c.attention_kwargs)
        return set_drop_path(student, cfg.model.drop_path_rate)

    if parts is None:
        parts = build_run_parts(cfg, rank=info.rank, world_size=info.world_size, student_fn=make_student)
    teacher, student = parts.teacher, parts.student
    if teacher is None:
        raise InputError(_NO_TEACHER)
    plan = conversion_plan_from_config(cfg, teacher, student)
    stage2_plan = plan_from_config(cfg, parts)
    stage2_steps = _stage2_steps(cfg, parts)
    log(plan.describe())
    if stage2_steps:
        starts = "after stage 1" if plan.stage1_steps > 0 else "with the new attention swapped in, no stage 1"
        log(
            f"stage 2: fine-tunes the converted student end to end (the teacher's weights {starts}; not a "
            f"fresh initialisation), {stage2_steps} steps (schedule/optim sections); "
            + stage2_plan.describe().replace("\n", "\n  ")
        )
    else:
        log("stage 2: skipped (0 steps: schedule.epochs or schedule.max_steps is 0)")

    run_dir = Path(cfg.run_dir)
    if main:
        RunDir(run_dir).write_config(dump_config(cfg))
    device = resolve_device(cfg.device)
    # Stage 1 and every measurement run the teacher in fp32: its maps are regression targets and the report
    # compares stages in one precision. Stage 2 runs it in teacher.dtype (bf16 on GPU by default).
    teacher.to(device=device, dtype=torch.float32).eval()
    student.to(device)
    probe = [x.to(device) for x, *_ in _take(parts.val_loader, c.agreement_batches)]
    if not probe:
        raise InputError("the validation set is empty: convert measures map agreement on it")
    seconds: dict[str, float] = {}

    def checkpoint_stage(name: str) -> dict[str, Any]:
        start = time.monotonic()
        res = {
            "teacher_input": map_agreement(teacher, student, probe, inputs="teacher"),
            "end_to_end": map_agreement(teacher, student, probe, inputs="own"),
            "val_top1": evaluate_top1(student, parts.val_loader, device),
        }
        seconds[f"measure_{name}"] = time.monotonic() - start
        top1 = res["val_top1"]
        kl = [row["value"] for row in res["end_to_end"]]
        log(
            f"{name}: student val top-1 {top1 if top1 is None else round(top1, 2)}, end-to-end per-layer "
            f"agreement {', '.join(f'{v:.3g}' for v in kl)}"
        )
        return res

    teacher_top1 = evaluate_top1(teacher, parts.val_loader, device)
    log(teacher_top1_line(teacher_top1))
    measured: dict[str, dict[str, Any] | None] = {"before_stage1": checkpoint_stage("before stage 1")}

    # -- stage 1
    stage1 = Stage1Result()
    if plan.stage1_steps > 0:
        folder = run_dir / "stage1"
        may_resume = ResumeFrom.parse(cfg.checkpoint.resume).policy is not ResumePolicy.FRESH
        resumed = _load_stage1(student, folder, plan) if may_resume else None
        if resumed is not None:
            stage1 = resumed
            log(f"stage 1: resumed from {folder} ({stage1.steps} steps done earlier)")
        else:
            partial = _load_stage1_partial(student, folder, plan) if may_resume else None
            done = partial["step"] if partial else 0
            if partial:
                log(f"stage 1: resumed from {folder / _PARTIAL} (step {done} of {plan.stage1_steps})")

            def on_stop(step: int, optimizer_state: dict[str, Any], result: Stage1Result) -> str | None:
                result.seconds += partial["seconds"] if partial else 0.0
                if not main:
                    return None
                return _save_stage1_partial(student, folder, step, optimizer_state, result, plan)

            batches = _stage1_batches(cfg, parts, plan.stage1_batch_size, device, start=done)
            stage1 = stage1_transfer(
                teacher,
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
            stage1.seconds += partial["seconds"] if partial else 0.0
            if main:
                _save_stage1(student, folder, stage1, plan)
                shutil.rmtree(folder / _PARTIAL, ignore_errors=True)  # the complete result replaces it
        seconds["stage1"] = stage1.seconds
        measured["after_stage1"] = checkpoint_stage("after stage 1")
    else:
        measured["after_stage1"] = None

    # -- stage 2
    stage2: dict[str, Any] = {"steps": stage2_steps, "plan": stage2_plan.describe()}
    if stage2_steps > 0:
        cfg2 = apply_overrides(cfg, {"run_dir": str(run_dir / "stage2")})
        result = train(cfg2, parts)
        teacher.to(device=device, dtype=torch.float32)  # stage 2 may have cast it to teacher.dtype
        student.to(device)
        stage2.update(
            run_dir=result.run_dir,
            seconds=result.seconds,
            final=result.final,
            history=result.history,
            best_top1=result.best_top1,
        )
        seconds["stage2"] = result.seconds
        measured["after_stage2"] = checkpoint_stage("after stage 2")
    else:
        measured["after_stage2"] = None

    # -- speed and report
    x = torch.randn(c.speed_batch_size, *probe[0].shape[1:], generator=torch.Generator().manual_seed(0)).to(
        device
    )
    # Images/s at the run's resolution, in the precision the run trains in (bf16 autocast on GPU by default):
    # a few forward batches of each model, interleaved (convert.speed_repeats, convert.speed_batch_size).
    precision = resolve_precision(cfg.precision, device)
    speed = relative_speed(
        teacher,
        student,
        x,
        repeats=c.speed_repeats,
        autocast=precision.dtype if precision.autocasts else None,
    )
    log(
        f"speed: student {speed['student_images_per_s']:.1f} images/s vs teacher "
        f"{speed['teacher_images_per_s']:.1f} images/s (batch {speed['batch']}, {speed['precision']}) -> "
        f"{speed['speedup']:.2f}x"
    )
    operations = operation_counts(teacher, student, batch=1)
    seconds["total"] = time.monotonic() - t0
    final_stage = next(
        s for s in ("after_stage2", "after_stage1", "before_stage1") if measured[s] is not None
    )
    student_top1 = measured[final_stage]["val_top1"]
    top1 = {"teacher": teacher_top1, **{s: (m["val_top1"] if m else None) for s, m in measured.items()}}
    report = {
        "version": _REPORT_VERSION,
        "run_dir": str(run_dir),
        "teacher": {"spec": cfg.teacher.spec, "record": parts.teacher_record, "val_top1": teacher_top1},
        "student": {
            "attention": [layer.attention for layer in plan.layers],
            "attention_kwargs": plan.attention_kwargs,
            "spec": parts.student_spec,
            "new_parameters": _count_new(student),
        },
        "data": {
            "dataset": cfg.data.dataset,
            "val_size": _dataset_size(parts.val_loader),
            "agreement_images": sum(x.shape[0] for x in probe),
        },
        "plan": plan.to_dict(),
        "stage1": {
            "steps": stage1.steps,
            "skipped": plan.stage1_steps <= 0,
            "resumed": stage1.resumed,
            "seconds": stage1.seconds,
            "history": stage1.history,
            "batch_size": plan.stage1_batch_size,
            "lr": plan.stage1_lr,
            "train": plan.stage1_train,
        },
        "stage2": stage2,
        "top1": top1,
        "student_top1": student_top1,
        "recovered_pct": (
            100.0 * student_top1 / teacher_top1 if teacher_top1 and student_top1 is not None else None
        ),
        "agreement": {
            which: _merge_agreement({s: (m[which] if m else None) for s, m in measured.items()})
            for which in ("teacher_input", "end_to_end")
        },
        "speed": speed,
        "operations": operations,
        "seconds": seconds,
    }
    if main:
        atomic_write_json(run_dir / "report.json", report)
        atomic_write_text(run_dir / "report.md", render_conversion_report(report))
        log(f"report: {run_dir / 'report.md'}")
    return ConvertResult(str(run_dir), report)


def convert_main(cfg: TrainConfig) -> dict[str, Any]:
    """`convert` as a job's main (``attnxfer submit --command convert``): the report is the job's result."""
    return convert(cfg).report


def _silent(_: str) -> None:
    """The log of ranks other than 0."""


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def _dataset_size(loader) -> int | None:
    try:
        return len(loader.dataset)
    except TypeError:
        return None


def _count_new(student: nn.Module) -> int:
    return sum(p.numel() for _, p in new_parameters(student))
