"""`attnxfer search --array-tasks K`: each generation evaluated as a SLURM job array on the loopback
cluster (see conftest.py) gives the candidates a local run with the same seed gives, also where one task is
preempted mid-run (requeued, it evaluates its batch again)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import submitit
import torch
from helpers import attnxfer_process, tiny_run

from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.launch import cli
from attnxfer.launch.slurm import slurm_job_info

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]


def _task_1_with_submitits_handlers(job_dir: Path) -> tuple[str, int] | None:
    """The id (ARRAY_1) and process id of a running task 1 of a job array in ``job_dir`` once submitit's handlers
    are in place: the loopback cluster's tasks are this machine's processes, and submitit installs them (USR2's
    and SIGTERM's) once the task is unpickled, just before its batch is evaluated. USR2 alone is caught from the
    first import of attnxfer's launcher, while the task still loads (`held_signal`); a SIGTERM then would end
    the task."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            caught = re.search(r"SigCgt:\s*([0-9a-f]+)", (proc / "status").read_text())
        except OSError:  # not ours, or ended meanwhile
            continue
        env = dict(item.partition("=")[::2] for item in environ)
        # the task's python, not the srun that started it (whose command line holds the same words)
        ours = "submitit.core._submit" in argv and str(job_dir) in argv and Path(argv[0]).name != "srun"
        mask = int(caught.group(1), 16) if caught is not None else 0
        handled = all(mask >> (s - 1) & 1 for s in (signal.SIGUSR2, signal.SIGTERM))
        if ours and env.get("SLURM_ARRAY_TASK_ID") == "1" and handled:
            return f"{env['SLURM_ARRAY_JOB_ID']}_1", int(proc.name)
    return None


def _signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits to be delivered to process ``pid`` (stopped: it is handled once it runs on)."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = re.findall(r"(?:SigPnd|ShdPnd):\s*([0-9a-f]+)", status)
    return any(int(mask, 16) >> (signum - 1) & 1 for mask in pending)


def _preempt_task_1(job_dir: Path, how: str, timeout_s: float = 240) -> str:
    """Preempt task 1 of the first job array in ``job_dir`` as it evaluates its batch; its id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _task_1_with_submitits_handlers(job_dir)
        if found is None:
            time.sleep(0.05)
            continue
        task, pid = found
        if how == "scontrol-requeue":  # requeued from outside (an admin, a preempting scheduler): no
            subprocess.run(["scontrol", "requeue", task], check=True)  # checkpoint() call at all
            return task
        # what a cluster sends on preemption well before the time limit (USR2), or a cluster that preempts
        # with SIGTERM alone; the task held still until the signal waits for it, so that it lands mid-batch
        # however long SLURM takes to pass it on (a loaded machine's batch could end first)
        signum = (
            getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}") if how == "signal" else signal.SIGTERM
        )
        os.kill(pid, signal.SIGSTOP)
        try:
            subprocess.run(["scancel", f"--signal={signum.name.removeprefix('SIG')}", task], check=True)
            while not _signal_pending(pid, signum):
                assert time.monotonic() < deadline, f"{signum.name} never reached task {task}"
                time.sleep(0.02)
        finally:
            os.kill(pid, signal.SIGCONT)
        return task
    raise AssertionError(f"no task 1 of a job array in {job_dir} started within {timeout_s} s")


def _search(run: Path, teacher: Path) -> list[str]:
    return [
        "search",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher}",
        *tiny_run(64, 8),
        "search.population=4",
        "search.offspring=3",
        "search.generations=1",
        "search.fit_steps=3",
        "search.fit_batches=2",
        "search.held_out_images=8",
        "search.target_tokens=65",
        "search.speed=flops",  # counted, so both runs select the same survivors
    ]


ARRAY_FLAGS = ("--array-tasks", "2", "--cpus-per-task", "1", "--time", "5", "--wait-timeout", "300")


@pytest.mark.parametrize("preempt", [None, "signal", "sigterm", "scontrol-requeue"])
def test_search_generations_as_job_arrays_match_a_local_run(slurm, tmp_path, tiny_teacher_dir, preempt):
    array = (*_search(tmp_path / "array", tiny_teacher_dir), *ARRAY_FLAGS)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(attnxfer_process, *array)
        if preempt:
            preempted = _preempt_task_1(tmp_path / "array" / "submitit", preempt)
        job = running.result()
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    again = [line for line in job.stdout.splitlines() if "its batch was evaluated again" in line]
    if preempt in ("signal", "scontrol-requeue"):  # requeued once, evaluated from the start: said, and the
        # same results below
        assert int(slurm_job_info(preempted)["Restarts"]) == 1
        assert again == [
            f"search: task {preempted} was preempted and requeued 1 time(s): its batch was evaluated again"
        ]
    else:  # SIGTERM alone: a batch keeps no step to save, so it runs on to its end (were SLURM to kill it
        # after KillWait, its preemption mode would requeue or cancel it): not requeued, the same results
        assert again == [] and (preempt is None or int(slurm_job_info(preempted)["Restarts"]) == 0)
    # one job array per generation, two tasks each, ids ARRAY_0 and ARRAY_1
    arrays = [line for line in job.stdout.splitlines() if "as a job array of 2 task(s)" in line]
    assert len(arrays) == 2 and all("_0, " in line and "_1" in line for line in arrays)
    # the local reference in this process, one torch thread like each array task (--cpus-per-task 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(_search(tmp_path / "local", tiny_teacher_dir)) == 0
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


def test_a_task_preempted_past_max_preemptions_stops_the_search(slurm, tmp_path, tiny_teacher_dir):
    run = tmp_path / "array"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            attnxfer_process, *_search(run, tiny_teacher_dir), *ARRAY_FLAGS, "--max-preemptions", "0"
        )
        preempted = _preempt_task_1(run / "submitit", "signal")
        job = running.result()
    assert job.returncode != 0
    said = job.stdout + job.stderr
    assert "max_preemptions=0 reached" in said, said[-5000:]
    assert "run the same search command to go on from it" in said  # a batch keeps no checkpoint to resubmit
    assert int(slurm_job_info(preempted)["Restarts"]) == 0
