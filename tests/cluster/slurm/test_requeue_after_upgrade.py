"""A job submitted by an earlier attnxfer and requeued (preemption, time limit) after an upgrade restarts from
the task that version pickled into RUN_DIR/submitit/<job>_submitted.pkl: its callable and config classes
named where that version kept them (before the apps were regrouped into packages). This version unpickles
that task into one that runs the same command, instead of failing the job on a missing module."""

import dataclasses
import importlib
import pickle

import pytest

from attnxfer.apps.convert.conversion_study import convert_study
from attnxfer.apps.convert.convert import convert_main
from attnxfer.apps.run.pretrain import pretrain
from attnxfer.apps.run.training import train
from attnxfer.apps.study.study import study
from attnxfer.config.schema import TrainConfig
from attnxfer.config.study_spec import Student, StudySpec
from attnxfer.launch.slurm.task import TrainingTask


def _global(module: str, name: str) -> bytes:
    """A protocol-0 pickle's reference to ``module.name`` (its GLOBAL opcode)."""
    return f"c{module}\n{name}\n".encode()


def _written_by_earlier_version(obj, now: tuple[str, str], earlier: tuple[str, str]) -> bytes:
    """``obj`` pickled as this version does, with the reference to ``now`` named ``earlier`` instead."""
    data = pickle.dumps(obj, protocol=0)
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
        back = pickle.loads(pickle.dumps(task, protocol=0))
    fresh = TrainConfig(run_dir="runs/x", seed=3)
    assert back.cfg.convert.candidates == fresh.convert.candidates
    assert back.cfg.eval.knn_bank_size == 512
    assert back.cfg == dataclasses.replace(fresh, eval=dataclasses.replace(fresh.eval, knn_bank_size=512))


def test_a_config_of_this_version_comes_back_as_it_went():
    cfg = TrainConfig(run_dir="runs/x")
    assert pickle.loads(pickle.dumps(TrainingTask(train, cfg))).cfg == cfg
