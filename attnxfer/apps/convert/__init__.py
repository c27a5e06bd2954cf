"""`attnxfer convert`: the command, its stages, measurements, selection, comparison and report."""

import importlib


def __getattr__(name: str):
    # a job that `attnxfer submit --command convert` pickled while this package was one module names its
    # callable attnxfer.apps.convert.convert_main: requeued after an upgrade, it finds it here
    if name == "convert_main":
        return importlib.import_module(f"{__name__}.convert").convert_main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
