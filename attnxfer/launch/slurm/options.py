"""What a submission asks SLURM for (`SlurmOptions`), checked as sbatch reads it, and the executor."""

from __future__ import annotations

import math
import re
import shutil
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import submitit

from ...errors import InputError, UserError
from ..arguments import CLUSTERS, OWN_FLAG_KEYS, PLACEMENT, RESERVED_SBATCH_KEYS, split_top_level

RUN_DIR_KEY = "run_dir"


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


class SlurmUnavailableError(UserError, RuntimeError):
    """``--cluster slurm`` on a machine without SLURM's commands: one line saying where to submit from."""


_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


_SBATCH_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


_MEM_RE = re.compile(r"^\d+(?:[KMGT]B?)?$", re.IGNORECASE)


def parse_time_minutes(value: int | str) -> int:
    """SLURM time limit (sbatch's ``--time`` formats) to whole minutes. The fields after the leading one are
    bounded as on a clock, so ``25:99:99`` is refused rather than read as 1601 minutes."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        text = str(value).strip()
        m = _TIME_RE.match(text)
        if not m:
            raise InputError(
                f"--time must be MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (sbatch --time formats), "
                f"got {value!r}"
            )
        parts = [int(p) for p in m.group("rest").split(":")]
        days = m.group("d")
        # D-HH, D-HH:MM, D-HH:MM:SS; else MM, MM:SS, HH:MM:SS (the leading field unbounded)
        forms = (("minutes",), ("minutes", "seconds"), ("hours", "minutes", "seconds"))
        given = dict(zip(("hours", "minutes", "seconds") if days else forms[len(parts) - 1], parts))
        for what, number in list(given.items())[0 if days else 1 :]:
            limit = 24 if what == "hours" else 60
            if number >= limit:
                raise InputError(f"--time {text!r}: {what} must be below {limit}, got {number}")
        h, mi, s = (given.get(k, 0) for k in ("hours", "minutes", "seconds"))
        minutes = math.ceil((((int(days or 0) * 24 + h) * 60 + mi) * 60 + s) / 60)
    if minutes < 1:
        # sbatch's 0 (no limit) gives the job no time to plan its requeue signal before
        raise InputError(
            f"--time must be at least one minute, got {value!r} (sbatch's 0, no limit, is not taken: give the "
            "longest the partition allows, e.g. --time 2-00:00:00)"
        )
    return minutes


def check_script_value(flag: str, value: Any) -> None:
    """Refuse a value with a line break or other control character: in the sbatch script the rest of it
    would become a command and the ``#SBATCH`` options after it would be silently dropped."""
    text = str(value)
    bad = sorted({repr(c) for c in text if unicodedata.category(c) == "Cc"})
    if bad:
        raise InputError(
            f"{flag} {text!r}: control characters ({', '.join(bad)}) cannot go into an sbatch script"
        )


def check_name_list(flag: str, value: str, what: str) -> None:
    """A comma-separated list of SLURM names (partitions, accounts, QOS, node lists): no blanks inside."""
    check_script_value(flag, value)
    items = split_top_level(value)
    if any(not item or any(c.isspace() for c in item) for item in items):
        raise InputError(
            f"{flag} {value!r}: {what} have no spaces and no empty items (a list is comma-separated, e.g. a,b)"
        )


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
    # anything else sbatch takes (--slurm KEY=VALUE; True: a switch, --slurm exclusive)
    extra: dict[str, str | bool] = field(default_factory=dict)
    job_dir: str | None = None  # submitit's folder (pickles, logs); default: <run_dir>/submitit
    name: str = "attnxfer"
    array_parallelism: int = 64  # sweep points running at once
    max_requeues: int = 3  # time limits survived before the job gives up (preemptions are not counted)
    max_preemptions: int | None = None  # preemptions survived; None: as many as the cluster sends
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to requeue
    cluster: str = "slurm"  # 'slurm' | 'local' (subprocesses here) | 'debug' (in this process)

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise InputError(f"--cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        # the least each count may be (None: not set)
        least = dict(nodes=1, array_parallelism=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1)
        for name, low in {**least, "max_requeues": 0, "max_preemptions": 0}.items():
            value = getattr(self, name)
            if value is not None and int(value) < low:
                raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise InputError(
                f"one task per GPU: --tasks-per-node {self.tasks_per_node} differs from "
                f"--gpus-per-node {self.gpus_per_node}; drop --tasks-per-node (it is for CPU-only clusters)"
            )
        self._check_script_values()
        if self.mem is not None and not _MEM_RE.match(str(self.mem)):
            raise InputError(f"--mem must look like sbatch --mem (e.g. 64G, 500M, 0), got {self.mem!r}")
        if parse_time_minutes(self.time) * 60 <= self.signal_delay_s and self.cluster == "slurm":
            raise InputError(
                f"--time {self.time}: SLURM sends the requeue signal {self.signal_delay_s} s before the time limit, "
                f"so this one would requeue as it starts: give it more than {self.signal_delay_s // 60} minutes"
            )
        if self.cluster == "local" and self.nodes > 1:
            raise InputError("--cluster local runs on this machine only: use --nodes 1")
        if self.cluster == "debug" and self.ntasks_per_node * self.nodes > 1:
            raise InputError("--cluster debug runs one task in this process: use --nodes 1 and one task")
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
            named = " (--name gives the job's name)" if "job-name" in clash else ""
            raise InputError(
                f"--slurm cannot set {', '.join(clash)}: submitit manages {'them' if len(clash) > 1 else 'it'}{named}"
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
        # GPUs asked for by gres: the job still runs one task per --gpus-per-node GPU (or --tasks-per-node)
        entries = str(self.extra.get("gres", "")).split(",")
        gpus = next(filter(None, (re.fullmatch(r"gpu(?::[\w.-]+)?:(\d+)", e.strip()) for e in entries)), None)
        if gpus and int(gpus[1]) != self.ntasks_per_node:
            raise InputError(
                f"--slurm gres={self.extra['gres']} asks for {gpus[1]} GPUs a node, but the job runs "
                f"{self.ntasks_per_node} task(s) a node, one per GPU: the others would sit idle. Use "
                f"--gpus-per-node {gpus[1]} (a GPU type: keep gres and add --tasks-per-node {gpus[1]})"
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
        **{name: getattr(opts, name) for name in PLACEMENT},
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if opts.extra:
        params["additional_parameters"] = dict(opts.extra)
    return params


def build_executor(opts: SlurmOptions, job_dir: str | Path) -> submitit.AutoExecutor:
    """A submitit executor for ``opts.cluster`` (explicit: AutoExecutor alone picks SLURM whenever srun exists)."""
    if opts.cluster == "slurm" and shutil.which("srun") is None:
        raise SlurmUnavailableError(
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
