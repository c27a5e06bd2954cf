"""`attnxfer submit`'s arguments as options and a submission."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import submitit

from ...checkpoints.run_lock import last_checkpoint_note
from ..arguments import parse_key_values, parse_sweep
from .monitor import SLURM_ACTIVE_STATES, JobFailedError, WaitInterrupted, slurm_job_state, wait
from .options import RunConfig, SlurmOptions
from .submission import submit, sweep_points


def options_from_args(ns: argparse.Namespace) -> SlurmOptions:
    names = {f.name for f in fields(SlurmOptions)} - {"extra"}
    kwargs = {name: getattr(ns, name) for name in names if hasattr(ns, name)}
    return SlurmOptions(extra=parse_key_values(getattr(ns, "slurm", None)), **kwargs)


def submit_from_args(
    main_fn: Callable[[Any], Any],
    cfg: RunConfig,
    ns: argparse.Namespace,
    describe: Callable[[RunConfig], str] = str,
) -> list[Any]:
    """``attnxfer submit`` in one call: options, sweep, dry run (its configs as ``describe`` writes them) and
    ``--wait`` from parsed flags. Returns each job's result (its rank 0's) where it was waited for, else
    nothing. A job that fails under ``--wait`` raises `JobFailedError`, which says where its run can resume
    from."""
    sweep = parse_sweep(getattr(ns, "sweep", None))
    options = options_from_args(ns)
    jobs = submit(main_fn, cfg, options, sweep, dry_run=getattr(ns, "dry_run", False), describe=describe)
    # submitit's debug executor runs a job only when its result is asked for: without this, nothing ran
    if not jobs or not (getattr(ns, "wait", False) or options.cluster == "debug"):
        return []
    try:
        return [ranks[0] for ranks in wait(jobs)]
    except KeyboardInterrupt:
        if options.cluster == "debug":  # the job ran in this process and stopped with it
            raise
        # Ctrl-C reaches no SLURM job, nor a local one signalled apart from its terminal; a local job that the
        # terminal's Ctrl-C reached too is ended by its controller within seconds
        deadline = time.monotonic() + 5
        while True:
            running = [
                job
                for job in jobs
                if (
                    slurm_job_state(job.job_id) in SLURM_ACTIVE_STATES
                    if isinstance(job, submitit.SlurmJob)
                    else not job.done()
                )
            ]
            if options.cluster == "slurm" or not running or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not running:  # every job ended with this command: the CLI says where its run resumes
            raise
        raise WaitInterrupted(running, options.cluster) from None
    except JobFailedError as e:
        run_dirs = {job.job_id: point.run_dir for job, point in zip(jobs, sweep_points(cfg, sweep))}
        if e.job_id in run_dirs:
            e.resume_note = last_checkpoint_note(run_dirs[e.job_id])
        raise
