"""The run dir's lock between two SLURM jobs, on the real loopback cluster: the lock of a job that has ended
(SIGKILLed, its heartbeat still fresh, as when its node died) is taken over by a new job at once, because
squeue says the job has ended (and `attnxfer submit` outside any job sees it so); the lock of a job that runs is
kept."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnxfer.checkpoints.run_lock import lock_holder
from attnxfer.launch.slurm import slurm_job_info
from attnxfer.run_layout import LOCK_NAME

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
STEP = ROOT / "tests/cluster/slurm/lock_step.py"
WAIT_S = 300  # queueing and four python starts on a busy machine; only a failing test waits this long


def _sbatch(tmp_path: Path, name: str, what: str, run: str) -> str:
    """Submit a job of one task running ``lock_step.py WHAT RUN`` (its output in NAME.txt); its id."""
    script = tmp_path / f"{name}.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks=1 --time=5 --output={tmp_path}/{name}.out
export PYTHONPATH={ROOT}
cd {tmp_path}
{sys.executable} {STEP} {what} {run} > {name}.txt
""")
    return subprocess.run(
        ["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def _wait_ended(job: str, deadline: float) -> str:
    """Job ``job``'s final state, once SLURM has ended it (its processes gone: not COMPLETING)."""
    while (state := slurm_job_info(job)["JobState"]) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job} still {state} after {WAIT_S} s"
        time.sleep(0.5)
    return state


def test_a_new_job_takes_over_the_lock_of_a_job_that_ended_not_of_a_running_one(slurm, tmp_path):
    deadline = time.monotonic() + WAIT_S
    dead = _sbatch(tmp_path, "dead", "die", "ended")
    assert _wait_ended(dead, deadline) == "FAILED"  # SIGKILLed holding the lock
    # outside any job too (`attnxfer submit` checking the folder before it submits a job): squeue's word
    said = f"SLURM job {dead} has ended (squeue: FAILED), run on host node-elsewhere"
    assert lock_holder(tmp_path / "ended" / LOCK_NAME).why_dead() == said
    after = _sbatch(tmp_path, "after", "judge", "ended")
    holder = _sbatch(tmp_path, "holder", "hold", "running")
    while not (tmp_path / "holding").exists():  # holding, or refused and gone
        assert slurm_job_info(holder)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (
            tmp_path / "holder.out"
        ).read_text()
        assert time.monotonic() < deadline, f"job {holder} holds no lock after {WAIT_S} s"
        time.sleep(0.2)
    beside = _sbatch(tmp_path, "beside", "judge", "running")
    _wait_ended(after, deadline)
    _wait_ended(beside, deadline)
    assert slurm_job_info(holder)["JobState"] == "RUNNING"
    subprocess.run(["scancel", holder], check=True, timeout=60)
    ended = (tmp_path / "after.txt").read_text()
    assert "took the lock" in ended, (tmp_path / "after.out").read_text()
    assert said in ended
    running = (tmp_path / "beside.txt").read_text()
    assert running.startswith("refused: running is in use by"), (tmp_path / "beside.out").read_text()
    assert f"SLURM job {holder}" in running and f"scancel {holder})" in running
