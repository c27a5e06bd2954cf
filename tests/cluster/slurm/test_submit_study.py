"""`attnxfer submit --command study` on the loopback SLURM cluster: each student data-parallel over the job's
ranks, a preemption (SIGTERM) saving one step for every student, the requeued job going on from it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import QUIET, attnxfer_process
from safetensors.torch import load_file
from test_submit_engine import _ended, _in_process, _job_id, _wait_until

from attnxfer.checkpoints.resume_point import ResumePoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40
STUDY = [
    "data.dataset=synthetic",
    "data.kwargs.length=256",
    "model.kwargs={depth: 2, embed_dim: 48}",
    "model.drop_path_rate=0.0",
    *QUIET,
    "log.every_steps=1",
    "deterministic=true",
    "transfer.ce_path=rows",
    f"schedule.max_steps={STEPS}",
    "checkpoint.every_steps=1000",  # the only mid-run checkpoint is the one the stop saves
    "checkpoint.every_epoch=false",
]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


def test_a_submitted_study_trains_each_student_on_two_ranks_and_survives_a_preemption(
    slurm, tmp_path, tiny_teacher_dir
):
    args = [*STUDY, f"teacher.spec=local-dir:{tiny_teacher_dir}", "--vary", "transfer.mode=copy,distill"]
    one = tmp_path / "one"  # what the job must reproduce: one process on the whole global batch of 16
    assert _in_process("study", f"run_dir={one}", *args, "data.batch_size=16") == 0
    run = tmp_path / "job"
    sub = attnxfer_process(
        "submit",
        "--command",
        "study",
        f"run_dir={run}",
        *args,
        "data.batch_size=8",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "10",
        "--max-requeues",
        "0",
    )
    job_id = _job_id(sub)
    metrics = run / "distill" / "metrics.jsonl"
    _wait_until(
        lambda: metrics.exists() and metrics.read_text().count('"train"') >= 3, "the study did not start"
    )
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    info = _ended(job_id)
    logs = "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", 0)) == 1, (info, logs[-3000:])
    stopped = int(re.search(r"study: stopped by SIGTERM at step (\d+)", logs).group(1))
    assert 3 <= stopped < STEPS and f"resuming every student from step {stopped}" in logs
    for name in ("copy", "distill"):
        state = ResumePoint.find(run / name).state
        assert state["step"] == STEPS and state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1
        got, want = _final(run / name), _final(one / name)
        for k in want:  # the same global batch: equal up to the order of the gradient sums
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
        # evaluation is exact over the ranks: the same images scored, counted once
        last = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()][-1]
        ref = [json.loads(x) for x in (one / name / "metrics.jsonl").read_text().splitlines()][-1]
        assert last["val_count"] == ref["val_count"] and last["val_top1"] == pytest.approx(ref["val_top1"])
