"""A job's preemption signal before submitit's handler is in place. submitit's job process unpickles its task,
whose imports (torch, timm) take seconds, and installs its USR2 handler only then: a USR2 in that window (a
preemption, at any start or restart) would end the job by the signal's default action, unsaved and not requeued.
The first import of this package in that process holds it; the task, once running, sends it again to the
handler submitit installed (`TrainingTask.__call__`), which requeues the job. Importing this module holds it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

_held: list[int] = []
_SUBMITIT_JOB = ("submitit", "core", "_submit.py")  # a job's process: python -m submitit.core._submit FOLDER


def hold_usr2_while_loading() -> None:
    """In submitit's job process on SLURM (``python -m submitit.core._submit``, not a command that submits, nor a
    process the job starts), with USR2 at its default action: hold it until `pass_on_held_usr2`."""
    started_by_submitit = bool(sys.argv) and Path(sys.argv[0]).parts[-3:] == _SUBMITIT_JOB
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not started_by_submitit:
        return
    if signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR2, lambda signum, frame: _held.append(signum))


def pass_on_held_usr2() -> None:
    """Send a USR2 that came while the task loaded again, to the handler in place now (submitit's, which
    requeues the job and ends the process on rank 0), saying so first."""
    if not _held:
        return
    from ...speak import warn  # not at the top: this module is imported before anything else

    _held.clear()
    warn("a preemption signal (USR2) came while the job loaded: requeuing before any work", all_ranks=True)
    os.kill(os.getpid(), signal.SIGUSR2)


hold_usr2_while_loading()  # on import: the package imports this module before anything heavy
