"""What every ``attnxfer`` subcommand shares: its registration, and the config arguments of those that run one.
A command reads its config with `load` before it imports its app, so a config error answers at once.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...speak import say, warn


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, its handler, what adds its arguments, and its parser's keywords."""

    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    parser_options: dict[str, Any]
    # what ``--print-config`` prints (None: `print_config`, the one config a run reads)
    show_config: Callable[[argparse.Namespace], int] | None

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        """Its sub-parser, which hands the parsed arguments to `run` (``--print-config`` to `show_config`)."""
        # no abbreviations: sbatch's --gpus 4 (the job's GPUs) was read as --gpus-per-node 4
        p = sub.add_parser(self.name, allow_abbrev=False, **self.parser_options)
        self.arguments(p)
        p.set_defaults(func=self.run, show_config=self.show_config or print_config, command_parser=p)


#: every subcommand by name (filled by the modules of this package)
COMMANDS: dict[str, Command] = {}


#: what `attnxfer submit --command` can run: module-level functions of a config (submitit pickles them)
SUBMITTABLE = {
    "train": "attnxfer.apps.run.training:train",
    "convert": "attnxfer.apps.convert.convert:convert_main",
    "pretrain": "attnxfer.apps.run.pretrain:pretrain",
    "study": "attnxfer.launch.commands.study:submitted_study",  # a train or a convert study
}


def submittable(name: str):
    """The function `attnxfer submit --command NAME` runs (a requeued job's task names it so)."""
    module, attr = SUBMITTABLE[name].split(":")
    return getattr(importlib.import_module(module), attr)


def register_command(
    name: str,
    *,
    arguments: Callable[[argparse.ArgumentParser], None],
    show_config: Callable[[argparse.Namespace], int] | None = None,
    **parser_options,
):
    """Register the decorated handler as subcommand ``name``; ``parser_options`` go to ``add_parser``;
    ``show_config`` answers ``--print-config`` where the command reads more than one config (a study)."""

    def deco(run):
        COMMANDS[name] = Command(name, run, arguments, parser_options, show_config)
        return run

    return deco


class _OneConfig(argparse.Action):
    """A second ``-c`` is refused: argparse would keep the last and drop the first file without a word, where
    a user of tools that merge several configs expects both read."""

    def __call__(self, parser, namespace, values, option_string=None):
        if (
            values.isdigit()
            and "--cpus-per-task" in parser._option_string_actions
            and not Path(values).exists()
        ):
            parser.error(  # sbatch's -c N is CPUs per task; every attnxfer command's -c is its config
                f"-c {values}: -c is the config (a YAML file or recipe) here; sbatch's -c {values} (CPUs per "
                f"task) is --cpus-per-task {values}"
            )
        if (first := getattr(namespace, self.dest)) is not None:
            parser.error(
                f"-c given twice ({first}, then {values}): a command reads one config; to apply {values} "
                f"over {first}, write base: {first} in {values} and give -c {values} alone"
            )
        setattr(namespace, self.dest, values)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", action=_OneConfig, help="YAML config (see cfgs/); defaults apply otherwise"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. data.batch_size=64 seed=1 (a key of another command's is refused)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and every value that differs from the recipe, then exit",
    )


def _changes(args, cfg) -> str:
    from ...config import describe_changes, load_config

    return describe_changes(load_config(args.config, checked=False), cfg, args.config)


def load(args):
    """The config, and (on the main process) what it changes from its recipe, printed at start-up."""
    from ...config import ConfigError, load_config, refuse_unread_sections
    from ...run_layout import RUN_CONFIG, RUN_RECORD, STAGE_DIRS
    from ..value_checks import check_values

    command = args.job_command if args.command == "submit" else args.command
    overrides = list(args.overrides)
    if getattr(args, "skip_stage1", False):  # convert's flag: a spelling of convert.stage1_steps=0
        given = [o for o in overrides if o.split("=", 1)[0].endswith("stage1_steps")]
        if given:  # the flag wins, as a later override would: said, since the value given is dropped
            warn(f"warning: --skip-stage1 is convert.stage1_steps=0, which replaces {given[-1]}")
        overrides.append("convert.stage1_steps=0")
    cfg = check_values(load_config(args.config, overrides, None if command == "eval" else command))
    stage2 = Path(args.config or ".").parent  # a conversion's: its folder holds a config and no run.json
    conversion = (stage2.parent / RUN_CONFIG).is_file() and not (stage2.parent / RUN_RECORD).is_file()
    if command == "train" and stage2.name == STAGE_DIRS[-1] and conversion:
        raise ConfigError(  # it builds the teacher's softmax student: only convert rebuilds the converted one
            f"{args.config} is stage 2's config of the conversion {stage2.parent}: go on with attnxfer convert "
            f"-c {stage2.parent / RUN_CONFIG} (schedule.max_steps=... to train longer)"
        )
    if command != "eval":  # eval reads a run's config as written; any other command (a new one) refuses
        refuse_unread_sections(cfg, command, submit=args.command == "submit")
    if not getattr(args, "print_config", False):
        say(_changes(args, cfg))
    return cfg


def print_config(args) -> int:
    """``--print-config``: the resolved config, then what it changes from its recipe (as comments)."""
    from ...config import dump_config

    cfg = load(args)  # says nothing under --print-config
    say(dump_config(cfg, args.job_command if args.command == "submit" else args.command).rstrip())
    say("# " + _changes(args, cfg).replace("\n", "\n# "))
    return 0


def add_vary(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vary",
        action="append",
        metavar="KEY=V1,V2",
        help="a key a study's students differ in, one student per value (repeated: the cartesian product)",
    )


def load_study(args):
    """A study's spec (`attnxfer.config.study_spec`): ``-c``'s base keys and ``students:``, the overrides, ``--vary``."""
    from ...config import ConfigError, refuse_unread_sections
    from ...config.study_spec import load_study as load
    from ..arguments import parse_sweep
    from ..value_checks import check_values

    spec = load(
        args.config, args.overrides, parse_sweep(args.vary, "--vary"), getattr(args, "study_command", None)
    )
    for student in spec.students:
        try:
            refuse_unread_sections(
                spec.config_of(student), spec.command, study=True, submit=args.command == "submit"
            )
            check_values(spec.config_of(student))
        except ConfigError as e:
            raise ConfigError(f"student {student.name!r}: {e}") from None
    return spec


def with_auto_resume(cfg: Any) -> str:
    """What a stopped command needs to resume when run again: nothing, unless its checkpoint.resume (none:
    start over; a PATH: start from there) would not pick up where it stopped."""
    run = getattr(cfg, "base", cfg)  # a study's: its base
    resume = str(getattr(getattr(run, "checkpoint", None), "resume", "auto"))
    if resume == "auto":
        return ""
    again = "start over" if resume == "none" else f"start from {resume}"
    return f" with checkpoint.resume=auto (checkpoint.resume={resume} would {again} again)"


def done_line(result) -> str:
    """How `train` and `pretrain` end: steps and best score, or why there was nothing to do."""
    if result.nothing_to_do:
        return result.nothing_to_do
    if result.best is None:
        best = "no evaluation recorded"
    elif result.best_top1 is not None:
        best = f"best {'EMA ' * result.metric.startswith('ema_')}val top1 {result.best_top1:.2f}"
    elif result.metric == "val_loss":  # MAE pre-training
        best = f"best val loss {result.best:.4f}"
    else:  # a run without a task loss: its final-feature cosine with the teacher
        best = f"best {result.metric.replace('val_', '')} {result.best:.4g}"
    return f"done: {result.steps} step{'s' * (result.steps != 1)}, {best} -> {result.run_dir}"
