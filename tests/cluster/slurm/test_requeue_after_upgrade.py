"""A job submitted by an earlier attnxfer and requeued (preemption, time limit) after an upgrade restarts from
the task that version pickled into RUN_DIR/submitit/<job>_submitted.pkl: its callable and config classes
named where that version kept them (before the apps were regrouped into packages). This version unpickles
that task into one that runs the same command, instead of failing the job on a missing module."""

import dataclasses
import importlib
import pickle
import pickletools
from unittest import mock

import pytest

from attnxfer.apps.convert.conversion_study import convert_study
from attnxfer.apps.convert.convert import convert_main
from attnxfer.apps.run.pretrain import pretrain
from attnxfer.apps.run.training import train
from attnxfer.apps.study.study import study
from attnxfer.config.schema import TrainConfig
from attnxfer.config.study_spec import Student, StudySpec
from attnxfer.launch.commands.base import SUBMITTABLE, submittable
from attnxfer.launch.slurm.task import TrainingTask


def _global(module: str, name: str) -> bytes:
    """A protocol-0 pickle's reference to ``module.name`` (its GLOBAL opcode)."""
    return f"c{module}\n{name}\n".encode()


def _pickled_as_earlier(task: TrainingTask) -> bytes:
    """``task`` pickled as the earlier version did: its callable and config objects by their modules' names."""
    with mock.patch.object(TrainingTask, "__getstate__", lambda self: self.__dict__):
        return pickle.dumps(task, protocol=0)


def _written_by_earlier_version(task, now: tuple[str, str], earlier: tuple[str, str]) -> bytes:
    """``task`` pickled as the earlier version did, with the reference to ``now`` named ``earlier`` instead."""
    data = _pickled_as_earlier(task)
    assert data.count(_global(*now)) == 1
    return data.replace(_global(*now), _global(*earlier))


# (where the earlier version's `attnxfer submit` named the job's callable, what it is now)
EARLIER_CALLABLES = [
    (("attnxfer.apps.training", "train"), train),
    (("attnxfer.apps.pretrain", "pretrain"), pretrain),
    (("attnxfer.apps.convert", "convert_main"), convert_main),
    (("attnxfer.apps.study", "study"), study),
    (("attnxfer.apps.convert_study", "convert_study"), convert_study),
]


@pytest.mark.parametrize(
    ("earlier", "now"), EARLIER_CALLABLES, ids=[".".join(e) for e, _ in EARLIER_CALLABLES]
)
def test_a_requeued_task_of_an_earlier_version_runs_its_command(earlier, now):
    cfg = TrainConfig(run_dir="runs/x", seed=3)
    task = TrainingTask(train, cfg, max_requeues=2, time_limit_min=10, signal_delay_s=30)
    task.preemptions = 1  # the requeue that brought it back: its count travels with the task
    data = _written_by_earlier_version(task, (train.__module__, "train"), earlier)
    back = pickle.loads(data)
    assert isinstance(back, TrainingTask)
    assert back.main_fn is now
    assert back.cfg == cfg
    assert (back.max_requeues, back.preemptions, back.timeouts, back.time_limit_min) == (2, 1, 0, 10)


def test_a_study_of_an_earlier_version_keeps_its_students():
    spec = StudySpec(base=TrainConfig(run_dir="runs/s"), students=(Student("a", {"optim.lr": 1e-3}),))
    data = pickle.dumps(spec, protocol=0)
    for name in ("StudySpec", "Student"):
        data = data.replace(
            _global("attnxfer.config.study_spec", name), _global("attnxfer.config.study", name)
        )
    assert b"attnxfer.config.study_spec" not in data
    assert pickle.loads(data) == spec


def test_the_study_package_hands_out_its_module_before_it_is_imported():
    """A restarted job looks the earlier callable up before anything imported the module: the package's
    attribute is then the module, as it is once imported (and the task calls the module's function)."""
    package = importlib.import_module("attnxfer.apps.study")
    assert package.__getattr__("study") is importlib.import_module("attnxfer.apps.study.study")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        package.__getattr__("nothing")


def test_a_config_of_an_earlier_version_gets_the_keys_added_since():
    """The task's config holds the keys of the version that pickled it: the keys added since take their
    defaults, an old spelling moves where it went, every other value stays."""
    earlier = TrainConfig(run_dir="runs/x", seed=3)
    vars(earlier.convert).pop("candidates")  # a key added since
    vars(earlier.eval).pop("knn_bank_size")  # and one that was convert.knn_bank_size then
    vars(earlier.convert)["knn_bank_size"] = 512
    task = TrainingTask(train, earlier)
    with pytest.warns(FutureWarning, match="knn_bank_size"):
        back = pickle.loads(_pickled_as_earlier(task))
    fresh = TrainConfig(run_dir="runs/x", seed=3)
    assert back.cfg.convert.candidates == fresh.convert.candidates
    assert back.cfg.eval.knn_bank_size == 512
    assert back.cfg == dataclasses.replace(fresh, eval=dataclasses.replace(fresh.eval, knn_bank_size=512))


def test_a_config_of_this_version_comes_back_as_it_went():
    cfg = TrainConfig(run_dir="runs/x")
    assert pickle.loads(pickle.dumps(TrainingTask(train, cfg))).cfg == cfg


def _globals(data: bytes) -> set[str]:
    """The ``module name`` each GLOBAL of a protocol-0 pickle names."""
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("command", sorted(SUBMITTABLE))
def test_a_task_names_its_command_and_writes_its_config_as_text(command):
    """What this version pickles names no module of attnxfer's but the task's own: a later version that moved
    the apps or the config classes still reads it (the command by its name, the config as a config.yaml)."""
    cfg = TrainConfig(run_dir="runs/x", seed=3)
    students = (Student("a", {"optim.lr": 1e-3}), Student("b", {"transfer.mode": "none", "seed": None}))
    spec = StudySpec(base=cfg, students=students, command="convert")
    task = TrainingTask(submittable(command), spec if command == "study" else cfg)
    data = pickle.dumps(task, protocol=0)
    assert {g for g in _globals(data) if g.startswith("attnxfer")} == {
        "attnxfer.launch.slurm.task TrainingTask",
        "attnxfer.launch.slurm.task ConfigText",
    }
    back = pickle.loads(data)
    assert back.main_fn is task.main_fn
    assert back.cfg == task.cfg
