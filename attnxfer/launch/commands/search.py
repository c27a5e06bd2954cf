"""``attnxfer search``: discover a formula attention for a teacher (evolution, fit against speed)."""

from __future__ import annotations

import argparse

from ...errors import InputError
from ...speak import say
from ..arguments import PLACEMENT, add_array_arguments
from .base import add_config_args, load, register_command


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    add_array_arguments(p)


@register_command(
    "search",
    help="discover an efficient formula attention for a teacher (evolutionary, fit vs speed Pareto front)",
    description="Evolutionary search over formula attentions (the search section), seeded with the "
    "hand-designed zoo: each candidate is fitted to the teacher's maps by a short stage 1 and scored by its "
    "held-out map KL and its speed at search.target_tokens. Writes RUN_DIR/candidates.jsonl, pareto.md, "
    "pareto.png and the convert command of the winner; running the same command again continues. "
    "With --array-tasks K each generation is evaluated as a SLURM job array of K tasks.",
    arguments=_arguments,
)
def run(args) -> int:
    if args.array_tasks < 0:
        raise InputError(f"--array-tasks must be >= 0 (0: in this process), got {args.array_tasks}")
    if args.wait_timeout is not None and args.wait_timeout <= 0:
        raise InputError(
            f"--wait-timeout is seconds to wait for a generation: it must be > 0, got {args.wait_timeout}"
        )
    array_only = (
        "cluster",
        *PLACEMENT,
        "time",
        "gpus_per_node",
        "cpus_per_task",
        "mem",
        "slurm",
        "job_dir",
        "max_preemptions",
    )
    flags = ["--" + k.replace("_", "-") for k in (*array_only, "wait_timeout") if getattr(args, k)]
    if flags and not args.array_tasks:  # else dropped without a word: the search would run here
        raise InputError(
            f"{', '.join(flags)} only apply to --array-tasks K (generations as job arrays): add it or drop them"
        )
    if args.gpus_per_node > 1:  # else each task would run its batch once per GPU
        raise InputError(f"--gpus-per-node {args.gpus_per_node}: a task uses one GPU; use more --array-tasks")
    cfg = load(args)
    from ...apps.search import search

    evaluate = None
    if args.array_tasks:
        from ..search_array import array_evaluator

        evaluate = array_evaluator(cfg, args)
    result = search(cfg, evaluate=evaluate)
    n = len(result.state.candidates)
    say(f"done: {n} candidates, {len(result.front)} on the Pareto front -> {result.run_dir}/pareto.md")
    return 0
