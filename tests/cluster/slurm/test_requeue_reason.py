"""Why SLURM ends a job, read from slurmstepd's lines in its log when the SIGTERM arrives: a requeue or a
preemption is requeued from the saved step, its user's scancel stays cancelled. slurmstepd writes a STEP and
a JOB line, in either order and not always both before the handler reads the log on a loaded node (the real
lines are checked on the loopback cluster in test_submit_engine.py)."""

from __future__ import annotations

import threading
import time

from attnxfer.launch.slurm.task import _why_ending

STEP = "slurmstepd-node1: error: *** STEP 7.0 ON node1 CANCELLED AT {at}{why} ***\n"
JOB = "slurmstepd-node1: error: *** JOB 7 ON node1 CANCELLED AT {at}{why} ***\n"


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


def test_a_restart_resumes_the_checkpoints_the_job_saved_whatever_its_first_attempt_started_from(tmp_path):
    """checkpoint.resume=none (or a PATH) said where the first attempt started: a requeued job that saved goes on
    from its newest checkpoint (auto) rather than starting over and setting its saves aside; before it saved,
    a checkpoint there is an older run's, which none keeps it from."""
    import os

    from attnxfer.config import load_config
    from attnxfer.launch.slurm.task import resumed_on_restart

    old = tmp_path / "checkpoints" / "step-00000004"
    old.mkdir(parents=True)
    (old / "MANIFEST.json").write_text("{}")
    os.utime(old / "MANIFEST.json", (time.time() - 60, time.time() - 60))  # an older run's, before submission
    for resume in ("none", str(old)):
        cfg = load_config(None, [f"run_dir={tmp_path}", f"checkpoint.resume={resume}"])
        submitted = time.time() - 30
        assert resumed_on_restart(cfg, submitted).checkpoint.resume == resume
        ours = tmp_path / "checkpoints" / "step-00000008"
        ours.mkdir(exist_ok=True)
        (ours / "MANIFEST.json").write_text("{}")
        assert resumed_on_restart(cfg, submitted).checkpoint.resume == "auto"
        (ours / "MANIFEST.json").unlink()


def test_a_restarted_task_runs_main_with_the_config_that_resumes_its_saves(tmp_path, monkeypatch):
    from attnxfer.config import load_config
    from attnxfer.launch.slurm.task import TrainingTask

    task = TrainingTask(
        lambda cfg: cfg.checkpoint.resume,
        load_config(None, [f"run_dir={tmp_path}", "checkpoint.resume=none"]),
    )
    saved = tmp_path / "checkpoints" / "step-00000008"
    saved.mkdir(parents=True)
    (saved / "MANIFEST.json").write_text("{}")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a requeued job
    assert task() == "auto"
