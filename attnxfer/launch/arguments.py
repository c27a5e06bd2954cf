"""The flags of ``attnxfer submit`` and ``attnxfer search --array-tasks``, argparse only: building the CLI's
parser (for ``--help`` and argument errors) must not load submitit, torch or the apps.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from ..errors import InputError

#: where a job runs: a SLURM cluster, local processes, or this process (submitit's executors)
CLUSTERS = ("slurm", "local", "debug")
#: where a job may run, as sbatch's options of these names (--exclude: nodes to avoid)
PLACEMENT = ("partition", "account", "qos", "constraint", "exclude")
#: sbatch options that submitit itself sets and that would break log collection if overridden
RESERVED_SBATCH_KEYS = frozenset({"output", "error", "open-mode", "array", "signal", "job-name", "wrap"})
#: sbatch options that have their own `attnxfer submit` flag: --slurm may not set them behind its back
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
    **{name: f"--{name}" for name in PLACEMENT},
}


#: sbatch's one-letter flags, by the option each stands for (-c is submit's config, as every command's)
_SBATCH_LETTERS = {
    **dict(p="partition", t="time", N="nodes", A="account", q="qos", J="job-name", C="constraint"),
    **dict(x="exclude", G="gpus", n="ntasks", o="output", e="error", b="begin"),
}
#: sbatch options without a flag of submit's that `--slurm KEY=VALUE` passes on
_SBATCH_OTHER = frozenset(
    ("gres", "mem-per-cpu", "mem-per-gpu", "cpus-per-gpu", "mail-type", "mail-user", "reservation")
    + ("nodelist", "dependency", "begin", "licenses", "comment", "exclusive", "requeue", "hint")
)


#: sbatch options written without a value (``--exclusive``; some take one too: ``--exclusive=user``)
_SBATCH_SWITCHES = frozenset(
    ("exclusive", "requeue", "no-requeue", "contiguous", "overcommit", "oversubscribe", "spread-job", "hold")
    + ("use-min-nodes", "no-kill")
)


def sbatch_spelling(flag: str, value: str) -> str | None:
    """How `attnxfer submit` takes an sbatch option written as sbatch takes it (``-p gpu``, ``--gres gpu:4``,
    ``--ntasks-per-node 4``), in words; None for a flag that is none of sbatch's."""
    if flag.startswith("--"):
        name, _, inline = flag[2:].partition("=")
    else:  # -p gpu
        name, inline = _SBATCH_LETTERS.get(flag[1:], flag), ""
    value = inline or value or "VALUE"
    if name in RESERVED_SBATCH_KEYS - {"job-name"}:  # --output, --error: submitit names the logs itself
        return "submitit sets it, writing the job's logs under --job-dir"
    if name == "job-name":
        own = f"--name {value}"
    elif name == "gpus":  # the whole job's GPUs, over all its nodes
        own = (
            f"--gpus-per-node, each node's GPUs (sbatch's --gpus {value} counts the job's: divide by --nodes)"
        )
    elif name == "gres" and (gpus := re.fullmatch(r"gpu(?::[\w.-]+)?:(\d+)", value)):
        own = f"--gpus-per-node {gpus[1]}"
    elif name in OWN_FLAG_KEYS:
        own = OWN_FLAG_KEYS[name] if " " in OWN_FLAG_KEYS[name] else f"{OWN_FLAG_KEYS[name]} {value}"
    elif name in _SBATCH_OTHER:  # a switch (--exclusive, --requeue) is its name alone
        own = f"--slurm {name}" + ("" if name in _SBATCH_SWITCHES and value == "VALUE" else f"={value}")
    else:
        return None
    return f"submit takes {own}"


def add_slurm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``attnxfer submit`` flags (resources, sbatch passthrough, sweeps, dry run)."""
    g = parser.add_argument_group("job submission (SLURM through submitit)")
    g.add_argument("--nodes", type=int, default=1, help="number of nodes")
    g.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node on CPU-only clusters")
    g.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS (default 60)")
    _add_resource_arguments(g)
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
    g.add_argument("--cluster", choices=CLUSTERS, help="slurm (default), or local / debug (this machine)")
    g.add_argument("--time", help="time limit of one task: minutes (default 60) or [D-]HH:MM:SS")
    _add_resource_arguments(g)
    g.add_argument(
        "--wait-timeout", type=float, default=None, help="give up on a generation after this many s"
    )


def _add_resource_arguments(g: argparse._ArgumentGroup) -> None:
    """The flags `submit` and a search's job array share: what each task gets, where it runs and how many
    preemptions it survives."""
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data-loading workers + 1)")
    g.add_argument("--mem", default=None, help="memory per node, sbatch syntax (64G, 0 = all)")
    for name in PLACEMENT:
        g.add_argument(f"--{name}", default=None)
    g.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --slurm mail-type=END, or a switch alone: --slurm exclusive "
        "(repeatable)",
    )
    g.add_argument(
        "--job-dir", default=None, help="submitit folder for pickles and logs (default RUN_DIR/submitit)"
    )
    g.add_argument(
        "--max-preemptions",
        type=int,
        default=None,
        help="preemptions (SIGTERM, USR2 well before the time limit, requeues by the scheduler) "
        "survived (default: no limit)",
    )


# -- KEY=VALUE lists (`--slurm`, `--sweep`, a study's `--vary`): parsed without importing submitit --


def parse_key_values(items: Sequence[str] | None, what: str = "--slurm") -> dict[str, str | bool]:
    """``["KEY=VALUE", ...]`` to a dict; a missing ``=`` or a repeated key is an error, but for ``--slurm``,
    where one of sbatch's switches is given alone or as KEY=true (``--slurm exclusive``: ``--exclusive``,
    which sbatch refuses as ``--exclusive=true``)."""
    out: dict[str, str | bool] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if what == "--slurm" and key in _SBATCH_SWITCHES and (not sep or value.strip().lower() == "true"):
            sep, value = "=", True
        if not sep or not key:
            alone = f" (sbatch's switches alone: {', '.join(sorted(_SBATCH_SWITCHES))})" * (what == "--slurm")
            raise InputError(f"{what} expects KEY=VALUE, got {item!r}{alone}")
        if key in out:
            raise InputError(f"{what} sets {key!r} twice")
        out[key] = value
    return out


def split_top_level(text: str) -> list[str]:
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


def parse_sweep(items: Sequence[str] | None, flag: str = "--sweep") -> dict[str, list[str]] | None:
    """``["optim.lr=1e-3,1e-4"]`` to ``{"optim.lr": ["1e-3", "1e-4"]}``; values stay strings (the config
    parses them), and commas inside brackets belong to the value (``transfer.layers=[0,1],[2,3]``).
    ``flag``: the option the items came from (a study's ``--vary``), as errors name it."""
    if not items:
        return None
    sweep: dict[str, list[str]] = {}
    for key, values in parse_key_values(items, what=flag).items():
        vals = [v.strip() for v in split_top_level(values)]
        if not vals or any(v == "" for v in vals):
            raise InputError(f"{flag} {key}= needs comma-separated values without empty ones, got {values!r}")
        sweep[key] = vals
    return sweep
