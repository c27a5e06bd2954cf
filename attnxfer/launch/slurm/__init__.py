"""Submitting a training ``main(cfg)`` to SLURM (or to this machine) through submitit.

One submitted job runs ``nodes x tasks_per_node`` copies of :class:`TrainingTask`; each joins
the process group from the job's environment (``env://``, no shared init file) and calls the
same ``main(cfg)`` a local run calls. Preemption and time limits: SLURM signals the job
(``USR2``, ``signal_delay_s`` before the limit), submitit runs :meth:`TrainingTask.checkpoint`
on global rank 0, which requeues the same task; the requeued ``main`` resumes from the newest
checkpoint in its run directory. Requeues are bounded (``max_requeues``) and recorded.

``cfg`` is opaque here except for :class:`RunConfig`: a run directory and dotted overrides,
which is all sweeps need (one run directory per point).

The package, one module per job: `options` (SlurmOptions, their checks, the executor), `task` (the
submitted `TrainingTask` and its requeues), `submission` (sweeps, dry runs, submit), `monitor` (waiting,
job states, failures in one line), `commands` (``attnxfer submit``'s arguments). Every name is
re-exported here (``from attnxfer.launch.slurm import SlurmOptions, submit, wait``).
"""

from __future__ import annotations

from ..arguments import add_slurm_arguments as add_slurm_arguments  # its home before arguments.py
from .commands import (
    options_from_args,
    submit_from_args,
)
from .monitor import (
    SLURM_ACTIVE_STATES,
    SLURM_NOT_READY_STATES,
    JobFailedError,
    JobTimeoutError,
    slurm_job_info,
    slurm_job_state,
    wait,
)
from .options import (
    DEFAULT_SRUN_ARGS,
    OWN_FLAG_KEYS,
    RESERVED_SBATCH_KEYS,
    RUN_DIR_KEY,
    RunConfig,
    SlurmOptions,
    build_executor,
    check_name_list,
    check_script_value,
    parse_key_values,
    parse_sweep,
    parse_time_minutes,
    sbatch_parameters,
)
from .submission import (
    SubmissionRefusedError,
    SweepPoint,
    default_job_dir,
    describe_jobs,
    render_dry_run,
    sbatch_error,
    sbatch_script,
    submit,
    sweep_points,
    undone_if_refused,
)
from .task import (
    REQUEUE_CAUSES,
    TIMEOUT_SLACK_S,
    RequeueLimitReached,
    TrainingTask,
    requeue_record_path,
)

__all__ = [
    "DEFAULT_SRUN_ARGS",
    "OWN_FLAG_KEYS",
    "REQUEUE_CAUSES",
    "RESERVED_SBATCH_KEYS",
    "RUN_DIR_KEY",
    "SLURM_ACTIVE_STATES",
    "SLURM_NOT_READY_STATES",
    "TIMEOUT_SLACK_S",
    "JobFailedError",
    "JobTimeoutError",
    "RequeueLimitReached",
    "RunConfig",
    "SlurmOptions",
    "SubmissionRefusedError",
    "SweepPoint",
    "TrainingTask",
    "add_slurm_arguments",
    "build_executor",
    "check_name_list",
    "check_script_value",
    "default_job_dir",
    "describe_jobs",
    "options_from_args",
    "parse_key_values",
    "parse_sweep",
    "parse_time_minutes",
    "render_dry_run",
    "requeue_record_path",
    "sbatch_error",
    "sbatch_parameters",
    "sbatch_script",
    "slurm_job_info",
    "slurm_job_state",
    "submit",
    "submit_from_args",
    "sweep_points",
    "undone_if_refused",
    "wait",
]
