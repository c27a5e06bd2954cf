"""What every ``attnxfer`` subcommand shares: its registration, and the config arguments of those that run one.

A command module registers the function that adds its sub-parser (``@register_command("<name>")``); that
parser's ``func`` default is the handler, which takes the parsed arguments and returns the exit code. A
command that runs on a config takes ``-c CONFIG.yaml`` and dotted overrides (`add_config_args`) and reads
them with `load` before it imports its app, so a config error answers at once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

__all__ = ["COMMANDS", "add_config_args", "load", "print_config", "register_command"]

#: each subcommand's name -> the function that adds its sub-parser (filled by the modules of this package)
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def register_command(name: str):
    """Register the decorated function as the one that adds subcommand ``name``'s parser."""

    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "-c", "--config", required=required, help="YAML config (see cfgs/); defaults apply otherwise"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. transfer.mode=copy optim.lr=1e-3 transfer.layers=[0,1]",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and every value that differs from the recipe, then exit",
    )


def _changes(args, cfg) -> str:
    from ...config import describe_changes, load_config

    return describe_changes(load_config(args.config), cfg, args.config)


def load(args):
    """The config, and (on the main process) what it changes from its recipe, printed at start-up."""
    from ...config import load_config

    cfg = load_config(args.config, args.overrides)
    if os.environ.get("RANK", "0") == "0" and not getattr(args, "print_config", False):
        print(_changes(args, cfg), flush=True)
    return cfg


def print_config(args) -> int:
    """``--print-config``: the resolved config, then what it changes from its recipe (as YAML comments)."""
    from ...config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg).rstrip())
    print("# " + _changes(args, cfg).replace("\n", "\n# "))
    return 0
