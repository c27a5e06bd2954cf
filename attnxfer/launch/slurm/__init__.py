"""Submitting a training ``main(cfg)`` to SLURM (or to this machine) through submitit: every rank joins the
process group from the job's environment and calls the same ``main(cfg)`` a local run calls; on ``USR2``
before the time limit (or a preemption) the task is requeued and resumes from its run directory's newest
checkpoint. ``cfg`` is opaque here except for `RunConfig` (a run directory and overrides: all sweeps need).
"""

from __future__ import annotations

# first: a job's process imports this package as it unpickles its task, seconds before submitit installs its USR2
# handler; importing held_signal holds the signal from here on (see there)
from . import held_signal as held_signal

# isort: split
from ..arguments import (
    add_slurm_arguments as add_slurm_arguments,
    parse_key_values as parse_key_values,
    parse_sweep as parse_sweep,
)
from .commands import options_from_args as options_from_args, submit_from_args as submit_from_args
from .monitor import (
    SLURM_ACTIVE_STATES as SLURM_ACTIVE_STATES,
    SLURM_NOT_READY_STATES as SLURM_NOT_READY_STATES,
    JobFailedError as JobFailedError,
    JobTimeoutError as JobTimeoutError,
    slurm_job_info as slurm_job_info,
    wait as wait,
)
from .options import (
    DEFAULT_SRUN_ARGS as DEFAULT_SRUN_ARGS,
    OWN_FLAG_KEYS as OWN_FLAG_KEYS,
    RESERVED_SBATCH_KEYS as RESERVED_SBATCH_KEYS,
    RUN_DIR_KEY as RUN_DIR_KEY,
    RunConfig as RunConfig,
    SlurmOptions as SlurmOptions,
    build_executor as build_executor,
    check_name_list as check_name_list,
    check_script_value as check_script_value,
    parse_time_minutes as parse_time_minutes,
    sbatch_parameters as sbatch_parameters,
)
from .submission import (
    SubmissionRefusedError as SubmissionRefusedError,
    SweepPoint as SweepPoint,
    default_job_dir as default_job_dir,
    describe_jobs as describe_jobs,
    render_dry_run as render_dry_run,
    sbatch_error as sbatch_error,
    sbatch_script as sbatch_script,
    submit as submit,
    sweep_points as sweep_points,
    undone_if_refused as undone_if_refused,
)
from .task import (
    TIMEOUT_SLACK_S as TIMEOUT_SLACK_S,
    RequeueLimitReached as RequeueLimitReached,
    TrainingTask as TrainingTask,
    requeue_record_path as requeue_record_path,
)
