"""The ``attnxfer`` subcommands, one module each (``<name>.py`` is ``attnxfer <name>``; a new command is one
file here). Each handler imports its app (and torch) only when it runs, so ``attnxfer --help`` and argument
errors answer at once.
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


_ORDER = {name: i for i, name in enumerate(HELP_ORDER)}
for _module in sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (_ORDER.get(n, 99), n)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the command it defines (in this order)

__all__ = ["COMMANDS", "HELP_ORDER", "Command", "add_config_args", "load", "print_config", "register_command"]
