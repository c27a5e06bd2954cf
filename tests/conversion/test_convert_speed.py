"""The conversion report's speed: teacher, student and their floor at the run's size, and the break-even sweep.

No timing is asserted: the rows must be consistent with themselves (images/s from ms and the batch, each ratio
the quotient of its rows), the sweep must run at the sides the config names, and the break-even side must be
what `break_even_resolution` reads off those rows.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_vit

from attnxfer.apps.conversion_speed import DEFAULT_SWEEP_MULTIPLES, SWEEP_BUDGET_S, sweep_sides
from attnxfer.apps.reports import _speed_section
from attnxfer.config import TrainConfig, apply_overrides
from attnxfer.errors import InputError
from attnxfer.launch.cli import main
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.speed import RATIOS, break_even_resolution, forward_speed


def _args(run, teacher_dir, *extra):
    return [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher_dir}",
        "data.dataset=synthetic",
        "data.kwargs.length=32",
        "data.batch_size=16",
        "convert.attention=relu_linear",
        "convert.stage1_steps=0",
        "schedule.epochs=1",
        "schedule.max_steps=1",
        "log.progress=false",
        "log.trackers=[]",
        "convert.agreement_batches=1",
        "convert.speed_repeats=2",
        "convert.speed_batch_size=4",
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
    assert speed["break_even"] == break_even_resolution(sweep["rows"])
    md = (run / "report.md").read_text()
    assert f"| floor (ceiling) | {speed['floor_ms']:.2f} | {speed['floor_images_per_s']:.1f} |" in md
    assert f"the student reaches **{speed['student_over_floor']:.2f}** of it" in md
    assert f"| 48 | 37 | {sweep['rows'][1]['teacher_ms']:.2f} |" in md
    verdict = (
        f"Break-even: **{speed['break_even']} px**"
        if speed["break_even"]
        else "Break-even: none found; the student is not faster than the teacher up to 48 px."
    )
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
    md = "\n".join(_speed_section(speed))
    assert f"No floor measured: {why}." in md and "floor (ceiling)" not in md
    assert f"| student | {row['student_ms']:.2f} | {row['student_images_per_s']:.1f} | " in md
    assert "Not measured: convert.speed_sweep is []." in md
