"""The flags of ``attnxfer submit`` and ``attnxfer search --array-tasks``: argparse only.

Kept apart from `slurm.py` and `search_array.py` (which import submitit, torch and the apps) so that
building the CLI's parser, for ``--help`` and for argument errors, loads neither.
"""

from __future__ import annotations

import argparse

#: where a job runs: a SLURM cluster, local processes, or this process (submitit's executors)
CLUSTERS = ("slurm", "local", "debug")


def add_slurm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``attnxfer submit`` flags (resources, sbatch passthrough, sweeps, dry run)."""
    g = parser.add_argument_group("job submission (SLURM through submitit)")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    g.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node on CPU-only clusters")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data-loading workers + 1)")
    g.add_argument("--mem", default=None, help="memory per node, sbatch syntax (64G, 0 = all)")
    g.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS (default 60)")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--exclude", default=None, help="nodes to avoid")
    g.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --slurm mail-type=END (repeatable)",
    )
    g.add_argument(
        "--job-dir", default=None, help="submitit folder for pickles and logs (default RUN_DIR/submitit)"
    )
    g.add_argument("--name", default="attnxfer", help="job name")
    g.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="submit a job array over the cartesian product of these values (repeatable)",
    )
    g.add_argument("--array-parallelism", type=int, default=64, help="sweep points running at once")
    g.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="time limits survived by requeuing (default 3); preemptions are counted apart",
    )
    g.add_argument(
        "--max-preemptions",
        type=int,
        default=None,
        help="preemptions (SIGTERM, USR2 well before the time limit, requeues by the scheduler) "
        "survived (default: no limit)",
    )
    g.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="slurm",
        help="slurm, or local (processes on this machine), or debug (in this process)",
    )
    g.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and configs, submit nothing"
    )
    g.add_argument(
        "--wait", action="store_true", help="block until the job ends; fail with a failing rank's log"
    )
    return parser


def add_array_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SLURM: evaluate each generation as a job array (through submitit)")
    g.add_argument(
        "--array-tasks",
        type=int,
        default=0,
        metavar="K",
        help="evaluate each generation's candidates as a job array of K tasks (default 0: in this process)",
    )
    g.add_argument(
        "--cluster", choices=CLUSTERS, default="slurm", help="slurm, or local / debug (this machine)"
    )
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default="60", help="time limit of one task: minutes or [D-]HH:MM:SS")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem", default=None, help="memory per node, sbatch syntax (8G)")
    g.add_argument(
        "--slurm", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option"
    )
    g.add_argument("--job-dir", default=None, help="submitit folder (default RUN_DIR/submitit)")
    g.add_argument(
        "--wait-timeout", type=float, default=None, help="give up on a generation after this many s"
    )
