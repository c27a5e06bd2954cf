"""The conversion report's speed: teacher, student and their floor at the run's size, and the break-even size.

The floor (the teacher whose attention mixes no tokens) is the ceiling of every attention at a resolution, so
the report says how much of it the student reaches. Speed does not depend on weights, so each sweep side's
teacher is rebuilt there with random weights. The measuring is `attnxfer.train.speed`'s; this module picks the
sides and reads the config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ...config import TrainConfig
from ...errors import InputError
from ...models.efficient.floor import floor_model
from ...models.image_input import ImageSizeError, check_image_size, sizes_that_fit
from ...sources.teacher import load_teacher
from ...speak import say
from ...train.speed import break_even_sweeps, forward_speeds, ratio_contradicts
from .report import RERUN

#: The default sweep: the run's side times these (each raised to the next side the family runs at).
DEFAULT_SWEEP_MULTIPLES = (1, 2, 3, 4)
#: The default sweep starts no side that would take it past this many seconds (a 4x side on a large model,
#: on one CPU thread, would take minutes); a listed ``convert.speed_sweep`` runs every side it names.
SWEEP_BUDGET_S = 60.0

_SWEEP_KEY = "convert.speed_sweep"


def sweep_sides(cfg: TrainConfig, teacher: nn.Module, side: int) -> tuple[list[int], float | None]:
    """The sides the break-even sweep measures and its time budget (None: no limit), checked before any work:
    ``convert.speed_sweep`` null, the run's side times `DEFAULT_SWEEP_MULTIPLES` (each raised to the next side
    the family runs at) within `SWEEP_BUDGET_S`; a list, exactly those sides."""
    listed = cfg.convert.speed_sweep
    if listed is not None:
        for s in listed:
            try:
                check_image_size(teacher, s)
            except ImageSizeError as e:
                raise e.restated(_SWEEP_KEY) from None
        return sorted(set(listed)), None
    sides = []
    for multiple in DEFAULT_SWEEP_MULTIPLES:
        wanted = side * multiple
        try:
            check_image_size(teacher, wanted)
            sides.append(wanted)
        except ImageSizeError:
            above = sizes_that_fit(teacher, wanted)[1]
            if above is not None:
                sides.append(above)
    return sorted(set(sides)), SWEEP_BUDGET_S


def conversion_speeds(
    cfg: TrainConfig,
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    x: torch.Tensor,
    *,
    sides: list[int],
    budget_s: float | None,
    make_students: Callable[[nn.Module], Mapping[str, nn.Module | InputError]],
    autocast: torch.dtype | None,
) -> dict[str, dict[str, Any]]:
    """The report's ``speed`` section of each student (by name) of one teacher: teacher, student and floor on
    ``x``, timed in the same interleaved calls (the teacher and floor once for all), then the ``sweep`` over
    ``sides`` at batch 1 (``make_students`` makes every student from the teacher rebuilt at a side)."""
    floor, refused = None, None
    try:
        floor = floor_model(teacher)
    except InputError as e:  # a teacher `floor_model` cannot swap
        refused = str(e)
        say(f"speed: no floor measured ({refused})")
    rows = forward_speeds(
        teacher, students, x, floor=floor, repeats=cfg.convert.speed_repeats, autocast=autocast
    )
    del floor
    sweeps = _sweep(cfg, x.device, sides, budget_s, make_students, list(students), autocast, refused is None)
    return {
        name: {
            **row,
            "input": list(x.shape[1:]),
            "speedup": row["student_over_teacher"],
            "speedup_range": row.get("student_over_teacher_range"),
            "speedup_withheld": speedup_withheld(row),
            "floor_refused": refused,
            "sweep": sweeps[name],
            **checked_break_even(row, sweeps[name]),
        }
        for name, row in rows.items()
    }


def speedup_withheld(row: Mapping[str, Any]) -> str | None:
    """Why a speed row's student-over-teacher ratio is not claimed (`ratio_contradicts`: a loaded machine),
    with what to do; None where it stands."""
    why = ratio_contradicts(row)
    return None if why is None else f"{why}: {RERUN}"


def checked_break_even(main: dict[str, Any], sweep: dict[str, Any]) -> dict[str, Any]:
    """``break_even`` (the sweep's smallest side where the student beats the teacher) where the measurements
    agree with it, else None and ``break_even_withheld`` saying why: the rounds at that side disagree, or a
    side at least as large (a sweep row, or the main measurement) has the student slower."""
    side = sweep.get("break_even")
    if side is None:
        return {"break_even": None, "break_even_withheld": None}
    rows = sweep.get("rows", [])
    at = next(row for row in rows if row["resolution"] == side)
    why = ratio_contradicts(at)
    if why is None:
        slower = [
            f"{row['resolution']} px{' (the main table, batch ' + str(row['batch']) + ')' if row is main else ''}"
            f" measures {row['student_over_teacher']:.2f}x"
            for row in [*rows, main]
            if row["resolution"] >= side and row["student_over_teacher"] < 1.0
        ]
        if slower:
            why = (
                f"the sweep has the student faster from {side} px ({at['student_over_teacher']:.2f}x), but "
                + ", ".join(slower)
            )
    if why is None:
        return {"break_even": side, "break_even_withheld": None}
    return {"break_even": None, "break_even_withheld": f"{why}; the measurements contradict each other"}


def speed_lines(speed: dict[str, Any]) -> list[str]:
    """What the log says of a student's ``speed`` section."""
    ceiling = ""
    if speed["floor_refused"] is None:  # a floor timed slower than the teacher it is cut from: timing noise
        rerun = "(rerun idle, or with more convert.speed_repeats)"
        ceiling = f"; floor {speed['floor_over_teacher']:.2f}x the teacher" + (
            f", the student reaches {speed['student_over_floor']:.2f} of it"
            if speed["floor_over_teacher"] >= 1 and round(speed["student_over_floor"], 2) <= 1
            else f": the student timed at {speed['student_over_floor']:.2f} of it, faster than a model it "
            f"contains: timing noise {rerun}"
            if speed["floor_over_teacher"] >= 1
            else f": timing noise, no ceiling {rerun}"
        )
    return [
        f"speed: student {speed['student_images_per_s']:.1f} images/s vs teacher "
        f"{speed['teacher_images_per_s']:.1f} images/s (batch {speed['batch']}, {speed['precision']}) -> "
        f"{speedup_text(speed)}{ceiling}",
        _break_even_line(speed),
    ]


def speedup_text(speed: dict[str, Any]) -> str:
    """``1.67x (1.52x-1.80x over 20 rounds)``, or that the speed-up is withheld and why."""
    if speed.get("speedup_withheld"):
        return f"speed-up withheld: {speed['speedup_withheld']}"
    span = speed.get("speedup_range")
    spread = f" ({span[0]:.2f}x-{span[1]:.2f}x over {speed['repeats']} rounds)" if span else ""
    return f"{speed['speedup']:.2f}x{spread}"


def _sweep(
    cfg: TrainConfig,
    device: torch.device,
    sides: list[int],
    budget_s: float | None,
    make_students: Callable[[nn.Module], Mapping[str, nn.Module | InputError]],
    names: list[str],
    autocast: torch.dtype | None,
    with_floor: bool,
) -> dict[str, dict[str, Any]]:
    """`break_even_sweeps` over ``sides``, each teacher rebuilt with random weights (`rebuilt_teacher`)."""
    if not sides or not cfg.teacher.spec:
        off = f"{_SWEEP_KEY} is []" if not sides else "the teacher was passed in, not named by teacher.spec"
        return {name: {"sides": sides, "rows": [], "skipped": [], "off": off} for name in names}

    def build(side: int) -> tuple[nn.Module, dict[str, nn.Module | InputError]]:
        teacher = rebuilt_teacher(cfg, side, device)
        return teacher, dict(make_students(teacher))  # moved to the device by `break_even_sweeps`

    start = time.monotonic()
    sweeps = break_even_sweeps(
        build, sides, names, device=device, autocast=autocast, floor=with_floor, budget_s=budget_s
    )
    seconds = time.monotonic() - start
    return {
        name: {"sides": sides, "budget_s": budget_s, "off": None, **sweep, "seconds": seconds}
        for name, sweep in sweeps.items()
    }


def rebuilt_teacher(cfg: TrainConfig, side: int, device: torch.device) -> nn.Module:
    """``teacher.spec`` built at ``side`` with random weights: speed does not depend on them."""
    t = cfg.teacher
    teacher, _ = load_teacher(
        t.spec,
        arch=t.arch,
        revision=t.revision,
        cache_dir=t.cache_dir,
        img_size=side,
        pretrained=False,
        warn_guessed_stats=False,
    )
    return teacher.to(device=device, dtype=torch.float32).eval()


def _break_even_line(speed: dict[str, Any]) -> str:
    sweep = speed["sweep"]
    if sweep.get("off"):
        return f"speed: no break-even sweep ({sweep['off']})"
    if speed.get("break_even_withheld"):
        return f"speed: break-even withheld: {speed['break_even_withheld']}"
    measured = [row["resolution"] for row in sweep["rows"]]
    if speed["break_even"] is not None:
        return f"speed: break-even at {speed['break_even']} px (sweep over {measured} px, batch 1)"
    top = max(measured, default=None)
    return f"speed: the student is not faster than the teacher up to {top} px (sweep over {measured} px, batch 1)"
