"""Why SLURM ends a job, read from slurmstepd's lines in its log when the SIGTERM arrives: a requeue or a
preemption is requeued from the saved step, its user's scancel stays cancelled. slurmstepd writes a STEP and
a JOB line, in either order and not always both before the handler reads the log on a loaded node (the real
lines are checked on the loopback cluster in test_submit_engine.py)."""

from __future__ import annotations

import os
import shutil
import threading
import time

import torch

from attnxfer.checkpoints.store import CheckpointManager
from attnxfer.checkpoints.verify import MANIFEST_NAME
from attnxfer.config import load_config
from attnxfer.launch.slurm.task import TrainingTask, _why_ending, resumed_on_restart

STEP = "slurmstepd-node1: error: *** STEP 7.0 ON node1 CANCELLED AT {at}{why} ***\n"
JOB = "slurmstepd-node1: error: *** JOB 7 ON node1 CANCELLED AT {at}{why} ***\n"
WEIGHTS = {"model": {"w": torch.zeros(1)}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _append(log, line: str) -> None:
    with open(log, "a") as f:
        f.write(line)


def test_a_requeue_is_read_from_its_step_line_before_the_job_line_is_written(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text(STEP.format(at=_now(), why=" DUE TO JOB REQUEUE"))
    assert _why_ending(log, time.time() - 5) == "JOB REQUEUE"
    _append(log, JOB.format(at=_now(), why=" DUE TO JOB REQUEUE"))
    assert _why_ending(log, time.time() - 5) == "JOB REQUEUE"


def test_a_scancel_is_a_cancel_whichever_line_comes_first(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text(JOB.format(at=_now(), why="") + STEP.format(at=_now(), why=""))
    assert _why_ending(log, time.time() - 5) == ""  # "": its user's scancel, not requeued
    log.write_text(STEP.format(at=_now(), why=""))  # read before its JOB line: waits for it
    late = threading.Timer(0.3, lambda: _append(log, JOB.format(at=_now(), why="")))  # as slurmstepd does
    late.start()
    try:
        assert _why_ending(log, time.time() - 5) == ""
    finally:
        late.join()


def test_lines_of_an_earlier_attempt_and_a_missing_log_end_nothing(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text(JOB.format(at="2026-01-31T12:00:00", why=""))  # the scancel of an attempt before this one
    assert _why_ending(log, time.time()) is None
    assert _why_ending(tmp_path / "none.err", time.time()) is None


def test_a_restart_resumes_the_checkpoints_the_job_saved_whatever_its_first_attempt_started_from(
    tmp_path, monkeypatch
):
    """checkpoint.resume=none (or a PATH) said where the first attempt started: a requeued job that saved goes on
    from its newest checkpoint (auto) rather than starting over and setting its saves aside; before it saved,
    a checkpoint there is an older run's, which none keeps it from."""
    store = CheckpointManager(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    old = store.save(4, WEIGHTS, {})  # an older job's
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    for resume in ("none", str(old)):
        cfg = load_config(None, [f"run_dir={tmp_path}", f"checkpoint.resume={resume}"])
        assert resumed_on_restart(cfg).checkpoint.resume == resume
        ours = store.save(8, WEIGHTS, {})
        assert resumed_on_restart(cfg).checkpoint.resume == "auto"
        shutil.rmtree(ours)


def test_a_restart_trains_with_the_batch_split_its_job_saved_not_the_one_submitted(
    tmp_path, monkeypatch, capsys
):
    """A job submitted with data.batch_size=32 on 2 processes, resuming a run a single process saved, re-split the
    global batch of 32 to 16 a rank and saved with it; its restart (same 2 processes) had been refused for 32.
    Another job's save, and a save in a conversion's stage, leave the submitted split as it is."""
    split = {"config": {"data": {"batch_size": 16}, "optim": {"accum_steps": 1}}}
    cfg = load_config(None, [f"run_dir={tmp_path}", "data.batch_size=32"])
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    CheckpointManager(tmp_path).save(
        67, WEIGHTS, {"config": {"data": {"batch_size": 32}, "optim": {"accum_steps": 1}}}
    )
    monkeypatch.setenv("SLURM_JOB_ID", "10")
    assert resumed_on_restart(cfg) is cfg  # nothing this job saved
    CheckpointManager(tmp_path / "stage2").save(5, WEIGHTS, split)
    assert resumed_on_restart(cfg) is cfg  # a stage's save: its own split
    CheckpointManager(tmp_path).save(100, WEIGHTS, split)
    restarted = resumed_on_restart(cfg)
    assert (restarted.data.batch_size, restarted.optim.accum_steps, restarted.checkpoint.resume) == (
        16,
        1,
        "auto",
    )
    assert (
        "trains with the batch split this job saved step-00000100 with (data.batch_size=16"
        in capsys.readouterr().err
    )


def test_a_restart_tells_its_saves_from_an_older_run_s_whatever_the_file_server_s_clock(
    tmp_path, monkeypatch
):
    """Checkpoint times come from the file server's clock, the submission's from the login node's: apart by a
    skew, they would take an older run's save for the job's own, or the job's own for an older run's."""
    store = CheckpointManager(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    old = store.save(4, WEIGHTS, {})
    os.utime(old / MANIFEST_NAME, (time.time() + 600,) * 2)  # the file server's clock ahead
    task = TrainingTask(
        lambda cfg: cfg.checkpoint.resume,
        load_config(None, [f"run_dir={tmp_path}", "checkpoint.resume=none"]),
    )
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a job submitit runs on SLURM
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a requeued job
    assert task() == "none"
    ours = store.save(8, WEIGHTS, {})
    os.utime(ours / MANIFEST_NAME, (time.time() - 600,) * 2)  # or behind
    assert task() == "auto"
