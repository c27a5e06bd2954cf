"""The conversion report's speed: teacher, student and their floor at the run's size, and the break-even sweep.

No timing is asserted: the rows must be consistent with themselves (images/s from ms and the batch, each ratio
the quotient of its rows), the sweep must run at the sides the config names, and the break-even side must be
what `break_even_resolution` reads off those rows.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_convert_report, tiny_run, tiny_vit

from attnxfer.apps.convert import comparison
from attnxfer.apps.convert.report import _speed_section
from attnxfer.apps.convert.speed import DEFAULT_SWEEP_MULTIPLES, SWEEP_BUDGET_S, speed_lines, sweep_sides
from attnxfer.config import TrainConfig, apply_overrides
from attnxfer.errors import InputError
from attnxfer.launch.cli import main
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.speed import RATIOS, break_even_resolution, forward_speed, speed_against_floor


def _args(run, teacher_dir, *extra):
    return [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher_dir}",
        *tiny_run(32, 16),
        "convert.attention=relu_linear",
        "convert.stage1_steps=0",
        "schedule.epochs=1",
        "schedule.max_steps=1",
        *tiny_convert_report(2, 4),
        *extra,
    ]


def _check_row(row, names):
    """images/s is batch / ms, and each ratio of two measured models is the quotient of their rows."""
    for name in names:
        assert row[f"{name}_images_per_s"] == pytest.approx(1000 * row["batch"] / row[f"{name}_ms"])
    for key, (top, bottom) in RATIOS.items():
        if top in names and bottom in names:
            assert row[key] == pytest.approx(row[f"{top}_images_per_s"] / row[f"{bottom}_images_per_s"])
        else:
            assert key not in row


@pytest.mark.slow  # a whole (short) conversion and a two-side sweep
def test_conversion_report_measures_the_floor_and_the_break_even_sweep(tmp_path, tiny_teacher_dir):
    run = tmp_path / "run"
    assert main(["convert", *_args(run, tiny_teacher_dir, "convert.speed_sweep=[48,32]")]) == 0
    report = json.loads((run / "report.json").read_text())
    speed = report["speed"]
    assert (speed["batch"], speed["input"], speed["resolution"], speed["tokens"]) == (4, [3, 32, 32], 32, 17)
    _check_row(speed, ("teacher", "student", "floor"))
    assert speed["speedup"] == speed["student_over_teacher"] and speed["floor_refused"] is None
    assert {"student_over_floor_cpu", "floor_over_teacher_cpu"} <= set(speed)  # CPU-time ratios on the CPU
    sweep = speed["sweep"]
    assert sweep["off"] is None and sweep["sides"] == [32, 48] and sweep["skipped"] == []
    assert [row["resolution"] for row in sweep["rows"]] == [32, 48]
    assert [row["tokens"] for row in sweep["rows"]] == [17, 37]  # 8 px patches and a class token
    for row in sweep["rows"]:
        assert row["batch"] == 1
        _check_row(row, ("teacher", "student", "floor"))
    # the sweep's break-even side, unless the measurements contradict it (then withheld, saying why)
    assert speed["break_even"] == (
        None if speed["break_even_withheld"] else break_even_resolution(sweep["rows"])
    )
    lo, hi = speed["speedup_range"]
    assert lo <= speed["speedup"] <= hi and speed["speedup_range"] == speed["student_over_teacher_range"]
    md = (run / "report.md").read_text()
    assert f"| floor (ceiling) | {speed['floor_ms']:.2f} | {speed['floor_images_per_s']:.1f} |" in md
    ceiling = (
        f"the student reaches **{speed['student_over_floor']:.2f}** of it"  # unless timed under the teacher
    )
    # unless timed under the teacher, or the student over it (both timing noise)
    assert (ceiling in md) == (
        speed["floor_over_teacher"] >= 1 and round(speed["student_over_floor"], 2) <= 1
    ), md
    assert f"| 48 | 37 | {sweep['rows'][1]['teacher_ms']:.2f} |" in md
    if speed["break_even_withheld"]:
        verdict = f"Break-even: withheld: {speed['break_even_withheld']}."
    elif speed["break_even"]:
        verdict = f"Break-even: **{speed['break_even']} px**"
    else:
        verdict = "Break-even: none found; the student is not faster than the teacher up to 48 px."
    assert verdict in md


def test_a_sweep_side_the_family_cannot_run_at_stops_the_run_before_work(tmp_path, tiny_teacher_dir, capsys):
    run = tmp_path / "run"
    assert main(["convert", *_args(run, tiny_teacher_dir, "convert.speed_sweep=[32,30]")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnxfer convert: error: convert.speed_sweep=30: ")
    assert "24 px and 32 px" in err[0]  # the nearest sides an 8 px patch grid runs at
    assert not (run / "config.yaml").exists() and not (run / "report.json").exists()


def test_default_sweep_is_the_run_side_times_a_few_multiples_and_empty_turns_it_off():
    teacher = tiny_vit(depth=1, img_size=32, plain_timm=True)
    cfg = TrainConfig()
    sides, budget = sweep_sides(cfg, teacher, 32)
    assert sides == [32 * m for m in DEFAULT_SWEEP_MULTIPLES] and budget == SWEEP_BUDGET_S
    # 36 px is no multiple of the 8 px patches: each multiple is raised to the next side that runs
    assert sweep_sides(cfg, teacher, 36)[0] == [40, 72, 112, 144]
    assert sweep_sides(apply_overrides(cfg, {"convert.speed_sweep": []}), teacher, 32) == ([], None)
    listed = apply_overrides(cfg, {"convert.speed_sweep": [64, 32, 64]})
    assert sweep_sides(listed, teacher, 32) == ([32, 64], None)  # every listed side, no budget
    with pytest.raises(InputError, match=r"^convert\.speed_sweep=36: .*32 px and 40 px"):
        sweep_sides(apply_overrides(cfg, {"convert.speed_sweep": [36]}), teacher, 32)


def test_a_report_without_a_floor_says_why_and_keeps_teacher_and_student():
    teacher = tiny_vit(depth=1, plain_timm=True).eval()
    student = build_efficient_student(teacher, "relu_linear")
    row = forward_speed({"teacher": teacher, "student": student}, torch.randn(2, 3, 32, 32), repeats=2)
    _check_row(row, ("teacher", "student"))
    why = "floor_model: a teacher without blocks"
    speed = {**row, "input": [3, 32, 32], "speedup": row["student_over_teacher"], "floor_refused": why}
    speed |= {"sweep": {"sides": [], "rows": [], "skipped": [], "off": "convert.speed_sweep is []"}}
    md = "\n".join(_speed_section({**speed, "threads": 1}))
    assert "cpu (1 thread, " in md, md
    assert f"No floor measured: {why}." in md and "floor (ceiling)" not in md
    assert f"| student | {row['student_ms']:.2f} | {row['student_images_per_s']:.1f} | " in md
    assert "Not measured: convert.speed_sweep is []." in md


def _row(resolution: int, ratio: float, lo: float, hi: float, batch: int = 1) -> dict:
    """A speed row as `forward_speed` writes it, reduced to what the verdicts read."""
    return {
        "resolution": resolution,
        "batch": batch,
        "repeats": 3,
        "student_over_teacher": ratio,
        "student_over_teacher_range": [lo, hi],
    }


def test_a_ratio_carries_its_spread_over_the_rounds_and_one_on_both_sides_of_1_is_not_claimed():
    from attnxfer.train.speed import ratio_contradicts, ratio_range
    from attnxfer.train.timing import Timing

    teacher, student = Timing(times=[2.0, 2.0, 3.0]), Timing(times=[1.0, 2.5, 1.5])
    assert ratio_range(student, teacher) == [0.8, 2.0]  # teacher's seconds over the student's, round by round
    assert ratio_contradicts(_row(32, 1.4, 0.8, 2.0)) == (
        "over 3 interleaved rounds at 32 px the student ran at 0.80x to 2.00x the teacher's speed, on both sides of 1"
    )
    assert ratio_contradicts(_row(32, 1.4, 1.1, 2.0)) is None
    # an end that rounds to 1.00 shows a third digit: "1.00x to 1.45x, on both sides of 1" read as a contradiction
    assert "ran at 0.998x to 1.45x the teacher's speed, on both sides of 1" in ratio_contradicts(
        _row(32, 1.2, 0.998, 1.45)
    )
    assert ratio_contradicts({"resolution": 32, "student_over_teacher": 1.4}) is None  # an older report
    # on one thread, process CPU time counts the work the clock does: a CPU-time ratio across 1 from every
    # round's says the clock counted other programs' time (a loaded machine)
    loaded = {**_row(48, 2.1, 1.33, 2.64), "student_over_teacher_cpu": 0.85, "threads": 1}
    assert ratio_contradicts(loaded) == (
        "over 3 interleaved rounds at 48 px the student ran at 1.33x to 2.64x the teacher's speed by the clock "
        "but 0.85x by process CPU time, on one thread: the other side of 1"
    )
    assert ratio_contradicts({**loaded, "student_over_teacher_cpu": 1.2}) is None  # the same side
    assert ratio_contradicts({**loaded, "threads": 4}) is None  # threads' CPU time adds up: another measure


def test_a_break_even_the_measurements_contradict_is_withheld_with_the_reason():
    from attnxfer.apps.convert.speed import checked_break_even

    def sweep(*rows):
        return {"rows": list(rows), "break_even": break_even_resolution(rows)}

    agreed = sweep(_row(28, 0.9, 0.85, 0.95), _row(56, 1.6, 1.5, 1.7))
    assert checked_break_even(_row(28, 0.9, 0.8, 0.95, batch=64), agreed) == {
        "break_even": 56,
        "break_even_withheld": None,
    }
    # faster at 28 px in the sweep, slower in the main table at 32 px: the "1.67x beside 0.71x"
    main_slower = checked_break_even(_row(32, 0.71, 0.6, 0.8, batch=64), sweep(_row(28, 1.67, 1.5, 1.8)))
    assert main_slower["break_even"] is None
    assert main_slower["break_even_withheld"] == (
        "the sweep has the student faster from 28 px (1.67x), but 32 px (the main table, batch 64) measures "
        "0.71x; the measurements contradict each other"
    )
    straddles = checked_break_even(
        _row(28, 1.2, 1.1, 1.3), sweep(_row(28, 1.1, 0.9, 1.4), _row(56, 1.5, 1.4, 1.6))
    )
    assert straddles["break_even"] is None and "0.90x to 1.40x" in straddles["break_even_withheld"]
    slower_above = checked_break_even(
        _row(28, 1.2, 1.1, 1.3), sweep(_row(28, 1.3, 1.2, 1.4), _row(56, 0.9, 0.8, 0.95))
    )
    assert (
        slower_above["break_even"] is None and "56 px measures 0.90x" in slower_above["break_even_withheld"]
    )


def test_report_shows_each_ratio_with_its_spread_and_withholds_what_contradicts_itself():
    teacher = tiny_vit(depth=1, plain_timm=True).eval()
    student = build_efficient_student(teacher, "relu_linear")
    row = forward_speed({"teacher": teacher, "student": student}, torch.randn(2, 3, 32, 32), repeats=3)
    lo, hi = row["student_over_teacher_range"]
    assert lo <= row["student_over_teacher"] <= hi
    speed = {**row, "input": [3, 32, 32], "speedup": row["student_over_teacher"], "floor_refused": "none"}
    speed |= {
        "speedup_range": [lo, hi],
        "sweep": {"sides": [32], "rows": [row], "skipped": []},
        "break_even": None,
    }
    md = "\n".join(_speed_section(speed))
    assert f"the teacher's speed (each round: {lo:.2f}x to {hi:.2f}x)" in md
    assert (
        f"| student | {row['student_ms']:.2f} | {row['student_images_per_s']:.1f} | {row['student_over_teacher']:.2f} [{lo:.2f}, {hi:.2f}] |"
        in md
    )
    withheld = {
        **speed,
        "speedup_withheld": "over 3 rounds ... on both sides of 1: rerun",
        "break_even_withheld": "it disagrees",
    }
    md = "\n".join(_speed_section(withheld))
    assert (
        "no speed-up is claimed: over 3 rounds ... on both sides of 1: rerun." in md
        and "**" not in md.split("### ")[0]
    )
    assert "Break-even: withheld: it disagrees." in md

    assert speed_lines(speed)[0].endswith(f"-> {speed['speedup']:.2f}x ({lo:.2f}x-{hi:.2f}x over 3 rounds)")
    said = speed_lines(withheld)
    assert said[0].endswith("-> speed-up withheld: over 3 rounds ... on both sides of 1: rerun")
    assert said[1] == "speed: break-even withheld: it disagrees"


def test_a_floor_timed_slower_than_the_teacher_is_not_called_the_ceiling():
    """The floor is the teacher less its token mixing: timed slower than the teacher (a loaded machine), it
    was reported as "the ceiling (0.31x the teacher)" with the student at 2.30 of it."""
    teacher = tiny_vit(depth=1, plain_timm=True).eval()
    student = build_efficient_student(teacher, "relu_linear")
    row = speed_against_floor(teacher, student, torch.randn(2, 3, 32, 32), repeats=2)
    speed = {**row, "input": [3, 32, 32], "speedup": row["student_over_teacher"], "floor_refused": None}
    speed |= {"sweep": {"sides": [], "rows": [], "skipped": [], "off": "convert.speed_sweep is []"}}
    slow = {**speed, "floor_over_teacher": 0.31, "student_over_floor": 2.3}
    md = "\n".join(_speed_section(slow))
    assert "ceiling (0.31x" not in md and "reaches **2.30**" not in md, md
    assert "slower than the teacher" in md and "convert.speed_repeats" in md, md
    said = speed_lines(slow)[0]  # the log says the same as report.md
    assert "reaches 2.30" not in said and said.endswith(
        "floor 0.31x the teacher: timing noise, no ceiling (rerun idle, or with more convert.speed_repeats)"
    ), said
    fast = "\n".join(_speed_section({**speed, "floor_over_teacher": 1.5, "student_over_floor": 0.8}))
    assert "it is the ceiling (1.50x the teacher), and the student reaches **0.80** of it." in fast
    fast_said = speed_lines({**speed, "floor_over_teacher": 1.5, "student_over_floor": 0.8})[0]
    assert "; floor 1.50x the teacher, the student reaches 0.80 of it" in fast_said, fast_said
    # a student timed faster than its floor (a model it contains), in the main table or a sweep row: noise
    over = {**speed, "floor_over_teacher": 1.03, "student_over_floor": 1.11, "break_even": None}
    rows = [
        {**row, "resolution": 64, "tokens": 65, "student_over_floor": 2.08},
        {**row, "resolution": 32, "student_over_floor": 0.9},
    ]
    over["sweep"] = {"sides": [64, 32], "rows": rows, "skipped": [], "off": None}
    md = "\n".join(_speed_section(over))
    assert (
        "reaches **1.11**" not in md and "timed at 1.11 of it, beat a model it contains: timing noise" in md
    )
    assert "- 64 px: the student timed at 2.08 of its floor, faster than a model it contains" in md, md
    assert "- 32 px:" not in md
    said = speed_lines(over)[0]
    assert said.endswith(
        "floor 1.03x the teacher: the student timed at 1.11 of it, faster than a model it contains: "
        "timing noise (rerun idle, or with more convert.speed_repeats)"
    ), said


def test_a_study_comparison_does_not_call_a_floor_timed_slower_than_the_teacher_its_ceiling():
    """conversion_study.md said "no attention is faster" and labelled a floor timed at 0.89x the teacher the
    ceiling, beside its students' reports saying that floor gives no ceiling."""
    speed = {"batch": 2, "input": [3, 32, 32], "tokens": 64, "device": "cpu", "threads": 1, "repeats": 3}
    speed |= {"precision": "fp32", "teacher_ms": 1.0, "teacher_images_per_s": 2000.0, "floor_ms": 1.12}
    slow = {**speed, "floor_images_per_s": 1780.0, "floor_over_teacher": 0.89}
    md = "\n".join(comparison._speed_section({"speed": slow}, []))
    assert "no attention is faster" not in md and "(ceiling)" not in md, md
    assert "slower than the teacher" in md and "convert.speed_repeats" in md, md
    assert "cpu (1 thread, fp32)" in md, md
    fast = {**slow, "floor_ms": 0.5, "floor_over_teacher": 2.0}
    assert "| floor (ceiling) | 0.50 |" in "\n".join(comparison._speed_section({"speed": fast}, []))
