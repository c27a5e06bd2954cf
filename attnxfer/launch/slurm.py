"""Submitting a training ``main(cfg)`` to SLURM (or to this machine) through submitit.

One submitted job runs ``nodes x tasks_per_node`` copies of :class:`TrainingTask`; each joins
the process group from the job's environment (``env://``, no shared init file) and calls the
same ``main(cfg)`` a local run calls. Preemption and time limits: SLURM signals the job
(``USR2``, ``signal_delay_s`` before the limit), submitit runs :meth:`TrainingTask.checkpoint`
on global rank 0, which requeues the same task; the requeued ``main`` resumes from the newest
checkpoint in its run directory. Requeues are bounded (``max_requeues``) and recorded.

``cfg`` is opaque here except for :class:`RunConfig`: a run directory and dotted overrides,
which is all sweeps need (one run directory per point).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import submitit
from submitit.core.utils import DelayedSubmission, UncompletedJobError, pickle_load

from ..errors import InputError
from ..train.distributed import backend_for, barrier, cleanup_distributed, init_distributed
from ..train.stop import StopRequested
from .arguments import CLUSTERS
from .arguments import add_slurm_arguments as add_slurm_arguments  # its home before arguments.py

_logger = logging.getLogger(__name__)

RUN_DIR_KEY = "run_dir"
# sbatch options that submitit itself sets and that would break log collection if overridden
RESERVED_SBATCH_KEYS = frozenset({"output", "error", "open-mode", "array", "signal", "job-name", "wrap"})
# sbatch options that have their own `attnxfer submit` flag: --slurm may not set them behind its back
OWN_FLAG_KEYS = {
    "nodes": "--nodes",
    "ntasks": "--nodes and --tasks-per-node",
    "ntasks-per-node": "--tasks-per-node (or --gpus-per-node: one task per GPU)",
    "gpus": "--gpus-per-node",
    "gpus-per-node": "--gpus-per-node",
    "gpus-per-task": "--gpus-per-node",
    "cpus-per-task": "--cpus-per-task",
    "mem": "--mem",
    "time": "--time",
    "partition": "--partition",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "exclude": "--exclude",
}
# srun options for every job: a rank that dies takes its step down instead of leaving
# the other ranks blocked in a collective until the time limit
DEFAULT_SRUN_ARGS = ("--kill-on-bad-exit=1",)


@runtime_checkable
class RunConfig(Protocol):
    """What ``submit`` needs from a config: where the run lives and dotted overrides for sweeps."""

    run_dir: str

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with dotted keys (``"optim.lr"``, and ``"run_dir"``) set to the given values."""
        ...


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")
_SBATCH_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_MEM_RE = re.compile(r"^\d+(?:[KMGT]B?)?$", re.IGNORECASE)


def parse_time_minutes(value: int | str) -> int:
    """SLURM time limit to whole minutes, in sbatch's ``--time`` formats: ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    The leading field may be any size (``90`` minutes, ``36:00:00``); the fields after it are bounded as
    on a clock (minutes and seconds below 60, hours below 24 after a day count), so ``25:99:99`` is refused
    rather than read as 1601 minutes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        text = str(value).strip()
        m = _TIME_RE.match(text)
        if not m:
            raise InputError(
                f"time must be MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (sbatch --time formats), "
                f"got {value!r}"
            )
        parts = [int(p) for p in m.group("rest").split(":")]
        days = int(m.group("d") or 0)
        if m.group("d") is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            h, mi, s = (parts + [0, 0])[:3]
            bounded = [("hours", h, 24), ("minutes", mi, 60), ("seconds", s, 60)][: len(parts)]
        elif len(parts) == 1:  # minutes
            h, mi, s = 0, parts[0], 0
            bounded = []
        elif len(parts) == 2:  # MM:SS
            h, mi, s = 0, parts[0], parts[1]
            bounded = [("seconds", s, 60)]
        else:
            h, mi, s = parts
            bounded = [("minutes", mi, 60), ("seconds", s, 60)]
        for what, number, limit in bounded:
            if number >= limit:
                raise InputError(f"time {text!r}: {what} must be below {limit}, got {number}")
        minutes = math.ceil((((days * 24 + h) * 60 + mi) * 60 + s) / 60)
    if minutes < 1:
        raise InputError(f"time limit must be at least one minute, got {value!r}")
    return minutes


def check_script_value(flag: str, value: Any) -> None:
    """Refuse a value that would not stay on its own line of the sbatch script.

    sbatch reads ``#SBATCH`` lines only up to the first command: a line break (or any other control
    character) in a value would turn the rest of it into a command and silently drop the options after it.
    """
    text = str(value)
    bad = sorted({repr(c) for c in text if unicodedata.category(c) == "Cc"})
    if bad:
        raise InputError(
            f"{flag} {text!r}: control characters ({', '.join(bad)}) cannot go into an sbatch script"
        )


def check_name_list(flag: str, value: str, what: str) -> None:
    """A comma-separated list of SLURM names (partitions, accounts, QOS, node lists): no blanks inside."""
    check_script_value(flag, value)
    items = _split_top_level(value)
    if any(not item or any(c.isspace() for c in item) for item in items):
        raise InputError(
            f"{flag} {value!r}: {what} have no spaces and no empty items (a list is comma-separated, e.g. a,b)"
        )


def parse_key_values(items: Sequence[str] | None, what: str = "--slurm") -> dict[str, str]:
    """``["KEY=VALUE", ...]`` to a dict; a missing ``=`` or a repeated key is an error."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{what} expects KEY=VALUE, got {item!r}")
        if key in out:
            raise InputError(f"{what} sets {key!r} twice")
        out[key] = value
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and braces: ``[0,1],[2,3]`` -> ``["[0,1]", "[2,3]"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_sweep(items: Sequence[str] | None) -> dict[str, list[str]] | None:
    """``["optim.lr=1e-3,1e-4", "seed=0,1"]`` to ``{"optim.lr": ["1e-3", "1e-4"], "seed": ["0", "1"]}``.

    Values stay strings, exactly like plain ``key=value`` overrides: the config parses them. Commas
    inside brackets belong to the value, so list values sweep too: ``transfer.layers=[0,1],[2,3]``.
    """
    if not items:
        return None
    sweep: dict[str, list[str]] = {}
    for key, values in parse_key_values(items, what="--sweep").items():
        vals = [v.strip() for v in _split_top_level(values)]
        if not vals or any(v == "" for v in vals):
            raise InputError(
                f"--sweep {key}= needs comma-separated values without empty ones, got {values!r}"
            )
        sweep[key] = vals
    return sweep


@dataclass
class SlurmOptions:
    """Resources and behaviour of a submitted job; field names follow ``attnxfer submit`` flags."""

    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU
    tasks_per_node: int | None = None  # only for CPU-only clusters; defaults to gpus_per_node or 1
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, sbatch syntax: "64G", "500M", "0" (all of it)
    time: int | str = 60  # minutes, or [D-]HH:MM:SS
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # anything else sbatch takes (--slurm KEY=VALUE)
    job_dir: str | None = None  # submitit's folder (pickles, logs); default: <run_dir>/submitit
    name: str = "attnxfer"
    array_parallelism: int = 64  # sweep points running at once
    max_requeues: int = 3  # time limits survived before the job gives up (preemptions are not counted)
    max_preemptions: int | None = None  # preemptions survived; None: as many as the cluster sends
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to requeue
    cluster: str = "slurm"  # 'slurm' | 'local' (subprocesses here) | 'debug' (in this process)

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise InputError(f"cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        for name in ("nodes", "array_parallelism"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise InputError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is not None:
            if self.tasks_per_node < 1:
                raise InputError(f"tasks_per_node must be >= 1, got {self.tasks_per_node}")
            if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
                raise InputError(
                    f"one task per GPU: tasks_per_node={self.tasks_per_node} differs from "
                    f"gpus_per_node={self.gpus_per_node}; drop --tasks-per-node (it is for CPU-only clusters)"
                )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise InputError(f"cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if self.max_requeues < 0:
            raise InputError(f"max_requeues must be >= 0, got {self.max_requeues}")
        if self.max_preemptions is not None and self.max_preemptions < 0:
            raise InputError(f"max_preemptions must be >= 0, got {self.max_preemptions}")
        self._check_script_values()
        if self.mem is not None and not _MEM_RE.match(str(self.mem)):
            raise InputError(f"mem must look like sbatch --mem (e.g. 64G, 500M, 0), got {self.mem!r}")
        parse_time_minutes(self.time)
        if self.cluster == "local" and self.nodes > 1:
            raise InputError("cluster='local' runs on this machine only: use nodes=1")
        if self.cluster == "debug" and self.ntasks_per_node * self.nodes > 1:
            raise InputError("cluster='debug' runs one task in this process: use nodes=1 and one task")
        self.extra = {str(k).replace("_", "-"): v for k, v in dict(self.extra).items()}
        for key, value in self.extra.items():
            if not _SBATCH_KEY_RE.match(key):
                raise InputError(
                    f"--slurm {key!r}: not an sbatch option name (letters, digits and dashes, "
                    "e.g. --slurm mail-type=END)"
                )
            check_script_value(f"--slurm {key}=", value)
        clash = sorted(set(self.extra) & RESERVED_SBATCH_KEYS)
        if clash:
            raise InputError(
                f"--slurm cannot set {clash}: submitit manages them (use --name for the job name)"
            )
        for key in self.extra:
            if len(key) == 1:
                raise InputError(f"--slurm {key}=: write sbatch's long option name (e.g. nodes, not N)")
            own = [k for k in OWN_FLAG_KEYS if k == key or (len(key) >= 3 and k.startswith(key))]
            if own:
                raise InputError(
                    f"--slurm {key}= would override {OWN_FLAG_KEYS[own[0]]} behind the job's back "
                    f"(the ranks and the summary follow the flag): use {OWN_FLAG_KEYS[own[0]]}"
                )

    def _check_script_values(self) -> None:
        """Every value that reaches the sbatch script, checked as sbatch would read it (see `check_script_value`)."""
        check_script_value("--name", self.name)
        check_script_value("--time", self.time)
        if self.job_dir is not None:
            check_script_value("--job-dir", self.job_dir)
        for flag, value, what in (
            ("--partition", self.partition, "partition names"),
            ("--account", self.account, "account names"),
            ("--qos", self.qos, "QOS names"),
            ("--exclude", self.exclude, "node names"),
        ):
            if value is not None:
                check_name_list(flag, str(value), what)
        if self.constraint is not None:
            check_script_value("--constraint", self.constraint)
            if not str(self.constraint).strip() or any(c.isspace() for c in str(self.constraint)):
                raise InputError(
                    f"--constraint {self.constraint!r}: node features have no spaces "
                    "(combine them with & or |, e.g. a100&ib)"
                )

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def timeout_min(self) -> int:
        return parse_time_minutes(self.time)


def sbatch_parameters(opts: SlurmOptions) -> dict[str, Any]:
    """The options in submitit's SlurmExecutor vocabulary (the keyword arguments of its sbatch writer)."""
    params: dict[str, Any] = {
        "job_name": opts.name,
        "time": opts.timeout_min,
        "nodes": opts.nodes,
        "ntasks_per_node": opts.ntasks_per_node,
        "signal_delay_s": opts.signal_delay_s,
        "array_parallelism": opts.array_parallelism,
        "srun_args": list(DEFAULT_SRUN_ARGS),
    }
    optional = {
        "gpus_per_node": opts.gpus_per_node or None,
        "cpus_per_task": opts.cpus_per_task,
        "mem": opts.mem,
        "partition": opts.partition,
        "account": opts.account,
        "qos": opts.qos,
        "constraint": opts.constraint,
        "exclude": opts.exclude,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if opts.extra:
        params["additional_parameters"] = dict(opts.extra)
    return params


def build_executor(opts: SlurmOptions, job_dir: str | Path) -> submitit.AutoExecutor:
    """A submitit executor for ``opts.cluster`` (explicit: AutoExecutor alone picks SLURM whenever srun exists)."""
    if opts.cluster == "slurm" and not _has_srun():
        raise RuntimeError(
            "cluster='slurm' but `srun` is not on PATH: submit from a SLURM login node, "
            "or use --cluster local to run on this machine"
        )
    executor = submitit.AutoExecutor(
        folder=str(job_dir),
        cluster=opts.cluster,
        # submitit's own count of timeouts (its guess from the run time) must not end a job that
        # TrainingTask, which tells timeouts from preemptions, requeues: TrainingTask bounds them
        slurm_max_num_timeout=10**6,
        local_max_num_timeout=10**6,
    )
    if opts.cluster == "slurm":
        executor.update_parameters(**{f"slurm_{k}": v for k, v in sbatch_parameters(opts).items()})
    else:
        executor.update_parameters(
            name=opts.name,
            timeout_min=opts.timeout_min,
            nodes=1,
            tasks_per_node=opts.ntasks_per_node,
            gpus_per_node=opts.gpus_per_node,
        )
    return executor


def _has_srun() -> bool:
    from shutil import which

    return which("srun") is not None


# ---------------------------------------------------------------------------------------------
# the submitted callable
# ---------------------------------------------------------------------------------------------
class RequeueLimitReached(RuntimeError):
    """The job timed out more often than ``max_requeues`` (or was preempted more than ``max_preemptions``)."""


# SLURM sends the time-limit signal `signal_delay_s` before the limit, "up to 60 seconds earlier" (sbatch
# --signal): a signal later than limit - delay - this slack is the time limit; an earlier one, a preemption
TIMEOUT_SLACK_S = 90
REQUEUE_CAUSES = ("timeout", "preemption")


class TrainingTask(submitit.helpers.Checkpointable):
    """``main_fn(cfg)`` as a checkpointable submitit task: same main as local runs, resumable.

    Two ways a job stops early, each ending in a requeue and a resume from the run directory
    (``resume: auto``):

    * USR2 (SLURM's ``--signal``, ``signal_delay_s`` before the time limit, or a preemption configured
      to send it): ``checkpoint()`` runs in submitit's signal handler on global rank 0 only; it does no
      collective and saves nothing itself (the run's periodic checkpoints are what resumes). It hands
      back this same task, which submitit pickles and SLURM requeues.
    * SIGTERM (``scancel``, preemption without USR2): the training loop saves at the next step boundary
      and raises `StopRequested`; rank 0 then pickles this task and requeues the job
      (``scontrol requeue``; a job cancelled by its user stays cancelled).

    Timeouts and preemptions are counted apart, as submitit does: a signal close to the time limit
    (see `TIMEOUT_SLACK_S`) is a timeout, bounded by ``max_requeues``; any other signal, and a requeue
    by the scheduler itself (``SLURM_RESTART_COUNT`` beyond ours), is a preemption, unbounded unless
    ``max_preemptions`` is set. Past a bound it raises :class:`RequeueLimitReached` instead, which ends
    the job with that error.
    """

    def __init__(
        self,
        main_fn: Callable[[Any], Any],
        cfg: Any,
        max_requeues: int = 3,
        max_preemptions: int | None = None,
        time_limit_min: int | None = None,
        signal_delay_s: int = 120,
    ) -> None:
        self.main_fn = main_fn
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.max_preemptions = max_preemptions
        self.time_limit_min = time_limit_min  # None: every signal counts as a time limit
        self.signal_delay_s = signal_delay_s
        # requeues this task asked for, by cause; they travel with the pickled task
        self.timeouts = 0
        self.preemptions = 0
        self._started = time.time()

    @property
    def requeues(self) -> int:
        return self.timeouts + self.preemptions

    def __call__(self) -> Any:
        _ensure_job_logging()
        self._started = time.time()
        restarts = self.restart_count()
        if restarts:
            _logger.warning(
                "restart %d of this job (%d time limit(s) of at most %d, %d preemption(s) of at most %s): "
                "main resumes from its run directory",
                restarts,
                self.timeouts,
                self.max_requeues,
                self.all_preemptions(),
                "any" if self.max_preemptions is None else self.max_preemptions,
            )
            self._record_requeue(restarts, event="restarted")
            if self.max_preemptions is not None and self.all_preemptions() > self.max_preemptions:
                # e.g. the scheduler requeued it without asking us
                raise RequeueLimitReached(
                    f"job preempted {self.all_preemptions()} times, more than "
                    f"max_preemptions={self.max_preemptions}; raise --max-preemptions or use another partition"
                )
        _watch_stop_signals()
        info = init_distributed(backend_for(getattr(self.cfg, "device", "auto")))
        try:
            result = self.main_fn(self.cfg)
        except StopRequested as stop:  # SIGTERM: the step is saved; requeue (rank 0), then every rank leaves
            self._requeue_after_stop(stop, info.rank)
        except Exception as e:
            # no cleanup_distributed() here: closing the group would make the other ranks fail
            # before this rank's error is on record; the process exits right after anyway
            if not _STOP_SIGNALLED or isinstance(e, (RequeueLimitReached, UncompletedJobError)):
                raise
            # a peer left for the requeue (or SLURM is killing the job): this error is a consequence,
            # and must not reach the submitter as a failure of the job, which will run again
            _logger.warning(
                "rank %d: %r after a preemption/time-limit signal; exiting without a result", info.rank, e
            )
            raise SystemExit(1) from e
        cleanup_distributed()
        return result

    def restart_count(self) -> int:
        return max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0))

    def all_preemptions(self) -> int:
        """Ours plus the requeues SLURM did without asking this task (preemption in requeue mode, admins)."""
        return self.preemptions + max(0, self.restart_count() - self.requeues)

    def requeue_cause(self) -> str:
        """``"timeout"`` when the signal came within `TIMEOUT_SLACK_S` of ``signal_delay_s`` before the
        time limit (measured from this run's start), else ``"preemption"``."""
        if self.time_limit_min is None:
            return "timeout"
        ran = time.time() - self._started
        return (
            "timeout"
            if ran >= self.time_limit_min * 60 - self.signal_delay_s - TIMEOUT_SLACK_S
            else "preemption"
        )

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        cause = self.requeue_cause()
        if cause == "timeout" and self.timeouts + 1 > self.max_requeues:
            self._record_requeue(self.requeues, event="refused", cause=cause)
            # raised inside the signal handler: the job ends with this error instead of requeuing
            raise RequeueLimitReached(
                f"timed out again after {self.timeouts} requeue(s) at the time limit; "
                f"max_requeues={self.max_requeues} reached, not requeuing (the run dir keeps the last "
                "checkpoint: resubmit to continue, with a longer --time or a higher --max-requeues)"
            )
        limit = self.max_preemptions
        if cause == "preemption" and limit is not None and self.all_preemptions() + 1 > limit:
            self._record_requeue(self.requeues, event="refused", cause=cause)
            raise RequeueLimitReached(
                f"preempted again after {self.all_preemptions()} preemption(s); max_preemptions={limit} "
                "reached, not requeuing (the run dir keeps the last checkpoint: resubmit to continue)"
            )
        if cause == "timeout":
            self.timeouts += 1
        else:
            self.preemptions += 1
        self._record_requeue(self.requeues, event="requeued", cause=cause)
        _logger.warning(
            "requeuing after a %s (%d time limit(s) of at most %d, %d preemption(s)); "
            "main will resume from its newest checkpoint",
            cause,
            self.timeouts,
            self.max_requeues,
            self.all_preemptions(),
        )
        return super().checkpoint(*args, **kwargs)

    def _requeue_after_stop(self, stop: StopRequested, rank: int) -> None:
        """After SIGTERM: rank 0 pickles this task and requeues the job; no rank leaves before that (srun's
        --kill-on-bad-exit would take rank 0 down with the first rank to exit). Always raises."""
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":  # local/debug executor: nothing to requeue
            raise stop
        env = submitit.JobEnvironment()
        refused: RequeueLimitReached | None = None
        if rank == 0:
            try:
                delayed = self.checkpoint()
                delayed.set_timeout(self.time_limit_min or 0, 10**6)  # our own counts bound the requeues
                delayed.dump(env.paths.submitted_pickle)
                done = subprocess.run(
                    ["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60
                )
                if done.returncode == 0:
                    _logger.warning("%s; job %s requeued: it resumes from that step", stop, env.job_id)
                else:  # e.g. cancelled by its user: scancel's SIGTERM must not bring the job back
                    _logger.warning("%s; job %s not requeued: %s", stop, env.job_id, done.stderr.strip())
            except RequeueLimitReached as e:
                refused = e
        with contextlib.suppress(Exception):
            barrier()
        if refused is not None:
            raise refused
        raise SystemExit(stop.exit_code)

    def _record_requeue(self, count: int, event: str, cause: str | None = None) -> None:
        """Append to ``<job_dir>/<job_id>_requeues.json`` (rank 0 only; best effort, never raises)."""
        try:
            env = submitit.JobEnvironment()
            if env.global_rank != 0:
                return
            path = requeue_record_path(env.paths.folder, env.job_id)
            record = json.loads(path.read_text()) if path.exists() else {"job_id": env.job_id, "events": []}
            record.update(
                requeues=count,
                timeouts=self.timeouts,
                preemptions=self.all_preemptions(),
                max_requeues=self.max_requeues,
                max_preemptions=self.max_preemptions,
            )
            entry = {"event": event, "count": count, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if cause:
                entry["cause"] = cause
            record["events"].append(entry)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)
        except Exception as e:  # a report must not break the requeue itself
            _logger.warning("could not record requeue: %s", e)

    def __repr__(self) -> str:
        name = getattr(self.main_fn, "__qualname__", repr(self.main_fn))
        return (
            f"TrainingTask({name}, run_dir={getattr(self.cfg, 'run_dir', '?')!r}, "
            f"max_requeues={self.max_requeues}, max_preemptions={self.max_preemptions})"
        )


_STOP_SIGNALLED = False


def _watch_stop_signals() -> None:
    """Remember SIGTERM and submitit's preemption signal, then let submitit's handlers run as before.

    Only rank 0 requeues; the other ranks see their collectives fail a moment later. Knowing
    that a stop signal came first lets :meth:`TrainingTask.__call__` tell that failure from a real one.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # debug executor: this is the user's own process
        return
    usr = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}", signal.SIGUSR2)
    for signum in {signal.SIGTERM, usr}:
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: Any, previous: Any = previous) -> None:
            global _STOP_SIGNALLED
            _STOP_SIGNALLED = True
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:  # keep the default action (terminate)
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)


def _ensure_job_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def requeue_record_path(job_folder: str | Path, job_id: str) -> Path:
    return Path(job_folder) / f"{job_id}_requeues.json"


def requeue_count(job: submitit.Job) -> int:
    """How many times ``job`` was requeued (0 when it never was)."""
    path = requeue_record_path(job.paths.folder, job.job_id)
    return json.loads(path.read_text())["requeues"] if path.exists() else 0


# ---------------------------------------------------------------------------------------------
# sweeps, dry runs, submission
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    overrides: dict[str, Any]
    cfg: Any

    @property
    def run_dir(self) -> str:
        return str(self.cfg.run_dir)


def _point_name(index: int, overrides: Mapping[str, Any]) -> str:
    label = "_".join(f"{k}={v}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", f"{index:03d}_{label}")


def sweep_points(
    cfg: RunConfig, sweep: Mapping[str, Sequence[Any]] | None, run_dir_key: str = RUN_DIR_KEY
) -> list[SweepPoint]:
    """The cartesian product of ``sweep`` as configs, each with its own run dir under ``cfg.run_dir``."""
    _check_config(cfg)
    if not sweep:
        return [SweepPoint({}, cfg)]
    for key, values in sweep.items():
        if isinstance(values, (str, bytes)) or not values:
            raise InputError(f"sweep[{key!r}] must be a non-empty list of values, got {values!r}")
    keys = list(sweep)
    points = []
    for i, combo in enumerate(itertools.product(*(sweep[k] for k in keys))):
        overrides = dict(zip(keys, combo))
        run_dir = str(Path(cfg.run_dir) / _point_name(i, overrides))
        points.append(SweepPoint(overrides, cfg.with_overrides({**overrides, run_dir_key: run_dir})))
    return points


def _check_config(cfg: Any) -> None:
    if not isinstance(cfg, RunConfig):
        raise TypeError(
            f"cfg must have a `run_dir` and a `with_overrides(dict)` method, got {type(cfg).__name__}"
        )
    if not str(cfg.run_dir):
        raise InputError("cfg.run_dir is empty: set run_dir=PATH (on a filesystem every node sees)")


def default_job_dir(cfg: RunConfig, opts: SlurmOptions) -> Path:
    """``--job-dir``, or ``RUN_DIR/submitit``: its path goes into the sbatch script (logs, command)."""
    folder = Path(opts.job_dir or Path(cfg.run_dir) / "submitit").expanduser().absolute()
    check_script_value("--job-dir" if opts.job_dir else "run_dir (the job dir is RUN_DIR/submitit)", folder)
    return folder


def sbatch_script(opts: SlurmOptions, job_dir: str | Path, array_size: int | None = None) -> str:
    """The sbatch script submitit writes for these options (same writer, same parameters).

    The one private name of submitit this package uses: a dry run must print byte for byte the script
    that submitit submits (tests/slurm/test_slurm_jobs.py compares them), so it asks submitit's own writer;
    pyproject.toml pins submitit's major version for it. Every value reaching it was checked first
    (`SlurmOptions`, `check_script_value`).
    """
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(job_dir).expanduser().absolute()
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = sbatch_parameters(opts)
    if array_size is not None and array_size > 1:
        params["map_count"] = array_size
    return _make_sbatch_string(command=command, folder=folder, **params)


def render_dry_run(
    cfg: RunConfig,
    opts: SlurmOptions,
    sweep: Mapping[str, Sequence[Any]] | None = None,
    run_dir_key: str = RUN_DIR_KEY,
) -> str:
    """What ``submit(..., dry_run=True)`` prints: the sbatch script and every resolved config."""
    points = sweep_points(cfg, sweep, run_dir_key)
    job_dir = default_job_dir(cfg, opts)
    lines = [
        f"# dry run: nothing submitted ({len(points)} job{'s' if len(points) > 1 else ''}, "
        f"{opts.nodes} node(s) x {opts.ntasks_per_node} task(s), cluster={opts.cluster})",
        f"# job dir: {job_dir}",
    ]
    if opts.cluster == "slurm":
        kind = f"job array of {len(points)}" if len(points) > 1 else "job"
        lines += [f"# sbatch script for the {kind}:", sbatch_script(opts, job_dir, len(points)).rstrip()]
    else:
        lines.append(f"# runs on this machine through submitit's {opts.cluster} executor (no sbatch script)")
    for i, point in enumerate(points):
        head = f"# resolved config{f' {i}: ' + str(point.overrides) if point.overrides else ''}"
        lines += [head, f"# run dir: {point.run_dir}", str(point.cfg)]
    return "\n".join(lines) + "\n"


def submit(
    main_fn: Callable[[Any], Any],
    cfg: RunConfig,
    opts: SlurmOptions,
    sweep: Mapping[str, Sequence[Any]] | None = None,
    dry_run: bool = False,
    run_dir_key: str = RUN_DIR_KEY,
    echo: Callable[[str], None] = print,
) -> list[submitit.Job]:
    """Submit ``main_fn(cfg)`` (one job, or a job array over the sweep's cartesian product).

    Prints the job id(s), the log paths and how to follow and cancel them, and returns the
    submitit jobs (``[]`` on a dry run, which prints the sbatch script and configs instead).
    """
    points = sweep_points(cfg, sweep, run_dir_key)
    if dry_run:
        echo(render_dry_run(cfg, opts, sweep, run_dir_key))
        return []
    job_dir = default_job_dir(cfg, opts)
    executor = build_executor(opts, job_dir)
    tasks = [
        TrainingTask(
            main_fn,
            p.cfg,
            max_requeues=opts.max_requeues,
            max_preemptions=opts.max_preemptions,
            time_limit_min=opts.timeout_min,
            signal_delay_s=opts.signal_delay_s,
        )
        for p in points
    ]
    if len(tasks) == 1:
        jobs = [executor.submit(tasks[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    echo(describe_jobs(jobs, points, opts))
    return jobs


def describe_jobs(jobs: Sequence[submitit.Job], points: Sequence[SweepPoint], opts: SlurmOptions) -> str:
    """Job ids, run dirs, log paths, and the commands to follow and cancel them."""
    lines = []
    array_id = jobs[0].job_id.split("_")[0] if len(jobs) > 1 else None
    if array_id:
        lines.append(f"submitted job array {array_id} ({len(jobs)} points, {opts.num_tasks} task(s) each)")
    for job, point in zip(jobs, points):
        lines.append(
            f"job {job.job_id}: run dir {point.run_dir}" + (f"  {point.overrides}" if point.overrides else "")
        )
        lines.append(f"  stdout: {job.paths.stdout}   (rank 0; other ranks: *_<rank>_log.out)")
        lines.append(f"  stderr: {job.paths.stderr}")
    first = jobs[0]
    lines.append(f"follow:  tail -f {first.paths.stdout} {first.paths.stderr}")
    if opts.cluster == "slurm":
        lines.append(f"status:  squeue -j {array_id or first.job_id}")
        lines.append(f"cancel:  scancel {array_id or first.job_id}")
    elif opts.cluster == "local":
        lines.append(f"cancel:  kill {' '.join(j.job_id for j in jobs)}   (local processes)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# waiting
# ---------------------------------------------------------------------------------------------
class JobFailedError(RuntimeError):
    """A rank of a submitted job raised (or the job died); carries the rank's log tail."""

    def __init__(self, message: str, job_id: str, rank: int | None = None, log_path: Path | None = None):
        super().__init__(message)
        self.job_id, self.rank, self.log_path = job_id, rank, log_path
        self.reason = message.splitlines()[0]  # one line for a command line to print

    def summary(self) -> str:
        """One line: the job, the rank, its error message and where its log is."""
        where = f" on rank {self.rank}" if self.rank is not None else ""
        log = f" (log: {self.log_path})" if self.log_path else ""
        return f"job {self.job_id} failed{where}: {self.reason}{log}"


class JobTimeoutError(TimeoutError):
    """``wait`` gave up before the job finished (the job keeps running)."""


SLURM_ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
    "PREEMPTED",
    "RESV_DEL_HOLD",
    "STOPPED",
    "UNKNOWN",
}
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


def slurm_job_state(job_id: str) -> str | None:
    info = slurm_job_info(job_id)
    return None if info is None else info.get("JobState", "UNKNOWN")


def _current_run_start(info: Mapping[str, str] | None) -> float:
    """Epoch start of the job's current run after a requeue (0 when never requeued)."""
    if not info or int(info.get("Restarts", "0") or 0) == 0:
        return 0.0
    try:
        return time.mktime(time.strptime(info.get("StartTime", ""), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _rank_logs(task: submitit.Job, lines: int) -> str:
    parts = []
    for path in (task.paths.stderr, task.paths.stdout):
        parts.append(f"--- last {lines} lines of {path} ---\n{_tail(path, lines)}")
    return "\n".join(parts)


def _task_outcome(task: submitit.Job, not_before: float = 0.0) -> tuple[str, Any] | None:
    """(``"success"``|``"error"``, result or traceback) once the rank wrote its result, else None.

    Results written before ``not_before`` belong to a run that was requeued since: ignored.
    """
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
    """Wait for every job; return each job's per-rank results.

    Raises :class:`JobFailedError` as soon as any rank of any job raised (with that rank's
    traceback and log tail; the rest of that job is cancelled so no rank hangs in a
    collective), or when SLURM ended a job that left no result (killed, out of memory,
    requeue limit...). Raises :class:`JobTimeoutError` after ``timeout`` seconds. Job state
    comes from ``scontrol``, so this works without SLURM accounting (``sacct``).
    """
    job_list = [jobs] if isinstance(jobs, submitit.Job) else list(jobs)
    deadline = None if timeout is None else time.monotonic() + timeout
    results: dict[int, list[Any]] = {}
    ended_since: dict[int, float] = {}
    while True:
        for j, job in enumerate(job_list):
            if j in results:
                continue
            if isinstance(job, submitit.DebugJob):  # in-process: runs now, on this thread
                err = job.exception()
                if err is not None:
                    raise JobFailedError(f"job {job.job_id} failed: {err!r}", job.job_id, 0) from err
                results[j] = job.results()
                continue
            if _is_slurm(job):
                info = slurm_job_info(job.job_id)
                state = "GONE" if info is None else info.get("JobState", "UNKNOWN").split("+")[0]
                if state in SLURM_NOT_READY_STATES:
                    done = None
                else:
                    done = _collect(job, log_lines, not_before=_current_run_start(info))
                ended = state not in SLURM_ACTIVE_STATES
            else:
                done = _collect(job, log_lines)
                state, ended = None, done is None and job.done()
            if done is not None:
                results[j] = done
                continue
            if ended:
                first = ended_since.setdefault(j, time.monotonic())
                if time.monotonic() - first > grace_s:  # ended and still no result: it died
                    state = state or job.state
                    logs = "\n".join(_rank_logs(t, log_lines) for t in _tasks(job))
                    raise JobFailedError(
                        f"job {job.job_id} ended ({state}) without a result from every rank:\n{logs}",
                        job.job_id,
                    )
        if len(results) == len(job_list):
            return [results[j] for j in range(len(job_list))]
        if deadline is not None and time.monotonic() > deadline:
            pending = [job.job_id for j, job in enumerate(job_list) if j not in results]
            raise JobTimeoutError(
                f"jobs {pending} not finished after {timeout:.0f} s; they keep running "
                f"(follow their logs, or scancel {' '.join(pending)})"
            )
        time.sleep(poll_s)


def _last_error_line(traceback_text: str) -> str:
    """``ValueError: what went wrong`` from a formatted traceback (its last non-blank line)."""
    lines = [line.strip() for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _stop_unless_ending(job: submitit.Job, grace_s: float = 20.0, poll_s: float = 0.5) -> None:
    """Cancel a job whose rank failed only if it does not end by itself.

    srun's ``--kill-on-bad-exit`` takes a failed job's step down, and SLURM then records it as FAILED;
    cancelling it first would record CANCELLED and hide the failure from ``sacct``. A job still running
    after ``grace_s`` (ranks stuck in a collective) is cancelled, so no rank waits until its time limit.
    """
    if _is_slurm(job):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            state = slurm_job_state(job.job_id)
            if state is None or state.split("+")[0] not in SLURM_ACTIVE_STATES - {"COMPLETING"}:
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


def _collect(job: submitit.Job, log_lines: int, not_before: float = 0.0) -> list[Any] | None:
    """Every rank's result once all are in; raises for the rank whose error caused the others.

    That is the first error in time that is not a collective failing because a peer left
    (those follow any rank's death).
    """
    tasks = _tasks(job)
    outcomes = [_task_outcome(task, not_before) for task in tasks]
    failed = [rank for rank, o in enumerate(outcomes) if o is not None and o[0] == "error"]
    if failed:

        def cause_first(r: int) -> tuple[bool, float]:
            secondary = bool(_PEER_GONE.search(str(outcomes[r][1])))
            return secondary, tasks[r].paths.result_pickle.stat().st_mtime

        rank = min(failed, key=cause_first)
        _stop_unless_ending(job)
        others = [r for r in failed if r != rank]
        also = f" (then ranks {others}, most likely as a consequence)" if others else ""
        batch_log = (
            ""
            if rank == 0
            # srun reports the exit codes of dead ranks there
            else (
                f"\n--- last 10 lines of {tasks[0].paths.stderr} (rank 0 and srun) ---\n"
                f"{_tail(tasks[0].paths.stderr, 10)}"
            )
        )
        error = JobFailedError(
            f"job {job.job_id} failed on rank {rank} of {job.num_tasks}{also}:\n{outcomes[rank][1]}\n"
            f"{_rank_logs(tasks[rank], log_lines)}{batch_log}",
            job.job_id,
            rank,
            tasks[rank].paths.stderr,
        )
        error.reason = _last_error_line(str(outcomes[rank][1]))
        raise error
    if all(o is not None for o in outcomes):
        return [o[1] for o in outcomes]
    return None


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def options_from_args(ns: argparse.Namespace) -> SlurmOptions:
    names = {f.name for f in fields(SlurmOptions)} - {"extra"}
    kwargs = {name: getattr(ns, name) for name in names if hasattr(ns, name)}
    return SlurmOptions(extra=parse_key_values(getattr(ns, "slurm", None)), **kwargs)


def submit_from_args(
    main_fn: Callable[[Any], Any], cfg: RunConfig, ns: argparse.Namespace, echo: Callable[[str], None] = print
) -> list[submitit.Job]:
    """``attnxfer submit`` in one call: options, sweep, dry run and ``--wait`` from parsed flags."""
    jobs = submit(
        main_fn,
        cfg,
        options_from_args(ns),
        sweep=parse_sweep(getattr(ns, "sweep", None)),
        dry_run=getattr(ns, "dry_run", False),
        echo=echo,
    )
    if jobs and getattr(ns, "wait", False):
        wait(jobs)
    return jobs
