"""Sweeps, dry runs and submission: one job (or one per sweep point) of `TrainingTask`s."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import _make_sbatch_string

from ...checkpoints.atomic_io import atomic_write_json
from ...checkpoints.run_lock import RunDirInUseError
from ...config.study_spec import _folder_name
from ...errors import InputError, UserError
from ...run_layout import SWEEP_RECORD
from ...speak import say
from .monitor import SLURM_ACTIVE_STATES
from .options import (
    RUN_DIR_KEY,
    RunConfig,
    SlurmOptions,
    build_executor,
    check_script_value,
    sbatch_parameters,
)
from .task import TrainingTask


@dataclass(frozen=True)
class SweepPoint:
    overrides: dict[str, Any]
    cfg: Any

    @property
    def run_dir(self) -> str:
        return str(self.cfg.run_dir)


def sweep_points(cfg: RunConfig, sweep: Mapping[str, Sequence[Any]] | None) -> list[SweepPoint]:
    """The cartesian product of ``sweep`` as configs, each with its own run dir under ``cfg.run_dir``."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(
            f"cfg must have a `run_dir` and a `with_overrides(dict)` method, got {type(cfg).__name__}"
        )
    if not str(cfg.run_dir):
        raise InputError("cfg.run_dir is empty: set run_dir=PATH (on a filesystem every node sees)")
    if not sweep:
        return [SweepPoint({}, cfg)]
    if RUN_DIR_KEY in sweep:  # it would be replaced by the point's own folder below
        raise InputError(
            f"--sweep {RUN_DIR_KEY}: each job of a sweep runs in its own folder under {RUN_DIR_KEY} "
            f"(RUN_DIR/000_KEY=VALUE); set {RUN_DIR_KEY}=PATH once and sweep other keys"
        )
    for key, values in sweep.items():
        if isinstance(values, (str, bytes)) or not values:
            raise InputError(f"sweep[{key!r}] must be a non-empty list of values, got {values!r}")
        twice = next((v for i, v in enumerate(values) if str(v) in map(str, values[:i])), None)
        if twice is not None:
            raise InputError(f"--sweep {key} lists {twice!r} twice: each value makes one job")
    keys = list(sweep)
    points = []
    for i, combo in enumerate(itertools.product(*(sweep[k] for k in keys))):
        overrides = dict(zip(keys, combo))
        # each KEY=VALUE named as a study's student is (`[0, 1]` as 0,1; `{}` as nothing); the index keeps it unique
        label = "_".join(_folder_name(f"{k}={v}") for k, v in overrides.items())
        run_dir = str(Path(cfg.run_dir) / f"{i:03d}_{label}")
        points.append(SweepPoint(overrides, cfg.with_overrides({**overrides, RUN_DIR_KEY: run_dir})))
    return points


def default_job_dir(cfg: RunConfig, opts: SlurmOptions) -> Path:
    """``--job-dir``, or ``RUN_DIR/submitit``: its path goes into the sbatch script (logs, command)."""
    folder = Path(opts.job_dir or Path(cfg.run_dir) / "submitit").expanduser().absolute()
    check_script_value("--job-dir" if opts.job_dir else "run_dir (the job dir is RUN_DIR/submitit)", folder)
    return folder


def sbatch_script(opts: SlurmOptions, job_dir: str | Path, array_size: int | None = None) -> str:
    """The sbatch script submitit writes for these options: a dry run must print byte for byte what is
    submitted, so it asks submitit's own (private) writer; pyproject.toml pins submitit's major version."""
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
    describe: Callable[[RunConfig], str] = str,
) -> str:
    """What ``submit(..., dry_run=True)`` prints: the sbatch script and every resolved config, as ``describe``
    writes it (the sections its command reads)."""
    points = sweep_points(cfg, sweep)
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
        lines += [head, f"# run dir: {point.run_dir}", describe(point.cfg)]
    return "\n".join(lines) + "\n"


def submit(
    main_fn: Callable[[Any], Any],
    cfg: RunConfig,
    opts: SlurmOptions,
    sweep: Mapping[str, Sequence[Any]] | None = None,
    dry_run: bool = False,
    describe: Callable[[RunConfig], str] = str,
) -> list[submitit.Job]:
    """Submit ``main_fn(cfg)`` (one job, or a job array over the sweep); ``[]`` on a dry run, which prints
    the sbatch script and configs (as ``describe`` writes them) instead."""
    points = sweep_points(cfg, sweep)
    if dry_run:
        say(render_dry_run(cfg, opts, sweep, describe))
        return []
    job_dir = default_job_dir(cfg, opts)
    if opts.cluster == "slurm":
        refuse_live_jobs(job_dir, cfg.run_dir)
        refuse_more_nodes_than_there_are(opts)
    executor = build_executor(opts, job_dir)
    tasks = [TrainingTask.for_options(main_fn, p.cfg, opts) for p in points]
    record = Path(cfg.run_dir).expanduser().absolute() / SWEEP_RECORD if sweep else None
    with undone_if_refused(job_dir, record), attempt_not_passed_on():
        # the sweep's folder is refused to other commands from now, not once a point has written into it
        if record is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record, {"sweep": {key: list(map(str, vs)) for key, vs in sweep.items()}})
        if len(tasks) == 1:
            jobs = [executor.submit(tasks[0])]
        else:
            with executor.batch():
                jobs = [executor.submit(task) for task in tasks]
    say(describe_jobs(jobs, points, opts))
    return jobs


def refuse_live_jobs(job_dir: Path, run_dir: Any) -> None:
    """Refuse a submission into a job dir whose earlier job SLURM still holds (pending, held, running,
    requeued): both would train the same run, and the one that starts second would stop on its node at the
    run's lock. Jobs are told by the pickles submitit leaves (``JOB[_TASK]_submitted.pkl``), newest first; a
    state SLURM cannot give (no controller: sbatch says so next) refuses nothing."""
    pickles = sorted(job_dir.glob("*_submitted.pkl"), key=lambda p: p.stat().st_mtime, reverse=True)
    # a job's own id (a study's convert stage submitting from inside its job) is none of the earlier ones
    own = {os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_JOB_ID")}
    for job_id in [j for j in dict.fromkeys(p.name.split("_")[0] for p in pickles) if j not in own][:8]:
        try:
            shown = subprocess.run(
                ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return
        states = set(re.findall(r"JobState=(\w+)", shown.stdout)) if shown.returncode == 0 else set()
        if live := sorted(states & (SLURM_ACTIVE_STATES - {"UNKNOWN"})):
            raise RunDirInUseError(
                f"run_dir={run_dir}: job {job_id} of its job dir {job_dir} is {'/'.join(live)} and would train "
                f"the same run: wait for it to end (squeue -j {job_id}), cancel it (scancel {job_id}), or choose "
                "another run_dir"
            )


def refuse_more_nodes_than_there_are(opts: SlurmOptions) -> None:
    """sbatch queues a job of more nodes than its partition has, to wait for ever (PartitionConfig): refused
    here, with the count ``sinfo`` gives (its default partition where ``--partition`` names none). Where sinfo
    cannot tell (no controller, a partition it does not list), sbatch answers."""
    try:
        listed = subprocess.run(
            ["sinfo", "-h", "-a", "-o", "%P %D"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return
    nodes: dict[str, int] = {}
    default = None
    for name, count in (line.split() for line in listed.stdout.splitlines() if len(line.split()) == 2):
        if name.endswith("*"):
            name = default = name[:-1]
        nodes[name] = nodes.get(name, 0) + int(count) if count.isdigit() else nodes.get(name, 0)
    partition = opts.partition or default
    if (
        listed.returncode == 0
        and partition in nodes
        and "," not in partition
        and opts.nodes > nodes[partition]
    ):
        raise InputError(
            f"--nodes {opts.nodes}: partition {partition} has {nodes[partition]} node(s), so the job would wait "
            f"for ever: ask for at most {nodes[partition]}, or a partition of more (sinfo -s lists them)"
        )


@contextlib.contextmanager
def attempt_not_passed_on() -> Iterator[None]:
    """Submit inside this: sbatch (and the local executor's processes) inherit this process's environment,
    and SLURM sets ``SLURM_RESTART_COUNT`` only once it requeues a job, so a job submitted from inside a
    requeued one would start as if requeued that often (`TrainingTask` would count the submitter's restarts as
    its own preemptions, and refuse to run past ``max_preemptions``)."""
    count = os.environ.pop("SLURM_RESTART_COUNT", None)
    try:
        yield
    finally:
        if count is not None:
            os.environ["SLURM_RESTART_COUNT"] = count


class SubmissionRefusedError(UserError):
    """sbatch did not take the job (no controller answers, an invalid partition, account or QOS); nothing was
    submitted and nothing of the attempt is left in the job dir."""


#: (what sbatch's error says, what to do about it), the first match wins
SBATCH_HINTS: tuple[tuple[str, str], ...] = (
    (
        "could not establish a configuration source|unable to contact slurm controller",
        "no SLURM controller answers from this machine: submit from a login node of the cluster (or set "
        "SLURM_CONF to its slurm.conf), or run here with --cluster local",
    ),
    ("account", "`sacctmgr -n show assoc user=$USER format=account` lists the accounts for --account"),
    ("qos", "`sacctmgr -n show assoc user=$USER format=qos` lists the QOS for --qos"),
    ("partition", "`sinfo -s` lists the partitions for --partition"),
)


def sbatch_error(stderr: str) -> str:
    """sbatch's own error text in one line: its fatal line if it has one, else its error lines (joined)."""
    lines = list(dict.fromkeys(line.strip() for line in stderr.splitlines() if line.strip()))
    fatal = [line for line in lines if "fatal:" in line]
    errors = [line for line in lines if "error:" in line]
    return "; ".join(fatal or errors or lines) or "(sbatch said nothing)"


def _refusal(error: Exception, job_dir: Path) -> SubmissionRefusedError:
    text = sbatch_error(str(error))
    hint = next((h for pattern, h in SBATCH_HINTS if re.search(pattern, text, re.IGNORECASE)), None)
    return SubmissionRefusedError(
        f"sbatch refused the job: {text}" + (f" ({hint})" if hint else "") + f". Nothing was submitted and "
        f"nothing of this attempt is left in {job_dir}; once fixed, run the same command again"
    )


@contextlib.contextmanager
def undone_if_refused(job_dir: Path, record: Path | None = None) -> Iterator[None]:
    """Submit inside this: if sbatch refuses, the files submitit wrote for the attempt (the pickled task, the
    sbatch script), ``record`` where the attempt wrote it (a sweep's) and the folders they created
    (RUN_DIR/submitit, RUN_DIR) are removed, and the refusal is a `SubmissionRefusedError` carrying sbatch's
    own words (submitit prints them too: kept out of the output, which holds the one error line)."""
    above = (job_dir, *job_dir.parents, *(record.parents if record else ()))
    created = sorted({p for p in above if not p.exists()}, key=lambda p: -len(p.parts))  # deepest first
    written = record is not None and not record.exists()
    before = set(job_dir.iterdir()) if job_dir.is_dir() else set()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except (FailedJobError, FailedSubmissionError) as e:
        for path in set(job_dir.iterdir()) - before if job_dir.is_dir() else ():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if written:
            record.unlink(missing_ok=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never anything this attempt did not create
        raise _refusal(e, job_dir) from None


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
        if opts.cluster != "debug":  # debug runs in this process, speaking to this terminal: no log files
            lines.append(f"  stdout: {job.paths.stdout}   (rank 0; other ranks: *_<rank>_log.out)")
            lines.append(f"  stderr: {job.paths.stderr}")
    if opts.cluster == "debug":
        return "\n".join([*lines, "runs now, in this process (--cluster debug)"])
    first = jobs[0]
    lines.append(f"follow:  tail -f {first.paths.stdout} {first.paths.stderr}")
    if opts.cluster == "slurm":
        lines.append(f"status:  squeue -j {array_id or first.job_id}")
        lines.append(f"cancel:  scancel {array_id or first.job_id}")
    elif opts.cluster == "local":
        lines.append(f"cancel:  kill {' '.join(j.job_id for j in jobs)}   (local processes)")
    return "\n".join(lines)
