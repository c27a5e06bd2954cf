"""What `attnxfer convert` prints is true: a headless (MAE) teacher has no top-1, so no
"teacher val top-1 None" and no "n/a% of the teacher's"; stage 2 says it fine-tunes the converted student
(it is not a from-scratch baseline)."""

from __future__ import annotations

import json

import pytest
from helpers import peaked_teacher
from timm.models import save_for_hf

from attnxfer.apps.reports import conversion_summary, teacher_top1_line
from attnxfer.launch.cli import main


@pytest.fixture(scope="module")
def headless_teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mae_like")
    save_for_hf(peaked_teacher(depth=2, num_classes=0, plain_timm=True), folder, safe_serialization=True)
    return folder


@pytest.mark.slow  # a whole conversion (2 stage-1 steps, 1 stage-2 step)
def test_convert_with_a_headless_teacher_says_what_is_true(tmp_path, headless_teacher_dir, capsys):
    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{headless_teacher_dir}",
        "data.dataset=synthetic",
        "data.kwargs.length=32",
        "data.batch_size=16",
        "convert.attention=hedgehog",
        "convert.stage1_steps=2",
        "schedule.epochs=1",
        "schedule.max_steps=1",
        "transfer.mode=none",
        "transfer.logit_distill=0",
        "model.num_classes=10",  # a new head: the labelled stage 2 (without it, the student stays headless)
        "log.progress=false",
        "log.trackers=[]",
        "convert.agreement_batches=1",
        "convert.speed_repeats=1",
        "convert.speed_batch_size=2",
    ]
    assert main(["convert", *args]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "teacher val top-1: none (the teacher has no classifier head (e.g. an MAE encoder)" in out
    assert "None" not in "\n".join(line for line in lines if "top-1" in line)
    [stage2] = [line for line in lines if line.startswith("stage 2:")]
    assert stage2.startswith(
        "stage 2: fine-tunes the converted student end to end (the teacher's weights after stage 1"
    )
    assert "from-scratch" not in out and "mode=none (no attention transfer)" in stage2
    [done] = [line for line in lines if line.startswith("done:")]
    report = json.loads((run / "report.json").read_text())
    assert report["top1"]["teacher"] is None and report["recovered_pct"] is None
    student = report["student_top1"]
    assert done.startswith(f"done: student top-1 {student:.2f} (the teacher has no classifier head")
    assert "n/a" not in done and "% of the teacher's" not in done
    md = (run / "report.md").read_text()
    assert "| teacher (softmax) | none (no classifier head) |" in md
    assert "Recovered: not defined: the teacher has no classifier head" in md and "—%" not in md


def test_summary_with_a_classifier_teacher_gives_the_share():
    report = {
        "top1": {"teacher": 80.0, "before_stage1": 10.0, "after_stage1": 60.0, "after_stage2": 72.0},
        "student_top1": 72.0,
        "recovered_pct": 90.0,
        "speed": {"speedup": 1.5},
        "run_dir": "runs/x",
    }
    assert conversion_summary(report) == (
        "done: teacher top-1 80.00, student top-1 72.00 (90.00% of the teacher's), speed 1.50x -> runs/x/report.md"
    )
    assert teacher_top1_line(80.0) == "teacher val top-1 80.00"
