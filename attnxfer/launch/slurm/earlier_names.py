"""Where the names a job's pickled task was written with by an earlier attnxfer live now.

`attnxfer submit` pickles its task (``RUN_DIR/submitit/<job>_submitted.pkl``: a `TrainingTask` holding the
command's callable and its config) by module and name. A job requeued by a preemption or a time limit starts
again from that file, with whatever attnxfer is installed then: a job submitted before the apps were
regrouped into packages (``attnxfer.apps.training`` became ``attnxfer.apps.run.training``, and so on) and
requeued after an upgrade would fail on a missing module instead of resuming from its run directory.

`install` (called where `TrainingTask` is defined: the pickle's first attnxfer name, imported before the
names below are looked up) makes each module that is gone importable under its earlier name, as the module
that holds its names now. The modules that became packages answer their earlier names themselves
(``attnxfer.apps.convert.convert_main``, ``attnxfer.apps.study.study``: the packages' ``__getattr__``). The
config it unpickles holds that version's keys only: `current_config` gives this version's, with the same
values."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

from ...config.overrides import merge_values
from ...config.schema import TrainConfig
from ...config.study_spec import StudySpec

#: a module the pickle may name that is gone -> the module that holds its names now
MOVED_MODULES = {
    "attnxfer.apps.training": "attnxfer.apps.run.training",  # train
    "attnxfer.apps.pretrain": "attnxfer.apps.run.pretrain",  # pretrain
    "attnxfer.apps.convert_study": "attnxfer.apps.convert.conversion_study",  # convert_study
    "attnxfer.config.study": "attnxfer.config.study_spec",  # StudySpec, Student
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an earlier module name of `MOVED_MODULES` as a module that hands out the names of the module
    that replaced it (the same objects, so that the classes an earlier pickle names are this version's).
    Last on ``sys.meta_path``: a real module of that name, were there one, is found first."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a plain module; the one it stands for keeps its own __spec__ and __name__

    def exec_module(self, module: ModuleType) -> None:
        now = importlib.import_module(MOVED_MODULES[module.__name__])
        module.__getattr__ = lambda name: getattr(now, name)  # PEP 562: every name the module has now


def install() -> None:
    """Let the earlier module names of `MOVED_MODULES` be imported (once per process)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def _keys_as_now(section: Any) -> bool:
    """Whether a config section (and every section in it) holds exactly this version's keys."""
    if not dataclasses.is_dataclass(section) or isinstance(section, type):
        return True
    names = {f.name for f in dataclasses.fields(section)}
    return set(vars(section)) == names and all(_keys_as_now(getattr(section, n)) for n in names)


def _as_written(section: Any) -> Any:
    """A config section's values as nested data, under the keys of the version that wrote it."""
    if not dataclasses.is_dataclass(section) or isinstance(section, type):
        return section
    return {k: _as_written(v) for k, v in vars(section).items()}


def current_config(cfg: Any) -> Any:
    """A config unpickled from a task that an earlier version wrote, with this version's keys: the values it
    holds, read as a run's config.yaml is (old spellings moved where they went, keys added since at their
    defaults). A study's base likewise; anything else, and a config this version wrote, as it is."""
    if isinstance(cfg, StudySpec):
        return dataclasses.replace(cfg, base=current_config(cfg.base))
    if not isinstance(cfg, TrainConfig) or _keys_as_now(cfg):
        return cfg
    return merge_values(TrainConfig(), _as_written(cfg))
