"""`attnxfer study`: K students from one teacher in one job, and the study's report."""

import importlib


def __getattr__(name: str):
    # a job that `attnxfer submit --command study` pickled while this package was one module names its
    # callable attnxfer.apps.study.study: requeued after an upgrade, it finds the module of that name, as it
    # would once the module is imported (TrainingTask calls the module's function of the same name)
    if name == "study":
        return importlib.import_module(f"{__name__}.study")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
