"""The run dir's lock between srun steps of one SLURM job attempt, on the real loopback cluster: a step that
ended (SIGKILLed, its heartbeat still fresh) is taken over at once, because squeue no longer lists it; a step
that runs keeps its lock."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnxfer.launch.slurm import slurm_job_info

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
WAIT_S = 300  # queueing and five python starts on a busy machine; only a failing test waits this long


def test_the_next_srun_takes_over_the_lock_of_an_ended_step_not_of_a_running_one(slurm, tmp_path):
    step = ROOT / "tests/cluster/slurm/lock_step.py"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks=1 --time=5 --output={tmp_path}/job.out
export PYTHONPATH={ROOT}
cd {tmp_path}
srun --overlap -n1 {sys.executable} {step} die run
srun --overlap -n1 {sys.executable} {step} judge run > ended.txt
srun --overlap -n1 {sys.executable} {step} hold run &
while [ ! -e holding ] && kill -0 $! 2>/dev/null; do sleep 0.2; done  # holding, or refused and gone
srun --overlap -n1 {sys.executable} {step} judge run > running.txt
kill %1; wait
""")
    job = subprocess.run(
        ["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    deadline = time.monotonic() + WAIT_S
    while slurm_job_info(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job} still running after {WAIT_S} s"
        time.sleep(0.5)
    log = (tmp_path / "job.out").read_text()
    ended = (tmp_path / "ended.txt").read_text()
    assert (
        f"step {job}.0 has ended (squeue), run on host node-elsewhere" in ended and "took the lock" in ended
    ), log
    running = (tmp_path / "running.txt").read_text()
    assert running.startswith("refused: run is in use by") and f"SLURM job {job}.2 task 0" in running, log
    assert f"scancel {job}.2)" in running  # the step to stop, not this job
