"""`attnxfer search --array-tasks K`: each generation's new candidates evaluated as a SLURM job array of K
contiguous batches, through the same executor, `TrainingTask` and `wait` as `attnxfer submit`; the search itself
runs where the command runs. Stage 1 starts from the same seed in every task, so a result does not depend on its
task, nor on how often it ran: a preempted task is requeued (up to --max-preemptions) and evaluates its batch again.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..apps.search import evaluate_batch
from ..speak import say
from .arguments import PLACEMENT
from .slurm import (
    SlurmOptions,
    TrainingTask,
    build_executor,
    parse_key_values,
    slurm_job_info,
    undone_if_refused,
    wait,
)
from .slurm.submission import attempt_not_passed_on


class BatchTask(TrainingTask):
    """One array task's batch, requeued after a preemption as a run's job is; it keeps no checkpoint, so a
    requeue evaluates the whole batch again, and the search itself resumes from its last saved generation. A
    SIGTERM alone stops nothing (its fits keep no step to save): the batch runs on to its end."""

    on_restart = "its batch is evaluated again from the start"
    on_requeue = "its batch will be evaluated again from the start"
    past_bound = "the search keeps its last generation: run the same search command to go on from it"
    more_time = "a longer --time for the array's tasks"


def split_batches(names: list[str], tasks: int) -> list[list[str]]:
    """``names`` in at most ``tasks`` contiguous batches of near-equal size (none empty)."""
    tasks = max(1, min(tasks, len(names)))
    size, extra = divmod(len(names), tasks)
    bounds = [i * size + min(i, extra) for i in range(tasks + 1)]
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def array_evaluator(cfg: Any, ns: argparse.Namespace) -> Callable[[list[str]], list[dict[str, Any]]]:
    """``evaluate(names)`` that runs one job array per call (one generation) and returns results in order."""
    opts = SlurmOptions(
        cluster=ns.cluster or "slurm",
        **{name: getattr(ns, name) for name in PLACEMENT},
        time=ns.time or "60",
        gpus_per_node=ns.gpus_per_node,
        cpus_per_task=ns.cpus_per_task,
        mem=ns.mem,
        extra=parse_key_values(ns.slurm),
        name="attnxfer-search",
        max_requeues=0,  # a batch starts again from scratch: one that ran out of time would run out again
        max_preemptions=ns.max_preemptions,
    )
    job_dir = Path(ns.job_dir or Path(cfg.run_dir) / "submitit")
    executor = build_executor(opts, job_dir)

    def evaluate(names: list[str]) -> list[dict[str, Any]]:
        if not names:
            return []
        batches = split_batches(names, ns.array_tasks)
        tasks = [
            BatchTask.for_options(functools.partial(evaluate_batch, names=batch), cfg, opts)
            for batch in batches
        ]
        # sbatch's refusal: one line
        with undone_if_refused(job_dir.expanduser().absolute()), attempt_not_passed_on(), executor.batch():
            jobs = [executor.submit(task) for task in tasks]
        say(
            f"search: {len(names)} candidates as a job array of {len(jobs)} task(s): "
            f"{', '.join(str(j.job_id) for j in jobs)}"
        )
        results = wait(jobs, timeout=ns.wait_timeout)
        for job in jobs:
            # SLURM's count of the task's requeues (none on this machine): each a preemption
            info = slurm_job_info(job.job_id) if opts.cluster == "slurm" else None
            restarts = int((info or {}).get("Restarts", "0") or 0)
            if restarts:
                say(
                    f"search: task {job.job_id} was preempted and requeued {restarts} time(s): its batch was "
                    "evaluated again"
                )
        return [result for per_rank in results for result in per_rank[0]]

    return evaluate
