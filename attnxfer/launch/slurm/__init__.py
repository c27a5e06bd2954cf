"""Submitting a training ``main(cfg)`` to SLURM (or to this machine) through submitit: every rank joins the
process group from the job's environment and calls the same ``main(cfg)`` a local run calls; on ``USR2``
before the time limit (or a preemption) the task is requeued and resumes from its run directory's newest
checkpoint. ``cfg`` is opaque here except for `RunConfig` (a run directory and overrides: all sweeps need).
"""

from __future__ import annotations

from ..arguments import add_slurm_arguments, parse_key_values, parse_sweep
from .commands import options_from_args, submit_from_args
from .monitor import (
    SLURM_ACTIVE_STATES,
    SLURM_NOT_READY_STATES,
    JobFailedError,
    JobTimeoutError,
    slurm_job_info,
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
    "submit",
    "submit_from_args",
    "sweep_points",
    "undone_if_refused",
    "wait",
]
