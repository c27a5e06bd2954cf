"""The conversion report's speed: teacher, student and their floor at the run's size, and the break-even size.

At the run's resolution the trained teacher and student are timed beside the floor (`floor_model`: the teacher
whose attention projects but mixes no tokens), so the report says what the resolution allows (floor / teacher,
the ceiling of every efficient attention there) and how much of it the student reaches (student / floor). A
short sweep over larger sides (``convert.speed_sweep``) then finds the smallest one where the student beats the
teacher on the run's device. Speed does not depend on weights, so each side's teacher is the run's teacher
rebuilt there with random weights (`load_teacher`, as its family builds it at another size) and its student is
made from it as the run made its own. The measuring is `attnxfer.train.speed`'s; this module picks the sides
and reads the config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import InputError
from ..models.efficient.floor import floor_model
from ..models.image_input import ImageSizeError, check_image_size, sizes_that_fit
from ..sources.teacher import load_teacher
from ..train.speed import break_even_sweep, forward_speed

__all__ = ["DEFAULT_SWEEP_MULTIPLES", "SWEEP_BUDGET_S", "conversion_speed", "sweep_sides"]

#: The default sweep: the run's side times these (each raised to the next side the family runs at).
DEFAULT_SWEEP_MULTIPLES = (1, 2, 3, 4)
#: The default sweep starts no side that would take it past this many seconds (a 4x side on a large model,
#: on one CPU thread, would take minutes); a listed ``convert.speed_sweep`` runs every side it names.
SWEEP_BUDGET_S = 60.0

_SWEEP_KEY = "convert.speed_sweep"


def sweep_sides(cfg: TrainConfig, teacher: nn.Module, side: int) -> tuple[list[int], float | None]:
    """The sides the break-even sweep measures and its time budget (None: no limit), checked before any work.

    ``convert.speed_sweep`` null: the run's side times `DEFAULT_SWEEP_MULTIPLES`, each raised to the next side
    the teacher's family runs at, within `SWEEP_BUDGET_S`; ``[]``: no sweep; a list: exactly those sides, a
    side the family cannot run at refused here, naming the key and the nearest sides that work."""
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


def _floor_or_why(teacher: nn.Module) -> tuple[nn.Module | None, str | None]:
    """The teacher's floor, or why there is none (a teacher `floor_model` cannot swap)."""
    try:
        return floor_model(teacher), None
    except InputError as e:
        return None, str(e)


def conversion_speed(
    cfg: TrainConfig,
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    *,
    sides: list[int],
    budget_s: float | None,
    make_student: Callable[[nn.Module], nn.Module],
    autocast: torch.dtype | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The report's ``speed`` section: teacher, student and floor on ``x`` (the run's size and
    ``convert.speed_batch_size``; ``speedup`` = student / teacher images/s), ``floor_refused`` (why there is
    no floor, or None), the ``sweep`` over ``sides`` at batch 1 (rows, skipped sides with the reason, or
    ``off`` saying why there is none) and ``break_even``."""
    floor, refused = _floor_or_why(teacher)
    models = {"teacher": teacher, "student": student, **({"floor": floor} if floor is not None else {})}
    if refused:
        log(f"speed: no floor measured ({refused})")
    row = forward_speed(models, x, repeats=cfg.convert.speed_repeats, autocast=autocast)
    del floor, models
    speed = {
        **row,
        "input": list(x.shape[1:]),
        "speedup": row["student_over_teacher"],
        "floor_refused": refused,
    }
    ceiling = (
        f"; floor {row['floor_over_teacher']:.2f}x the teacher, the student reaches "
        f"{row['student_over_floor']:.2f} of it"
        if refused is None
        else ""
    )
    log(
        f"speed: student {row['student_images_per_s']:.1f} images/s vs teacher "
        f"{row['teacher_images_per_s']:.1f} images/s (batch {row['batch']}, {row['precision']}) -> "
        f"{speed['speedup']:.2f}x{ceiling}"
    )
    speed["sweep"] = _sweep(cfg, x.device, sides, budget_s, make_student, autocast, refused is None)
    speed["break_even"] = speed["sweep"].get("break_even")
    log(_break_even_line(speed))
    return speed


def _sweep(
    cfg: TrainConfig,
    device: torch.device,
    sides: list[int],
    budget_s: float | None,
    make_student: Callable[[nn.Module], nn.Module],
    autocast: torch.dtype | None,
    with_floor: bool,
) -> dict[str, Any]:
    """`break_even_sweep` over ``sides``, each teacher rebuilt from ``teacher.spec`` with random weights."""
    if not sides:
        return {"sides": [], "rows": [], "skipped": [], "off": f"{_SWEEP_KEY} is []"}
    spec = cfg.teacher.spec
    if not spec:
        return {
            "sides": sides,
            "rows": [],
            "skipped": [],
            "off": "the teacher was passed in, not named by teacher.spec",
        }
    t = cfg.teacher

    def build(side: int) -> tuple[nn.Module, nn.Module]:
        teacher, _ = load_teacher(
            spec, arch=t.arch, revision=t.revision, cache_dir=t.cache_dir, img_size=side, pretrained=False
        )
        teacher = teacher.to(device=device, dtype=torch.float32).eval()
        return teacher, make_student(teacher).to(device)

    start = time.monotonic()
    sweep = break_even_sweep(
        build, sides, device=device, autocast=autocast, floor=with_floor, budget_s=budget_s
    )
    return {"sides": sides, "budget_s": budget_s, "off": None, **sweep, "seconds": time.monotonic() - start}


def _break_even_line(speed: dict[str, Any]) -> str:
    sweep = speed["sweep"]
    if sweep.get("off"):
        return f"speed: no break-even sweep ({sweep['off']})"
    measured = [row["resolution"] for row in sweep["rows"]]
    if speed["break_even"] is not None:
        return f"speed: break-even at {speed['break_even']} px (sweep over {measured} px, batch 1)"
    top = max(measured) if measured else None
    return f"speed: the student is not faster than the teacher up to {top} px (sweep over {measured} px, batch 1)"
