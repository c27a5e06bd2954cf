"""Waiting for submitted jobs: their SLURM state, the ranks' outcomes and logs, and one-line failures."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import pickle_load

from ...speak import say
from ...train.stop import StopRequested
from ...train.watchdog import SILENCE_LINE


class JobFailedError(RuntimeError):
    """A rank of a submitted job raised (or the job died); carries the rank's log tail."""

    ended = "failed"  # what the job did, as `summary` says it

    def __init__(
        self,
        message: str,
        job_id: str,
        rank: int | None = None,
        log_path: Path | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.job_id, self.rank, self.log_path = job_id, rank, log_path
        self.reason = reason or message.splitlines()[0]  # one line for a command line to print
        #: where the run can resume from, in words (set by whoever knows the job's run dir)
        self.resume_note: str | None = None

    def summary(self) -> str:
        """One line: the job, the rank, its error message, where the run can resume from and where its log is."""
        named = self.rank is None or re.match(rf"(?:\S+ )?rank {self.rank}\b", self.reason)
        where = "" if named else f" on rank {self.rank}"
        resume = f"; {self.resume_note}" if self.resume_note else ""
        log = f" (log: {self.log_path})" if self.log_path else ""
        return f"job {self.job_id} {self.ended}{where}: {self.reason}{resume}{log}"


class JobCancelledError(JobFailedError):
    """The job was cancelled (``scancel``) before every rank wrote its result: no rank failed, and the same
    command resumes the run from its last checkpoint."""

    ended = "was cancelled (scancel)"


class JobPreemptedError(JobCancelledError):
    """Preempted on a cluster that cancels preempted jobs (PreemptMode=CANCEL, whose PREEMPTED is final): as
    a cancellation, the same command resumes the run."""

    ended = "was preempted and not requeued (the cluster ends preempted jobs)"


class JobTimeoutError(TimeoutError):
    """``wait`` gave up before the job finished (the job keeps running)."""


class WaitInterrupted(Exception):
    """Ctrl-C stopped the wait, not the jobs it names (``running``): they go on, and the message says how to
    follow and stop them."""

    def __init__(self, running: Sequence[submitit.Job], cluster: str):
        ids = [job.job_id for job in running]
        slurm = cluster == "slurm"
        follow = f"squeue -j {','.join(ids)}" if slurm else ("its log" if len(ids) == 1 else "their logs")
        stop = f"{'scancel' if slurm else 'kill'} {' '.join(ids)}"
        which = f"job {ids[0]} keeps" if len(ids) == 1 else f"jobs {' '.join(ids)} keep"
        super().__init__(
            f"stopped waiting; {which} running (follow: {follow}; stop {'it' if len(ids) == 1 else 'them'}: "
            f"{stop}, and the same command resumes {'it' if len(ids) == 1 else 'them'})"
        )


# no result on disk can be trusted in these: the job is (re)queued, or its processes are being
# killed and it may be on its way back to the queue
SLURM_NOT_READY_STATES = {
    "PENDING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESV_DEL_HOLD",
}

# a job in these has not ended
SLURM_ACTIVE_STATES = SLURM_NOT_READY_STATES | {
    "RUNNING",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
    "STOPPED",
    "UNKNOWN",
}


def slurm_job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` as a dict (``None`` once the controller forgot the job); needs no accounting."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"JobState": "UNKNOWN"}
    if out.returncode != 0:
        return None if "Invalid job id" in out.stderr else {"JobState": "UNKNOWN"}
    lines = out.stdout.splitlines()
    return dict(re.findall(r"(\w+)=(\S*)", lines[0])) if lines else {"JobState": "UNKNOWN"}


def slurm_job_state(job_id: str) -> str:
    """The job's SLURM state, its first word (RUNNING of RUNNING+...); GONE once the controller forgot it."""
    info = slurm_job_info(job_id)
    return "GONE" if info is None else info.get("JobState", "UNKNOWN").split("+")[0]


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _rank_logs(task: submitit.Job, lines: int) -> str:
    return "\n".join(
        f"--- last {lines} lines of {path} ---\n{_tail(path, lines)}"
        for path in (task.paths.stderr, task.paths.stdout)
    )


def _task_outcome(task: submitit.Job, not_before: float = 0.0) -> tuple[str, Any] | None:
    """(``"success"``|``"error"``, result or traceback) once the rank wrote its result, else None; results
    written before ``not_before`` belong to a run that was requeued since."""
    path = task.paths.result_pickle
    if not path.exists() or path.stat().st_mtime < not_before:
        return None
    # our own job's result file in our job dir (submitit's protocol), not untrusted input
    return pickle_load(path)


def _tasks(job: submitit.Job) -> list[submitit.Job]:
    return [job.task(i) for i in range(job.num_tasks)]


def wait(
    jobs: submitit.Job | Sequence[submitit.Job],
    timeout: float | None = None,
    poll_s: float = 1.0,
    log_lines: int = 40,
    grace_s: float = 15.0,
) -> list[list[Any]]:
    """Each job's per-rank results; `JobFailedError` as soon as any rank raised (the rest of that job is
    cancelled so no rank hangs in a collective) or a job left no result; `StopRequested` for a local or debug
    job a signal stopped at a step boundary (its step saved). Job state comes from ``scontrol``,
    so this works without SLURM accounting (``sacct``)."""
    job_list = [jobs] if isinstance(jobs, submitit.Job) else list(jobs)
    deadline = None if timeout is None else time.monotonic() + timeout
    results: dict[int, list[Any]] = {}
    ended_since: dict[int, float] = {}
    said: set[str] = set()  # pending reasons said (once each: a job array's tasks share theirs)
    while True:
        for j, job in enumerate(job_list):
            if j in results:
                continue
            done, state, ended = _poll(job, log_lines, said)
            if done is not None:
                results[j] = done
            elif ended:
                _stop_if_died(job, state, ended_since.setdefault(j, time.monotonic()), grace_s, log_lines)
        if len(results) == len(job_list):
            return [results[j] for j in range(len(job_list))]
        if deadline is not None and time.monotonic() > deadline:
            pending = [job.job_id for j, job in enumerate(job_list) if j not in results]
            raise JobTimeoutError(
                f"jobs {pending} not finished after {timeout:.0f} s; they keep running "
                f"(follow their logs, or scancel {' '.join(pending)})"
            )
        time.sleep(poll_s)


def _poll(job: submitit.Job, log_lines: int, said: set[str]) -> tuple[list[Any] | None, str | None, bool]:
    """(every rank's results, or None while some are missing; the SLURM state; whether the job has ended)
    now. Raises `JobFailedError` for a rank that raised. A pending job's reason not in ``said`` is said (one
    that never starts, PartitionConfig or BadConstraints, would else be waited for without a word)."""
    if isinstance(job, submitit.DebugJob):  # in-process: runs now, on this thread
        err = job.exception()
        if isinstance(err, StopRequested):  # its step saved: the CLI says so, and how to resume
            raise err
        if err is not None:
            raise JobFailedError(f"job {job.job_id} failed: {err!r}", job.job_id, 0) from err
        return job.results(), None, True
    if not _is_slurm(job):
        done = _collect(job, log_lines)
        ended = done is None and job.done()
        log = _tasks(job)[0].paths.stderr
        stop = StopRequested.said_in(log.read_text(errors="replace")) if ended and log.exists() else None
        if stop is not None:  # stopped by a signal at a step boundary, that step saved (`TrainingTask`)
            raise stop
        return done, None, ended
    info = slurm_job_info(job.job_id)
    state = "GONE" if info is None else info.get("JobState", "UNKNOWN").split("+")[0]
    if state in SLURM_NOT_READY_STATES:
        reason = info.get("Reason", "None")
        if state == "PENDING" and reason not in said | {"None"}:
            said.add(reason)
            say(f"job {job.job_id}: pending, SLURM's reason: {reason}")
        return None, state, False  # not ended: every not-ready state is an active one
    # results count from the epoch start of the job's current run after a requeue (0 when never requeued)
    current_run_start = 0.0
    if info and int(info.get("Restarts", "0") or 0) != 0:
        with contextlib.suppress(ValueError):
            current_run_start = time.mktime(time.strptime(info.get("StartTime", ""), "%Y-%m-%dT%H:%M:%S"))
    done = _collect(job, log_lines, not_before=current_run_start)
    return done, state, state not in SLURM_ACTIVE_STATES


def _stop_if_died(
    job: submitit.Job, state: str | None, ended_at: float, grace_s: float, log_lines: int
) -> None:
    """A job that ended ``grace_s`` ago and still has no result from every rank died (killed, out of memory,
    a requeue limit, a rank's watchdog): `JobFailedError` with every rank's log tail (`JobCancelledError`
    where it was cancelled). Within the grace its results may still be landing on a shared filesystem, unless
    a rank's watchdog ended the job."""
    # a rank's watchdog that ended the job needs no grace: no result is on its way
    if time.monotonic() - ended_at <= grace_s and _watchdog_report(job, "") is None:
        return
    logs = "\n".join(_rank_logs(t, log_lines) for t in _tasks(job))
    ended = f"ended ({state or job.state}) without a result from every rank"
    message = f"job {job.job_id} {ended}:\n{logs}"
    log = _tasks(job)[0].paths.stderr
    # its user's scancel, or a preemption the cluster does not requeue: the ranks' exits are no rank's fault
    if state in ("CANCELLED", "PREEMPTED"):
        ended_by = JobPreemptedError if state == "PREEMPTED" else JobCancelledError
        raise ended_by(message, job.job_id, log_path=log, reason="re-run the same command to resume")
    raise _died(job, message) or JobFailedError(message, job.job_id, log_path=log, reason=f"it {ended}")


def _stop_unless_ending(job: submitit.Job, grace_s: float = 20.0, poll_s: float = 0.5) -> None:
    """Cancel a job whose rank failed only if it is still running after ``grace_s``: srun's
    ``--kill-on-bad-exit`` records it as FAILED, and cancelling first would record CANCELLED instead; a local
    job's controller, interrupted while its ranks end, prints a KeyboardInterrupt traceback to this terminal."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if _is_slurm(job):
            if slurm_job_state(job.job_id) not in SLURM_ACTIVE_STATES - {"COMPLETING"}:
                return
        elif job.done():
            return
        time.sleep(poll_s)
    with contextlib.suppress(Exception):
        job.cancel(check=False)  # the other ranks would wait for this one forever


def _is_slurm(job: submitit.Job) -> bool:
    return isinstance(job, submitit.SlurmJob)


# errors a rank gets because another rank died: reported after the error that caused them
_PEER_GONE = re.compile(
    r"(closed|reset) by peer|remote worker|remote process|DistBackendError", re.IGNORECASE
)


# srun's report of a task that ended badly, in the batch log: "srun: error: node2: task 1: Killed",
# "srun: error: node1: tasks 0-1: Exited with exit code 3"
_SRUN_TASK_END = re.compile(
    r"^srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,-]+): (?P<how>.+)$", re.MULTILINE
)


def _died(job: submitit.Job, message: str) -> JobFailedError | None:
    """The rank that ended a job which left no error of its own, in one line, or None where nothing says:
    a rank's watchdog line (`_watchdog_report`), else srun's first report of a task that ended badly
    (``--kill-on-bad-exit`` then ended the others: their reports follow it). ``message``: the error's
    full text (logs follow)."""
    report = _watchdog_report(job, message)
    if report is not None:
        return report
    tasks = _tasks(job)
    batch_log = tasks[0].paths.stderr
    srun = _SRUN_TASK_END.search(batch_log.read_text(errors="replace")) if batch_log.exists() else None
    if srun is None:
        return None
    first = re.match(r"\d+", srun.group("tasks"))
    rank = int(first.group(0)) if first else None
    return JobFailedError(
        f"{message}\n--- last 10 lines of {batch_log} (srun) ---\n{_tail(batch_log, 10)}",
        job.job_id,
        rank,
        tasks[rank].paths.stderr if rank is not None and rank < len(tasks) else batch_log,
        reason=f"rank {rank} died ({srun.group(0).strip()})" if rank is not None else srun.group(0).strip(),
    )


def _watchdog_report(job: submitit.Job, message: str) -> JobFailedError | None:
    """A rank's watchdog line (`attnxfer.train.watchdog`), which names the peer that stopped answering: the
    rank that printed it ended its own process, and no result will come from the job."""
    for task in _tasks(job):
        path = task.paths.stderr
        line = SILENCE_LINE.search(path.read_text(errors="replace")) if path.exists() else None
        if line:
            named = re.match(r"rank (\d+)", line.group(0))
            return JobFailedError(
                f"{message}\n{_tail(path, 20)}",
                job.job_id,
                int(named.group(1)) if named else None,
                path,
                reason=line.group(0),
            )
    return None


def _collect(job: submitit.Job, log_lines: int, not_before: float = 0.0) -> list[Any] | None:
    """Every rank's result once all are in; raises for the rank whose error caused the others (the first
    in time that is not a collective failing because a peer left)."""
    tasks = _tasks(job)
    outcomes = [_task_outcome(task, not_before) for task in tasks]
    if any(o is not None and o[0] == "error" for o in outcomes):
        _stop_unless_ending(job)
        outcomes = [_task_outcome(task, not_before) for task in tasks]  # the job has ended: every error is in
        failed = [rank for rank, o in enumerate(outcomes) if o is not None and o[0] == "error"]

        def cause_first(r: int) -> tuple[bool, float]:
            secondary = bool(_PEER_GONE.search(str(outcomes[r][1])))
            return secondary, tasks[r].paths.result_pickle.stat().st_mtime

        rank = min(failed, key=cause_first)
        if cause_first(rank)[0]:  # every error is a peer gone: the job's own logs may say which rank died
            died = _died(
                job, f"job {job.job_id}: rank {rank} failed because a peer left:\n{outcomes[rank][1]}"
            )
            if died is not None:
                raise died
        others = [r for r in failed if r != rank]
        also = f" (then ranks {others}, most likely as a consequence)" if others else ""
        batch_log = ""
        if rank != 0:  # srun reports the exit codes of dead ranks in rank 0's log
            first = tasks[0].paths.stderr
            batch_log = f"\n--- last 10 lines of {first} (rank 0 and srun) ---\n{_tail(first, 10)}"
        # `ValueError: what went wrong`: the traceback's last non-blank line; attnxfer's own errors without their
        # module path (`attnxfer.sources.resolve.LocalModelMissing: `), said as the CLI says them
        lines = [line.strip() for line in str(outcomes[rank][1]).strip().splitlines() if line.strip()]
        lines[-1:] = [re.sub(r"^attnxfer(\.\w+)+: ", "", line) for line in lines[-1:]]
        raise JobFailedError(
            f"job {job.job_id} failed on rank {rank} of {job.num_tasks}{also}:\n{outcomes[rank][1]}\n"
            f"{_rank_logs(tasks[rank], log_lines)}{batch_log}",
            job.job_id,
            rank,
            tasks[rank].paths.stderr,
            reason=lines[-1] if lines else "(no message)",
        )
    if all(o is not None for o in outcomes):
        return [o[1] for o in outcomes]
    return None
