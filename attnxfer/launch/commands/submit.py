"""``attnxfer submit``: `train` (or `convert`, `pretrain`) as a (multi-node) SLURM job through submitit."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..arguments import add_slurm_arguments
from .base import add_config_args, load, register_command

#: what `attnxfer submit --command` can run: module-level functions of a config (submitit pickles them)
SUBMITTABLE = {
    "train": "attnxfer.apps.training:train",
    "convert": "attnxfer.apps.convert:convert_main",
    "pretrain": "attnxfer.apps.pretrain:pretrain",
}


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--command",
        dest="job_command",  # not `command`: that names the subcommand in error messages
        choices=sorted(SUBMITTABLE),
        default="train",
        help="what the job runs (default train); convert resumes a finished stage 1 and stage 2's "
        "checkpoints after a requeue; pretrain is MAE pre-training (`attnxfer pretrain`)",
    )
    add_slurm_arguments(p)


@register_command(
    "submit",
    help="run `train` (or `convert`, `pretrain`) as a (multi-node) SLURM job through submitit",
    description="Submit the same training as `attnxfer train` (or, with --command convert, the "
    "same conversion as `attnxfer convert`) to SLURM. The job checkpoints "
    "periodically, requeues itself on preemption/time limit and resumes.",
    arguments=_arguments,
)
def run(args) -> int:
    cfg = load(args)
    from ..slurm import JobFailedError, submit_from_args

    module, name = SUBMITTABLE[args.job_command].split(":")
    try:
        submit_from_args(getattr(importlib.import_module(module), name), cfg, args)
    except JobFailedError as e:  # the job's failure, in one line; the traceback is in the log it names
        print(f"attnxfer submit: error: {e.summary()}", file=sys.stderr)
        return 1
    return 0
