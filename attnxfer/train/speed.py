"""Forward speed of a converted student against its teacher and its floor (the same model mixing no tokens,
`attnxfer.models.efficient.floor`: no attention beats it), and the break-even size where efficient attention
starts to pay. Times are compared only inside one interleaved call (`attnxfer.train.timing`); on the CPU
rows also give ratios of process CPU time, which other programs on a shared machine distort less.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..analysis.knn import evaluating
from ..errors import InputError
from ..models.efficient.floor import floor_model
from ..models.image_input import image_input
from .timing import Timing, interleaved_timings

#: The ratios of images/s a speed row carries, each (numerator model, denominator model).
RATIOS: dict[str, tuple[str, str]] = {
    "student_over_teacher": ("student", "teacher"),
    "floor_over_teacher": ("floor", "teacher"),
    "student_over_floor": ("student", "floor"),
}


@torch.no_grad()
def interleaved_forward_seconds(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    *,
    warmup: int = 1,
    repeats: int = 5,
    autocast: torch.dtype | None = None,
) -> dict[str, Timing]:
    """The `Timing` of one forward of each model on ``x`` (in eval mode, under ``autocast`` when given):
    ``repeats`` interleaved rounds after ``warmup`` untimed ones."""
    cast = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with evaluating(*models.values()), cast:
        calls = {name: partial(model, x) for name, model in models.items()}
        return interleaved_timings(calls, device=x.device, warmup=warmup, repeats=repeats)


def _tokens(model: nn.Module, x: torch.Tensor) -> int | None:
    """Tokens of a flat ViT's sequence at ``x``'s size (prefix + grid), None for hierarchical models."""
    try:
        geometry = image_input(model)
    except InputError:  # a model image_input cannot read: the count is a label only
        return None
    if not hasattr(model, "blocks") or len(geometry.patch_size) != 2:
        return None
    grid = [s // p for s, p in zip(x.shape[-2:], geometry.patch_size)]
    return grid[0] * grid[1] + int(getattr(model, "num_prefix_tokens", 0) or 0)


def forward_speed(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    *,
    warmup: int = 1,
    repeats: int = 5,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """One speed row of ``models`` (``teacher``, ``student``, and ``floor`` where it can be built) on ``x``:
    per model the median milliseconds, images/s and spread, and the `RATIOS` whose two models are present."""
    times = interleaved_forward_seconds(models, x, warmup=warmup, repeats=repeats, autocast=autocast)
    return _speed_row(times, models["teacher"], x, repeats, autocast)


def forward_speeds(
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    x: torch.Tensor,
    *,
    floor: nn.Module | None = None,
    warmup: int = 1,
    repeats: int = 5,
    autocast: torch.dtype | None = None,
) -> dict[str, dict[str, Any]]:
    """One `forward_speed` row per student from ONE interleaved call: the teacher and the floor are timed once
    for all the rows, so the students' ratios share one denominator (a convert study's comparison)."""
    models = {"teacher": teacher, **({"floor": floor} if floor is not None else {})}
    models |= {f"student:{name}": model for name, model in students.items()}
    times = interleaved_forward_seconds(models, x, warmup=warmup, repeats=repeats, autocast=autocast)
    shared = {name: times[name] for name in ("teacher", "floor") if name in times}
    return {
        name: _speed_row({**shared, "student": times[f"student:{name}"]}, teacher, x, repeats, autocast)
        for name in students
    }


def _speed_row(
    times: Mapping[str, Timing],
    teacher: nn.Module,
    x: torch.Tensor,
    repeats: int,
    autocast: torch.dtype | None,
) -> dict[str, Any]:
    batch = int(x.shape[0])
    row: dict[str, Any] = {
        "resolution": int(x.shape[-1]),
        "tokens": _tokens(teacher, x),
        "batch": batch,
        "repeats": repeats,
        "device": x.device.type,
        "threads": torch.get_num_threads(),
        "precision": f"{str(autocast).removeprefix('torch.')} autocast" if autocast else "no autocast",
    }
    for name, t in times.items():
        row[f"{name}_ms"] = 1000.0 * t.median
        row[f"{name}_images_per_s"] = batch / t.median
        row[f"{name}_spread"] = t.spread
    for key, (top, bottom) in RATIOS.items():
        if top not in times or bottom not in times:
            continue
        t_top, t_bottom = times[top], times[bottom]  # images/s of ``top`` over ``bottom``: seconds inverted
        row[key] = t_bottom.median / t_top.median
        row[f"{key}_range"] = ratio_range(t_top, t_bottom)
        if x.device.type == "cpu" and min(t_bottom.cpu_median, t_top.cpu_median) > 0:
            row[f"{key}_cpu"] = t_bottom.cpu_median / t_top.cpu_median
    return row


def ratio_range(top: Timing, bottom: Timing) -> list[float]:
    """[min, max] over the rounds of ``top``'s speed over ``bottom``'s: how far the ratio strays as load drifts."""
    ratios = [b / t for t, b in zip(top.times, bottom.times, strict=True) if t > 0]
    return [min(ratios), max(ratios)] if ratios else []


def ratio_contradicts(row: Mapping[str, Any], key: str = "student_over_teacher") -> str | None:
    """Why a row's ratio ``key`` cannot be claimed, or None: its rounds put it on both sides of 1, or, on one
    CPU thread (where process CPU time and the clock count the same work), its CPU-time ratio falls on the
    other side of 1 from every round's: the clock counted other programs' time."""
    lo, hi = (row.get(f"{key}_range") or [None, None])[:2]
    if lo is None:
        return None
    rounds = f"over {row.get('repeats', '?')} interleaved rounds at {row['resolution']} px the student ran at"
    if lo < 1.0 < hi:  # an end within 0.005 of 1 shows its third digit: "1.00x to 1.45x" read as no crossing
        lo_, hi_ = (f"{v:.3f}" if round(v, 2) == 1 else f"{v:.2f}" for v in (lo, hi))
        return f"{rounds} {lo_}x to {hi_}x the teacher's speed, on both sides of 1"
    cpu = row.get(f"{key}_cpu")
    if cpu is not None and row.get("threads") == 1 and (lo > 1.0 > cpu or hi < 1.0 < cpu):
        return (
            f"{rounds} {lo:.2f}x to {hi:.2f}x the teacher's speed by the clock but {cpu:.2f}x by process CPU "
            "time, on one thread: the other side of 1"
        )
    return None


def speed_against_floor(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    *,
    floor: nn.Module | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`forward_speed` (its keyword ``options``) of teacher, student and floor (by default the teacher's
    `floor_model`: a student's floor is its teacher's, the same projections and MLPs)."""
    floor = floor_model(teacher) if floor is None else floor
    return forward_speed({"teacher": teacher, "student": student, "floor": floor}, x, **options)


def break_even_sweep(
    build: Callable[[int], tuple[nn.Module, nn.Module]], resolutions: Sequence[int], **options: Any
) -> dict[str, Any]:
    """`break_even_sweeps` (its keyword ``options``) of one student: ``build(resolution)`` returns (teacher,
    student)."""

    def one(resolution: int) -> tuple[nn.Module, dict[str, nn.Module]]:
        teacher, student = build(resolution)
        return teacher, {"student": student}

    return break_even_sweeps(one, resolutions, ["student"], **options)["student"]


def break_even_sweeps(
    build: Callable[[int], tuple[nn.Module, Mapping[str, nn.Module | InputError]]],
    resolutions: Sequence[int],
    names: Sequence[str],
    *,
    batch: int = 1,
    device: torch.device | str | None = None,
    warmup: int = 1,
    repeats: int = 3,
    autocast: torch.dtype | None = None,
    seed: int = 0,
    floor: bool = True,
    budget_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Forward speed of teacher, students (and floor) at each resolution, in increasing order, and each
    student's break-even resolution: per name ``{"rows", "skipped": [{"resolution", "reason"}], "break_even"}``.
    ``build(resolution)`` returns (teacher, {name: student}) at that size; a size it refuses (`InputError`: a
    Swin window that cannot tile it) is skipped, and so is one a student's build (an `InputError` in its
    place) or forward refuses, for that student alone (a Linformer's fixed length). ``floor=False``: no floor
    (a teacher `floor_model` cannot take).
    ``budget_s``: no size is started once the sweep took that long or the next one, at the last's growth
    (time x side ratio squared), would pass it: a report's sweep must stay short."""
    if not resolutions:
        raise ValueError("break_even_sweep needs at least one resolution")
    rows: dict[str, list[dict[str, Any]]] = {}
    skipped: list[dict[str, Any]] = []  # sizes no model was built at
    own_skips: dict[str, list[dict[str, Any]]] = {}  # sizes one student cannot run at (a fixed length)
    start, last = time.monotonic(), None  # last: (resolution, seconds) of the last measured size
    for resolution in sorted(set(int(r) for r in resolutions)):
        spent = time.monotonic() - start
        if budget_s is not None and last is not None:
            expected = last[1] * (resolution / last[0]) ** 2
            if spent + expected > budget_s:
                reason = f"past the sweep's {budget_s:g} s budget (expected {expected:.0f} s more)"
                skipped.append({"resolution": resolution, "reason": reason})
                continue
        began = time.monotonic()
        try:
            teacher, students = build(resolution)
        except InputError as e:
            skipped.append({"resolution": resolution, "reason": str(e)})
            continue
        if device is not None:
            teacher = teacher.to(device)
            students = {n: s if isinstance(s, InputError) else s.to(device) for n, s in students.items()}
        where = next(teacher.parameters()).device
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, image_input(teacher).in_chans, resolution, resolution, generator=generator)
        refused = set()
        for name, student in students.items():  # a size this student's build or forward refuses, on one image
            try:
                if isinstance(student, InputError):
                    raise student
                with torch.no_grad():
                    student.eval()(x[:1].to(where))
            except InputError as e:
                own_skips.setdefault(name, []).append({"resolution": resolution, "reason": str(e)})
                refused.add(name)
        students = {n: s for n, s in students.items() if n not in refused}
        measured = forward_speeds(
            teacher,
            students,
            x.to(where),
            floor=floor_model(teacher) if floor else None,
            warmup=warmup,
            repeats=repeats,
            autocast=autocast,
        )
        for name, row in measured.items():
            rows.setdefault(name, []).append(row)
        del teacher, students
        last = (resolution, time.monotonic() - began)
    return {
        name: {
            "rows": rows.get(name, []),
            "skipped": sorted([*skipped, *own_skips.get(name, [])], key=lambda row: row["resolution"]),
            "break_even": break_even_resolution(rows.get(name, [])),
        }
        for name in names
    }


def break_even_resolution(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The smallest ``resolution`` among speed rows whose student is faster than its teacher, or None."""
    faster = [int(row["resolution"]) for row in rows if row["student_over_teacher"] > 1.0]
    return min(faster) if faster else None
