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
