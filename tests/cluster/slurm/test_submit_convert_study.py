"""`attnxfer submit --command study` of a convert study (``command: convert`` in its YAML) on the loopback SLURM
cluster: the job runs the conversions, not a training study, each stage of each student data-parallel over
the job's ranks."""

from __future__ import annotations

import json

import pytest
from helpers import attnxfer_process, tiny_convert_report, tiny_run
from test_submit_engine import _ended, _job_id

from attnxfer.apps.convert.report import conversion_summary
from attnxfer.checkpoints.resume_point import ResumePoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NAMES = ("hedgehog", "performer")


def test_a_submitted_convert_study_converts_every_student_on_two_ranks(slurm, tmp_path, tiny_teacher_dir):
    yaml = tmp_path / "study.yaml"
    yaml.write_text(
        f"command: convert\nteacher:\n  spec: local-dir:{tiny_teacher_dir}\nstudents:\n"
        "  - name: hedgehog\n    convert.attention: hedgehog\n"
        "  - name: performer\n    convert: {attention: performer, stage1_train: qk}\n"
    )
    run = tmp_path / "job"
    args = [
        *tiny_run(64, 8),
        "convert.stage1_steps=3",
        "schedule.max_steps=2",
        *tiny_convert_report(2, 4),
        "convert.speed_sweep=[]",
    ]
    sub = attnxfer_process(
        "submit",
        "--command",
        "study",
        "-c",
        str(yaml),
        f"run_dir={run}",
        *args,
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "10",
        "--max-requeues",
        "0",
        "--wait",
    )
    info = _ended(_job_id(sub))
    logs = "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))
    assert info["JobState"] == "COMPLETED", (info, logs[-3000:])
    assert (run / "conversion_study.md").is_file() and "hedgehog: stage 1 step 3/3" in logs
    # waited for, it ends as `attnxfer study` of a convert study ends: each student's line, then the study's
    said = [
        f"{name}: {conversion_summary(json.loads((run / name / 'report.json').read_text()))}"
        for name in NAMES
    ]
    assert sub.stdout.splitlines()[-3:] == [*said, f"study -> {run} (study.json, conversion_study.md)"]
    for name in NAMES:
        report = json.loads((run / name / "report.json").read_text())
        assert report["stage1"]["steps"] == 3 and report["stage2"]["steps"] == 2
        state = ResumePoint.find(run / name / "stage2").state
        assert state["step"] == 2 and state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1
