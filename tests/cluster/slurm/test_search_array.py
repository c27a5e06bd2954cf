"""`attnxfer search --array-tasks K`: each generation evaluated as a SLURM job array on the loopback
cluster (see conftest.py) gives the candidates a local run with the same seed gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import attnxfer_process

from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.launch import cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]


def test_search_generations_as_job_arrays_match_a_local_run(slurm, tmp_path, tiny_teacher_dir):
    teacher = tiny_teacher_dir

    def args(run):
        return [
            "search",
            f"run_dir={run}",
            f"teacher.spec=local-dir:{teacher}",
            "data.dataset=synthetic",
            "data.kwargs.length=64",
            "data.batch_size=8",
            "search.population=4",
            "search.offspring=3",
            "search.generations=1",
            "search.fit_steps=3",
            "search.fit_batches=2",
            "search.held_out_images=8",
            "search.target_tokens=65",
            "search.speed=flops",  # counted, so both runs select the same survivors
            "log.progress=false",
        ]

    job = attnxfer_process(
        *args(tmp_path / "array"),
        "--array-tasks",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--wait-timeout",
        "300",
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    # one job array per generation, two tasks each, ids ARRAY_0 and ARRAY_1
    arrays = [line for line in job.stdout.splitlines() if "as a job array of 2 task(s)" in line]
    assert len(arrays) == 2 and all("_0, " in line and "_1" in line for line in arrays)
    # the local reference in this process, one torch thread like each array task (--cpus-per-task 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(args(tmp_path / "local")) == 0
    finally:
        torch.set_num_threads(threads)

    a, b = _rows(tmp_path / "array"), _rows(tmp_path / "local")
    assert [r["formula"] for r in a] == [r["formula"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["status"] == y["status"] and x.get("reason") == y.get("reason")
        if x["status"] == "ok":
            assert x["kl"] == pytest.approx(y["kl"], rel=1e-5)
            assert x["kl_per_layer"] == pytest.approx(y["kl_per_layer"], rel=1e-5)
            assert x["flops"] == y["flops"] and x["speed"] == y["speed"]
    sa, sb = (ResumePoint.find(tmp_path / r).state["state"] for r in ("array", "local"))  # newest generation
    assert sa["population"] == sb["population"]
    logs = list((tmp_path / "array" / "submitit").glob("*_log.out"))
    assert len(logs) == 4  # 2 generations x 2 tasks
