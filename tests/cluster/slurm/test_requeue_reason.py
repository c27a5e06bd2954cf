"""Why SLURM ends a job, read from slurmstepd's lines in its log when the SIGTERM arrives: a requeue or a
preemption is requeued from the saved step, its user's scancel stays cancelled. slurmstepd writes the STEP
line before the signal and the JOB line around it, so on a loaded node the handler can read the log between
the two (the real lines are checked on the loopback cluster in test_submit_engine.py)."""

from __future__ import annotations

import threading
import time

from attnxfer.launch.slurm.task import _why_slurm_ends

NOW = time.strftime("%Y-%m-%dT%H:%M:%S")
STEP = "slurmstepd-node1: error: *** STEP 7.0 ON node1 CANCELLED AT {at}{why} ***\n"
JOB = "slurmstepd-node1: error: *** JOB 7 ON node1 CANCELLED AT {at}{why} ***\n"


def test_a_requeue_is_read_from_its_step_line_before_the_job_line_is_written(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text(STEP.format(at=NOW, why=" DUE TO JOB REQUEUE"))
    assert _why_slurm_ends(log, time.time() - 5) == "JOB REQUEUE"
    log.write_text(log.read_text() + JOB.format(at=NOW, why=" DUE TO JOB REQUEUE"))
    assert _why_slurm_ends(log, time.time() - 5) == "JOB REQUEUE"


def test_a_scancel_read_before_its_job_line_waits_for_it_and_is_a_cancel(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text(STEP.format(at=NOW, why=""))
    late = threading.Timer(0.3, lambda: log.write_text(log.read_text() + JOB.format(at=NOW, why="")))
    late.start()
    try:
        assert _why_slurm_ends(log, time.time() - 5) == ""  # "": its user's scancel, not requeued
    finally:
        late.join()


def test_lines_of_an_earlier_attempt_and_a_missing_log_end_nothing(tmp_path):
    log = tmp_path / "7_0_log.err"
    log.write_text(JOB.format(at="2026-01-31T12:00:00", why=""))  # the scancel of an attempt before this one
    assert _why_slurm_ends(log, time.time()) is None
    assert _why_slurm_ends(tmp_path / "none.err", time.time()) is None
