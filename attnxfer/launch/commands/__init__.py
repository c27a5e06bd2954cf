"""The ``attnxfer`` subcommands, one module each: ``<name>.py`` is ``attnxfer <name>``.

Each module holds the command's handler, a thin layer over one library function (most often in
``attnxfer/apps/<name>.py``), registered with its parser's text and arguments (``@register_command("<name>",
help=..., arguments=...)``, `base.py`). The package imports every module in it, so a new command is one file
here and nothing else.

The modules import nothing heavy at their top: each handler imports its app (and with it torch) when it runs,
so that ``attnxfer --help`` and argument errors answer at once. They and ``launch/cli.py`` are the only code in
the package that imports attnxfer modules lazily.
"""

import importlib
import pkgutil

from .base import COMMANDS, Command, add_config_args, load, print_config, register_command

#: the order ``attnxfer --help`` lists the commands in (a run's course); a command not named here comes after
HELP_ORDER = (
    "train",
    "study",
    "pretrain",
    "eval",
    "demo",
    "convert",
    "search",
    "submit",
    "export",
    "inspect",
    "fetch",
)


def _rank(name: str) -> tuple[int, str]:
    return (HELP_ORDER.index(name) if name in HELP_ORDER else len(HELP_ORDER)), name


for _module in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=_rank):
    importlib.import_module(f"{__name__}.{_module}")  # registers the command it defines (in this order)

__all__ = ["COMMANDS", "HELP_ORDER", "Command", "add_config_args", "load", "print_config", "register_command"]
