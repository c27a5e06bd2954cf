"""`attnxfer submit`'s arguments as options and a submission."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import submitit

from ..arguments import add_slurm_arguments as add_slurm_arguments  # its home before arguments.py
from .monitor import (  # moved to monitor.py
    wait,
)
from .options import (  # moved to options.py
    RunConfig,
    SlurmOptions,
    parse_key_values,
    parse_sweep,
)
from .submission import (  # moved to submission.py
    submit,
)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def options_from_args(ns: argparse.Namespace) -> SlurmOptions:
    names = {f.name for f in fields(SlurmOptions)} - {"extra"}
    kwargs = {name: getattr(ns, name) for name in names if hasattr(ns, name)}
    return SlurmOptions(extra=parse_key_values(getattr(ns, "slurm", None)), **kwargs)


def submit_from_args(
    main_fn: Callable[[Any], Any], cfg: RunConfig, ns: argparse.Namespace, echo: Callable[[str], None] = print
) -> list[submitit.Job]:
    """``attnxfer submit`` in one call: options, sweep, dry run and ``--wait`` from parsed flags."""
    jobs = submit(
        main_fn,
        cfg,
        options_from_args(ns),
        sweep=parse_sweep(getattr(ns, "sweep", None)),
        dry_run=getattr(ns, "dry_run", False),
        echo=echo,
    )
    if jobs and getattr(ns, "wait", False):
        wait(jobs)
    return jobs
