"""A study: K students from one teacher, one batch and one teacher pass per step, each student ending exactly
where it ends trained alone; what must be shared refused before any work; a kill at any instant resumed to the
same weights; a student that diverges stopping alone."""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import (
    assert_same_tensors,
    fork_cli,
    on_each_line,
    run_cli,
    script_module,
    tiny_run,
    torchrun_commands,
)
from safetensors.torch import load_file
from timm.data import Mixup

from attnxfer.apps.run.loaders import data_seed
from attnxfer.apps.run.training import judged_resume
from attnxfer.apps.study.study import judged_study_point, study
from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.checkpoints.verify import MANIFEST_NAME
from attnxfer.config import ConfigError
from attnxfer.config.loading import load_config
from attnxfer.config.study_spec import Student, load_study, names_on_record
from attnxfer.launch import cli
from attnxfer.launch.commands.submit import SUBMITTABLE
from attnxfer.train.drive import BatchPlace
from attnxfer.train.lockstep import SharedFeed
from attnxfer.train.stop import StopRequested
from attnxfer.train.terms import NonFiniteLossError
from attnxfer.transfer import teacher_student as pairs

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# 8 steps an epoch at batch 8: a periodic save mid-epoch, every student in lock step
BASE = [
    *tiny_run(64, 8),
    "log.every_steps=1",
    "deterministic=true",
    "transfer.ce_path=rows",
    f"schedule.max_steps={STEPS}",
    "checkpoint.every_steps=2",
]

#: one student per family of what a student can learn from its teacher (and an EMA, a seed of its own)
FAMILIES = """
students:
  - name: copy
    transfer.mode: copy
  - name: distill
    transfer: {mode: distill, atd_weight: 3.0, end_layer: -1}
    ema.decay: 0.9
  - name: feature
    transfer: {mode: none, feature_distill: 1.0}
    seed: 7
  - name: logit
    transfer: {mode: none, logit_distill: 1.0, logit_temperature: 2.0}
  - name: zoo
    model.attention: relu_linear
    transfer.mode: distill
"""


def _study_yaml(folder: Path, teacher: Path, students: str) -> Path:
    path = folder / "study.in.yaml"
    path.write_text(f"teacher:\n  spec: local-dir:{teacher}\n{students}")
    return path


def _final(run: Path, group: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / f"{group}.safetensors"))


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_teacher_dir):
    """A study of every family of student (copy, distill with EMA, feature, logit, a zoo attention)."""
    folder = tmp_path_factory.mktemp("study")
    yaml = _study_yaml(folder, tiny_teacher_dir, FAMILIES)
    assert cli.main(["study", "-c", str(yaml), *BASE, f"run_dir={folder / 'study'}"]) == 0
    return folder / "study"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["copy", "distill", "feature", "logit", "zoo"])
def test_each_student_of_a_study_ends_where_it_ends_trained_alone(families, name, tmp_path, capsys):
    """Bit for bit (fp32 CPU): its own random streams (initialisation, drop path), nothing of another student
    in its graph, its own optimiser, clipping, schedule and EMA; the run folder is a train run's."""
    student = families / name
    alone = tmp_path / "alone"
    assert cli.main(["train", "-c", str(student / "config.yaml"), f"run_dir={alone}"]) == 0
    groups = ["model", "optimizer", *(["ema"] if name == "distill" else [])]
    for group in groups:
        assert_same_tensors(_final(student, group), _final(alone, group), f"{name} {group}")
    rows = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    alone_rows = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "time"}
    assert [strip(r) for r in rows] == [strip(r) for r in alone_rows]
    # eval takes a student's folder unchanged
    capsys.readouterr()
    assert cli.main(["eval", "-c", str(student / "config.yaml")]) == 0
    assert f"step {STEPS}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_study_records_its_students_and_the_step_all_of_them_saved(families):
    record = json.loads((families / "study.json").read_text())
    assert [s["name"] for s in record["students"]] == ["copy", "distill", "feature", "logit", "zoo"]
    assert all(
        s["folder"] == s["name"] and s["step"] == STEPS and s["stopped"] is None for s in record["students"]
    )
    assert record["students"][1]["overrides"] == {
        "transfer.atd_weight": 3.0,
        "transfer.end_layer": -1,
        "transfer.mode": "distill",
        "ema.decay": 0.9,
    }
    committed = ResumePoint.find(families)
    assert committed.step == STEPS and committed.record("checkpoints") == {  # relative to the study's folder
        s["name"]: f"{s['name']}/checkpoints/step-{STEPS:08d}" for s in record["students"]
    }
    # the students' older checkpoints were pruned only after every student saved the step
    for s in record["students"]:
        steps = sorted(p.name for p in (families / s["name"] / "checkpoints").glob("step-*"))
        assert steps[-1] == f"step-{STEPS:08d}"
    # study.yaml runs it again: it has nothing left to do, and says so for each student
    code = cli.main(["study", "-c", str(families / "study.yaml")])
    assert code == 0


@pytest.mark.slow
def test_study_json_gives_the_step_every_student_saved_when_a_study_stops(tmp_path, tiny_teacher_dir):
    """A stop signal after the first epoch (2 steps of 4): study.json says each student reached the step the
    study stopped at, the step a re-run goes on from, not the step the run started at; the stop names the
    study's checkpoint."""

    def log(line: str) -> None:
        if line.startswith("copy: epoch 0: step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)  # read once the round is over

    yaml = _study_yaml(
        tmp_path, tiny_teacher_dir, "students:\n  - name: copy\n    transfer.mode: copy\n  - name: distill\n"
    )
    spec = load_study(yaml, [*BASE, "data.kwargs.length=16", f"run_dir={tmp_path / 'study'}"])
    with pytest.raises(StopRequested) as stop, on_each_line(log):
        study(spec)
    record = json.loads((tmp_path / "study" / "study.json").read_text())
    assert 0 < stop.value.step < STEPS and [s["step"] for s in record["students"]] == [stop.value.step] * 2
    # what a re-run goes on from is named: the study's own checkpoint, not the first student's
    assert stop.value.checkpoint == str(tmp_path / "study" / "checkpoints" / f"step-{stop.value.step:08d}")
    # resumed, each student's result counts its time once: its turns of both attempts, as study.json says
    students = study(spec).students
    record = json.loads((tmp_path / "study" / "study.json").read_text())
    for outcome, entry in zip(students, record["students"], strict=True):
        assert outcome.result.seconds == pytest.approx(entry["seconds"], abs=1e-3)


@pytest.mark.slow
def test_a_study_resumed_with_a_key_it_cannot_change_names_its_study_yaml_as_its_config(tmp_path, capsys):
    """What continues a study is `attnxfer study -c RUN/study.yaml` (a study has no config.yaml): the refusal
    named the checkpoint's folder as "its config"."""
    run = tmp_path / "study"
    argv = ["study", *BASE, "transfer.mode=none", "schedule.max_steps=1", f"run_dir={run}"]
    argv += ["model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}", "--vary", "optim.lr=1e-3,2e-3"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv, "seed=4"]) == 2
    err = capsys.readouterr().err
    assert "trained with different values for: seed (0 -> 4)" in err, err
    assert err.rstrip().endswith(
        f"give them the values it recorded: seed=0 (its config: {run / 'study.yaml'})"
    )


@pytest.mark.slow
def test_a_study_started_over_goes_on_from_its_own_steps_not_the_earlier_attempts(tmp_path, capsys):
    """checkpoint.resume=none, as the refusal above advises: the earlier attempt's study checkpoint stayed
    in place, so the next run of the same command went on from it and was refused as another config's."""
    run = tmp_path / "study"
    argv = ["study", *BASE, "transfer.mode=none", f"run_dir={run}", "checkpoint.every_steps=1"]
    argv += ["model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}", "--vary", "optim.lr=1e-3,2e-3"]
    assert cli.main([*argv, "schedule.max_steps=2"]) == 0
    first_report = (run / "study.md").read_text()
    assert cli.main([*argv, "seed=4", "schedule.max_steps=1", "checkpoint.resume=none"]) == 0
    out = capsys.readouterr().out
    assert f"study: checkpoint.resume=none: kept the earlier attempt's {run / 'checkpoints'}" in out, out
    assert len(list(run.glob("checkpoints/step-00000002.replaced-*"))) == 1
    # its report too, as a search's: the new attempt's report does not overwrite the only account of it
    (kept,) = run.glob("study.md.replaced-*")
    assert (
        kept.read_text() == first_report
        and "2 steps" in first_report
        and "1 step;" in (run / "study.md").read_text()
    )
    assert cli.main([*argv, "seed=4", "schedule.max_steps=2"]) == 0
    assert "study: resuming every student from step 1" in capsys.readouterr().out


@pytest.mark.slow
def test_a_student_trained_on_alone_past_the_studys_step_is_refused_where_that_step_is_gone(tmp_path, capsys):
    """`train -c RUN/<name>/config.yaml` pruned the study's step from that student: the study restarted it
    from scratch beside the others (and set its newer checkpoint aside) while saying it resumed every one.
    Where the step is kept, the study goes on from it and says the solo save is set aside, and why."""
    run = tmp_path / "study"
    argv = ["study", *BASE, "transfer.mode=none", "schedule.max_steps=1", "checkpoint.keep_last=1"]
    argv += ["model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}", f"run_dir={run}", "--vary", "seed=0,1"]
    assert cli.main(argv) == 0
    alone = next(p for p in run.iterdir() if (p / "config.yaml").is_file())
    assert cli.main(["train", "-c", str(alone / "config.yaml"), "schedule.max_steps=2"]) == 0
    capsys.readouterr()
    assert cli.main([*argv[:-2], "schedule.max_steps=3", *argv[-2:]]) == 2
    assert f"student {alone.name!r} has no checkpoint of the study's step 1" in capsys.readouterr().err
    assert [p.name for p in (alone / "checkpoints").iterdir()] == ["step-00000002"]
    # the study's step kept: the study goes on from it, the solo step set aside (not deleted) in a line
    again = [a.replace("keep_last=1", "keep_last=2").replace(str(run), str(tmp_path / "kept")) for a in argv]
    alone = tmp_path / "kept" / alone.name
    assert cli.main(again) == 0
    assert cli.main(["train", "-c", str(alone / "config.yaml"), "schedule.max_steps=2"]) == 0
    capsys.readouterr()
    assert cli.main([*again[:-2], "schedule.max_steps=3", *again[-2:]]) == 0
    solo = alone / "checkpoints" / "step-00000002"
    assert (
        f"study: {solo} was saved after the study's last complete step (by a save round cut short, or by "
        in (capsys.readouterr().out)
    )
    assert len(list(alone.glob("checkpoints/step-00000002.uncommitted-*"))) == 1


@pytest.mark.slow
def test_a_student_whose_checkpoint_of_the_studys_step_is_damaged_is_told_so(tmp_path, capsys):
    """A student's damaged save of the study's step was said to hold no checkpoint at all ('it holds none:
    trained on alone?'), beside the warning that named the damage."""
    run = tmp_path / "study"
    argv = ["study", *BASE, "transfer.mode=none", "schedule.max_steps=1", f"run_dir={run}"]
    argv += ["model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}", "--vary", "seed=0,1"]
    assert cli.main(argv) == 0
    student = next(p for p in run.iterdir() if (p / "config.yaml").is_file())
    (student / "checkpoints" / "step-00000001" / "MANIFEST.json").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"student {student.name!r} has no usable checkpoint of the study's step 1" in err, err
    assert "(it is damaged: the warning above says why)" in err and "trained on alone" not in err
    assert (student / "checkpoints" / "step-00000001").is_dir()
    # with an earlier step every student holds, the study goes on from it, as train goes past a damaged save
    run = tmp_path / "kept"
    argv = [a.replace(str(tmp_path / "study"), str(run)) for a in argv]
    argv = [*argv, "checkpoint.every_steps=1", "checkpoint.keep_last=2"]
    assert cli.main([*argv, "schedule.max_steps=2"]) == 0
    damaged, intact = sorted(p for p in run.iterdir() if (p / "config.yaml").is_file())
    (damaged / "checkpoints" / "step-00000002" / "MANIFEST.json").unlink()
    capsys.readouterr()
    assert cli.main([*argv, "schedule.max_steps=3"]) == 0
    out, err = capsys.readouterr()
    assert f"study: student {damaged.name!r}'s checkpoint of step 2 is damaged" in err, err
    assert "study: resuming every student from step 1" in out
    assert len(list(run.glob("checkpoints/step-00000002.unusable-*"))) == 1  # the study's own, set aside
    assert len(list(intact.glob("checkpoints/step-00000002.uncommitted-*"))) == 1  # kept, not loaded
    assert json.loads((run / "study.json").read_text())["students"][0]["step"] == 3


def test_a_key_every_student_shares_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "study"
    for vary in ("data.batch_size=8,16", "teacher.spec=a,b", "schedule.max_steps=2,4", "aug.mixup=0,0.8"):
        code = cli.main(["study", *BASE, f"run_dir={run}", "--vary", "seed=1,2", "--vary", vary])
        err = capsys.readouterr().err.strip().splitlines()
        key = vary.split("=")[0]
        assert code == 2 and len(err) == 1 and key in err[0] and "every student of a study shares" in err[0]
        assert not run.exists()


def test_a_student_whose_model_init_normalises_otherwise_than_the_studys_loaders_is_refused(
    tmp_path, tiny_teacher_dir, capsys
):
    """Without a teacher a run normalises its images by its model.init's mean/std: alone this student reads
    images normalised by the saved model's (std 0.5), so in the study (whose loaders the first student's
    statistics made, the dataset's std 0.25) it trained on other images than alone, and said nothing."""
    yaml = tmp_path / "study.in.yaml"
    yaml.write_text(
        f"students:\n  - name: plain\n  - name: init\n    model.init: local-dir:{tiny_teacher_dir}\n"
    )
    small = ["model.name=vit_tiny_patch16_224", "data.img_size=32", "model.kwargs.patch_size=8"]
    small += ["model.kwargs.depth=2", "model.kwargs.embed_dim=48", "model.kwargs.num_heads=3"]
    run = tmp_path / "study"
    code, _, err = run_cli(
        capsys,
        "study",
        "-c",
        str(yaml),
        *BASE,
        *small,
        "teacher.spec=null",
        "transfer.mode=none",
        f"run_dir={run}",
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "student 'init': this student normalises its images by mean" in line, err
    assert "set data.mean and data.std for the whole study" in line
    assert not list(run.glob("*/checkpoints/step-*"))


@pytest.mark.parametrize("recipe", [[], ["-c", "convert/demo_study"]], ids=["train", "convert"])
def test_wandb_or_mlflow_in_a_study_of_several_students_is_refused_before_any_work(
    recipe, tmp_path, tiny_teacher_dir, capsys
):
    """W&B and MLflow keep one active run per process: the second student's metrics went into the first
    student's W&B run (and its trackers.json took that run's id), and MLflow stopped at the second start."""
    run = tmp_path / "study"
    code, _, err = run_cli(
        capsys,
        "study",
        *recipe,
        *BASE,
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        f"run_dir={run}",
        "log.trackers=[tensorboard,wandb,mlflow]",
        *([] if recipe else ["--vary", "seed=1,2"]),
    )
    line = err.strip().splitlines()[-1]  # after BASE's log.trackers=[] given twice
    assert code == 2 and line.startswith("attnxfer study: error: log.trackers includes mlflow and wandb"), err
    assert "students would all log into the first one's" in line
    assert not run.exists()


def test_a_students_loss_entry_the_plan_refuses_is_said_with_the_students_name(
    tmp_path, tiny_teacher_dir, capsys
):
    """Students differ in their keys, so a refusal of one student's ``transfer.losses`` entry names it."""
    vary = "transfer.losses=[{name: mse, signal: maps}],[{name: mse, signal: v}]"
    code, _, err = run_cli(
        capsys,
        "study",
        *BASE,
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        f"run_dir={tmp_path}",
        "--vary",
        vary,
    )
    assert code == 2 and err.strip().endswith(
        "error: student 'losses=name-mse,signal-maps': transfer.losses[0]: mse compares q, k, v, not 'maps'"
    ), err


def test_a_study_goes_on_with_its_students_where_vary_writes_the_same_values_otherwise(tmp_path):
    """Started with ``--vary transfer.atd_weight=1,3``, the study goes on under ``1.0,3.0`` (the same numbers
    as YAML reads them) with the students, names and folders it started with; another value, or true for
    1, names other students."""
    folder = tmp_path / "study"
    folder.mkdir()
    started = load_study(None, [f"run_dir={folder}"], {"transfer.atd_weight": ["1", "3"]})
    (folder / "study.json").write_text(json.dumps({"students": started.record()}))
    again = load_study(None, [f"run_dir={folder}"], {"transfer.atd_weight": ["1.0", "3.0"]})
    assert again.record() == started.record() and [s.name for s in again.students] == [
        "atd_weight=1",
        "atd_weight=3",
    ]
    other = load_study(None, [f"run_dir={folder}"], {"transfer.atd_weight": ["1.0", "2.0"]})
    assert [s.name for s in other.students] == ["atd_weight=1.0", "atd_weight=2.0"]
    flags = [Student("on", {"key": "true"}), Student("off", {"key": "false"})]
    (folder / "study.json").write_text(
        json.dumps({"students": [{**vars(s), "folder": s.name} for s in flags]})
    )
    assert names_on_record(folder, [Student("1", {"key": "1"}), Student("0", {"key": "0"})])[0].name == "1"


def test_students_come_from_the_yaml_and_vary_crossed(tmp_path):
    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        "run_dir: somewhere\nstudents:\n  - name: copy\n    transfer.mode: copy\n"
        "  - name: distill\n    transfer: {mode: distill, atd_weight: 3.0}\n"
    )
    spec = load_study(yaml, ["seed=5"], {"optim.lr": ["1e-3", "2e-3"]})
    assert [s.name for s in spec.students] == [
        "copy_lr=1e-3",
        "copy_lr=2e-3",
        "distill_lr=1e-3",
        "distill_lr=2e-3",
    ]
    cfg = spec.config_of(spec.students[2])
    assert (cfg.transfer.mode, cfg.transfer.atd_weight, cfg.optim.lr) == ("distill", 3.0, 1e-3)
    # the data's seed is the study's: students that seed their initialisation otherwise read the same batches
    assert cfg.run_dir == str(Path("somewhere") / "distill_lr=1e-3") and (cfg.seed, cfg.data.seed) == (
        5,
        5,
    )
    # data.seed set: it orders every student's data, whatever seeds the student's initialisation
    seeded = load_study(yaml, ["seed=5", "data.seed=9"], {"seed": ["1", "2"]})
    assert {(c.seed, c.data.seed, data_seed(c)) for _, c in seeded.configs()} == {(1, 9, 9), (2, 9, 9)}
    with pytest.raises(ConfigError, match="which --vary varies too"):
        load_study(yaml, [], {"transfer.mode": ["copy"]})
    yaml.write_text("students:\n  - name: a\n  - name: a\n    seed: 2\n")
    with pytest.raises(ConfigError, match="two students are named 'a'"):
        load_study(yaml)
    # two names, one config (b sets the seed the base has): one run trained twice, which had been accepted
    yaml.write_text("students:\n  - name: a\n  - name: b\n    seed: 0\n  - name: c\n    seed: 2\n")
    with pytest.raises(ConfigError, match="students 'a' and 'b' train the same config"):
        load_study(yaml)
    yaml.write_text("students:\n  - name: a\n    transfer.mode: copy\n    transfer: {mode: distill}\n")
    with pytest.raises(
        ConfigError, match=r"students\[0\] \(a\) gives transfer.mode twice, dotted and nested"
    ):
        load_study(yaml)
    with pytest.raises(ConfigError, match="--vary optim.lr lists '1e-3' twice"):
        load_study(None, [], {"optim.lr": ["1e-3", "3e-3", "1e-3"]})
    # the same number, spelled twice
    with pytest.raises(ConfigError, match="--vary optim.lr lists '0.001' twice"):
        load_study(None, [], {"optim.lr": ["1e-3", "0.001"]})
    yaml.write_text("students:\n  - name: ../up\n")
    with pytest.raises(ConfigError, match="must be a folder name"):
        load_study(yaml)
    for name, suggested in ((".", ")"), ("'a b'", "; e.g. 'a-b')")):  # '.' holds no name to suggest
        yaml.write_text(f"students:\n  - name: {name}\n")
        with pytest.raises(ConfigError, match=r"starting with a letter or digit") as refused:
            load_study(yaml)
        assert str(refused.value).endswith(f"letter or digit{suggested}"), refused.value
    yaml.write_text("students:\n  - name: checkpoints\n")  # the study's own checkpoints folder
    with pytest.raises(ConfigError, match="'checkpoints' is taken by the study's own checkpoints, "):
        load_study(yaml)
    # the report and its figures are written beside the students after they train: refused before any work
    for own in ("study.md", "study.png", "study_report.json", "conversion_study.md"):
        yaml.write_text(f"students:\n  - name: {own}\n")
        with pytest.raises(ConfigError, match=f"'{own}' is taken by the study's own "):
            load_study(yaml)


@pytest.mark.parametrize(
    ("name", "said"),
    [("off", "reads it as the switch False, not a name: quote it"), ("", "has an empty name: give it one")],
)
def test_a_student_name_yaml_reads_as_a_switch_or_nothing_is_refused(name, said, tmp_path):
    """`- name: off` (YAML's switch) or `- name:` would train a student in a folder named False or None."""
    yaml = tmp_path / "s.yaml"
    yaml.write_text(f"students:\n  - name: {name}\n    seed: 2\n  - name: 'on'\n")
    with pytest.raises(ConfigError, match=rf"students\[0\] .*{said}"):
        load_study(yaml)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("studnets:\n  - name: a\n", "unknown key 'studnets'; did you mean 'students'?"),
        ("commnd: train\nstudents:\n  - name: a\n", "unknown key 'commnd'; did you mean 'command'?"),
        (
            "students:\n  - nme: a\n    seed: 2\n",
            r"students\[0\] has no name \(its keys: nme, seed\): give it one",
        ),
    ],
)
def test_a_misspelt_study_key_or_student_name_is_named(text, said, tmp_path):
    """A study file's own keys: `studnets` was an unknown key among the config's sections, with no guess, and
    `nme: a` a student "must be a mapping with a name", which it is."""
    yaml = tmp_path / "s.yaml"
    yaml.write_text(text)
    with pytest.raises(ConfigError, match=said):
        load_study(yaml)


def test_a_studys_folder_or_mae_pretrainings_config_given_as_a_study_is_told_the_file_to_give(tmp_path):
    """-c STUDY (the folder) sent the user to a student's config, which a study refuses; MAE pre-training's config
    was asked for students, or for the teacher its mode needs."""
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.yaml").write_text("students: []\n")
    with pytest.raises(
        ConfigError,
        match=rf"study's folder: attnxfer study takes the whole study's, -c {tmp_path}/study/study.yaml",
    ):
        load_study(tmp_path / "study")
    with pytest.raises(
        ConfigError, match="demo/mae_pretrain is MAE pre-training's config .* run attnxfer pretrain"
    ):
        load_study("demo/mae_pretrain", vary={"optim.lr": ["1e-3", "2e-3"]})


def test_a_study_yaml_reads_back_the_students_that_vary_made(tmp_path):
    """study.yaml (what resumes a study, or writes the report of a study of several ranks) quotes each --vary
    value as the command line gave it, but null as null: read back, a number is the key's number, a list the
    key's list and null None, also for a key that takes a string."""
    vary = {
        "seed": ["1", "2"],
        "transfer.losses": ["[]", "[{name: mse, signal: v}]"],
        "model.global_pool": ["null", "avg"],
        "convert.attention": ["hedgehog", "[softmax,performer]"],  # a name, or one per block
    }
    spec = load_study(None, [f"run_dir={tmp_path}"], vary, command="convert")
    (tmp_path / "study.yaml").write_text(str(spec))
    again = load_study(tmp_path / "study.yaml")
    assert again.configs() == spec.configs() and again.record() == spec.record()


def test_a_students_yaml_values_are_read_as_typed_and_its_base_chain_merges_mappings(tmp_path):
    """A student's ``model.global_pool: ''`` (no pooling) is the string the YAML typed, not a command line's
    empty value (null: the teacher's pooling, the same student as the base); a study's recipe merges
    ``model: {kwargs: ...}`` into its base's as `load_config` does."""
    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        "base: recall/teacher\nmodel:\n  kwargs: {depth: 4}\nstudents:\n"
        "  - {name: none, model.global_pool: ''}\n  - {name: avg, model.global_pool: avg}\n"
    )
    spec = load_study(yaml)
    none, avg = (spec.config_of(s) for s in spec.students)
    assert none.model.global_pool == "" and avg.model.global_pool == "avg"
    assert none.model.kwargs["depth"] == 4 and none.model.kwargs["patch_size"] == 4
    # on a command line `KEY=` is refused (no value), and the error for a word says how to write the empty choice
    with pytest.raises(
        ConfigError, match=r"""'none' is not one of token, .*'' \(none: model.global_pool="''" """
    ):
        load_study(None, ["model.global_pool=none"])


@pytest.mark.parametrize(
    ("vary", "names"),
    [
        ({"transfer.mode": ["copy", "distill"]}, ["copy", "distill"]),
        ({"model.attention": ["hedgehog", "relu_linear"]}, ["hedgehog", "relu_linear"]),
        (
            {"transfer.end_layer": ["0", "-2"], "transfer.atd_weight": ["1", "3"]},
            [
                "end_layer=0_atd_weight=1",
                "end_layer=0_atd_weight=3",
                "end_layer=-2_atd_weight=1",
                "end_layer=-2_atd_weight=3",
            ],
        ),
        (
            {"transfer.mode": ["copy", "distill"], "seed": ["0", "1"]},
            ["copy_seed=0", "copy_seed=1", "distill_seed=0", "distill_seed=1"],
        ),
        ({"transfer.share_drop_path": ["true", "false"]}, ["share_drop_path=true", "share_drop_path=false"]),
        # a list of mappings: its words, without the brackets and braces that would each be a dash
        (
            {"transfer.losses": ["[]", "[{name: mse, signal: v}]", "[{name: mse, signal: v, weight: 0.5}]"]},
            ["losses=", "losses=name-mse,signal-v", "losses=name-mse,signal-v,weight-0.5"],
        ),
        # two keys of one last part: each spelt out whole
        ({"optim.lr": ["1e-3"], "convert.stage1_lr": ["1e-2"], "model.kwargs.lr": ["1"]}, None),
    ],
)
def test_varied_students_are_named_by_their_values_readably(vary, names, tmp_path):
    """A student's folder is what a reader looks for: ``copy``, not ``transfer.mode=copy``; a number or a switch
    keeps its key's last part beside it."""
    if names is None:  # model.kwargs.lr only names: _combinations does not check keys
        from attnxfer.config.study_spec import _combinations

        assert [s.name for s in _combinations(vary)] == ["optim.lr=1e-3_stage1_lr=1e-2_model.kwargs.lr=1"]
        return
    assert [s.name for s in load_study(None, [f"run_dir={tmp_path}"], vary).students] == names


def test_a_study_started_under_the_old_folder_names_goes_on_in_them(tmp_path):
    """A study whose study.json names its students ``transfer.mode=copy`` (as --vary once named them) keeps
    those names, folders and all, when the same command runs again; other students keep the new names."""
    run = tmp_path / "study"
    run.mkdir()
    old = [
        {
            "name": "transfer.mode=copy",
            "overrides": {"transfer.mode": "copy"},
            "folder": "transfer.mode=copy",
        },
        {
            "name": "transfer.mode=distill",
            "overrides": {"transfer.mode": "distill"},
            "folder": "transfer.mode=distill",
        },
    ]
    (run / "study.json").write_text(json.dumps({"students": old}))
    spec = load_study(None, [f"run_dir={run}"], {"transfer.mode": ["copy", "distill"]})
    assert [s.name for s in spec.students] == ["transfer.mode=copy", "transfer.mode=distill"]
    assert spec.record() == old
    assert spec.config_of(spec.students[1]).run_dir == str(run / "transfer.mode=distill")
    other = load_study(None, [f"run_dir={run}"], {"transfer.mode": ["distill", "copy"]})
    assert [s.name for s in other.students] == ["distill", "copy"]  # not the recorded study: its own names


def test_a_varied_path_ending_in_a_slash_leaves_no_dash_before_the_next_keys_part(tmp_path):
    """``local-dir:runs/a/`` (a shell's completion) named ``init=local-dir-runs-a-_seed=0``: each key's part is
    a folder name of its own. A study started under the old names goes on in their folders."""
    vary = {"model.init": ["local-dir:runs/a/", "local-dir:runs/b/"], "seed": ["0"]}
    spec = load_study(None, [f"run_dir={tmp_path / 'new'}"], vary)
    assert [s.name for s in spec.students] == ["init=local-dir-runs-a_seed=0", "init=local-dir-runs-b_seed=0"]
    run = tmp_path / "old"
    run.mkdir()
    old = [
        {
            "name": f"init=local-dir-runs-{x}-_seed=0",
            "overrides": {"model.init": f"local-dir:runs/{x}/", "seed": "0"},
        }
        for x in "ab"
    ]
    (run / "study.json").write_text(json.dumps({"students": [{**e, "folder": e["name"]} for e in old]}))
    resumed = load_study(None, [f"run_dir={run}"], vary)
    assert [s.name for s in resumed.students] == [e["name"] for e in old]


def test_a_study_yaml_is_not_a_run_config(tmp_path, capsys):
    yaml = tmp_path / "s.yaml"
    yaml.write_text("students:\n  - name: copy\n    transfer.mode: copy\n")
    code, _, err = run_cli(capsys, "train", "-c", str(yaml))
    assert code == 2 and "attnxfer study -c" in err and "Traceback" not in err


def test_a_run_config_is_not_a_study_yaml(trained, capsys):
    """`study --report -c RUN/config.yaml` was told to list students in the YAML: the run's own config, which
    is not a study's and must not be edited into one."""
    code, _, err = run_cli(capsys, "study", "--report", "-c", str(trained / "config.yaml"))
    assert code == 2 and f"is the config of the run {trained}, not of a study: it lists no students" in err
    assert "-c STUDY/study.yaml" in err and "list them under students: in the YAML" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "given", [["-c", "{s}/study.yaml"], ["-c", "{s}/config.yaml"], ["-c", "{s}"], ["{s}"]]
)
def test_a_study_folder_given_to_eval_names_its_students_configs(families, given, capsys):
    """A study's folder has no config of its own: its study.yaml runs the whole study, each student's
    config.yaml one run, and the refusal names them."""
    code, _, err = run_cli(capsys, "eval", *(a.format(s=families) for a in given))
    assert code == 2 and "Traceback" not in err, err
    first = sorted(d for d in families.iterdir() if (d / "config.yaml").is_file())[0]
    if given == ["{s}"]:  # the folder as eval takes a run's: its students' folders, as export names them
        assert f"{families} is a study's folder: its students are the runs in it (" in err, err
        return
    assert f"give one student's config: -c {first / 'config.yaml'} or " in err, err
    if given == ["-c", "{s}"]:  # and the study's own file, for the command that takes it
        assert f"(attnxfer study takes the whole study's, -c {families / 'study.yaml'})" in err, err


def test_print_config_shows_each_student_and_what_it_changes(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys,
        "study",
        *BASE,
        f"run_dir={tmp_path / 's'}",
        "--vary",
        "transfer.mode=copy,distill",
        "--print-config",
    )
    assert code == 0 and out.count("\n---\n") == 2 and not (tmp_path / "s").exists()
    assert "# student copy" in out and "transfer.mode: distill -> copy" in out
    assert f"run_dir: {tmp_path / 's' / 'distill'}" in out


def test_print_config_says_only_the_keys_a_student_changes_not_the_data_seed_the_study_writes_out(
    tmp_path, capsys
):
    """Each student's config holds the data seed every student shares written out (seed 3 here): that is no
    change of the student's, so its lines name run_dir and its own keys alone (not data.seed: null -> 3)."""
    argv = ["study", *BASE, "seed=3", f"run_dir={tmp_path / 's'}", "--vary", "seed=3,4", "--print-config"]
    code, out, _ = run_cli(capsys, *argv)
    students = out.split("\n---\n", 1)[1]  # after the base's own lines
    said = [line for line in students.splitlines() if line.startswith("#   ")]
    assert code == 0 and said == [
        f"#   run_dir: {tmp_path / 's'} -> {tmp_path / 's' / 'seed=3'}",
        f"#   run_dir: {tmp_path / 's'} -> {tmp_path / 's' / 'seed=4'}",
        "#   seed: 3 -> 4",
    ], out
    assert out.count("\n  seed: 3\n") == 2, out  # both students' data.seed, written out


@pytest.mark.slow  # a whole study (one step of two students) and its report
def test_a_students_model_name_warning_is_said_once_under_its_name(tmp_path, tiny_teacher_dir, capsys):
    """A student's model.name that the mirrored teacher's architecture replaces is said by that student, once:
    not also unprefixed (as if about the whole study) by the teacher and loaders the study builds from the first
    student's config, nor again by the report that scores it."""
    names = "vit_tiny_patch16_224,vit_small_patch16_224"
    argv = ["study", f"teacher.spec=local-dir:{tiny_teacher_dir}", *tiny_run(16, 8), "schedule.max_steps=1"]
    code, out, err = run_cli(capsys, *argv, f"run_dir={tmp_path / 's'}", "--vary", f"model.name={names}")
    assert code == 0, err[-2000:]
    said = [line for line in (out + err).splitlines() if "is not built" in line]
    assert [line.partition(": warning:")[0] for line in said] == names.split(","), said


@pytest.mark.slow  # a whole study (one step of two students) and its report
def test_a_students_unused_key_warning_is_said_once_when_the_report_follows_its_training(
    tmp_path, tiny_teacher_dir, capsys
):
    """A key a student's plan leaves unused is said as its plan is built for training; the report written right
    after, which builds the plan again to score it, does not say it a second time (a report written alone,
    `--report`, says it once)."""
    argv = ["study", f"teacher.spec=local-dir:{tiny_teacher_dir}", *tiny_run(16, 8), "schedule.max_steps=1"]
    argv += [f"run_dir={tmp_path / 's'}", "--vary", "transfer.logit_temperature=2,3"]
    for extra in ([], ["--report"]):
        code, _, err = run_cli(capsys, *argv, *extra)
        assert code == 0, err[-2000:]
        said = [
            line.partition(": warning:")[0]
            for line in err.splitlines()
            if "warning: transfer.logit_t" in line
        ]
        assert said == ["logit_temperature=2", "logit_temperature=3"], err


@pytest.mark.slow  # a study of two students for one step, then resumed for a second
def test_a_study_resumed_with_a_key_changed_says_the_change_once_for_all_its_students(
    tmp_path, tiny_teacher_dir, capsys
):
    """The study says what changed since its step; each student's resume, judged again as it is built, leaves
    it to the study, as it leaves the re-split global batch."""
    run = tmp_path / "s"
    argv = ["study", f"teacher.spec=local-dir:{tiny_teacher_dir}", *tiny_run(16, 8), "schedule.max_steps=1"]
    assert run_cli(capsys, *argv, f"run_dir={run}", "--vary", "transfer.mode=copy,distill")[0] == 0
    code, out, _ = run_cli(capsys, "study", "-c", str(run / "study.yaml"), "schedule.max_steps=2")
    said = [line for line in out.splitlines() if "changed since" in line]
    assert code == 0 and said == ["resume: changed since step-00000001: schedule.max_steps (1 -> 2)"], out
    # finished, run again with a key a resume may change: nothing trains, and the study's files, which re-run
    # it, keep what its students trained with
    files = {name: (run / name).read_bytes() for name in ("study.yaml", "study.json")}
    code, out, _ = run_cli(capsys, "study", "-c", str(run / "study.yaml"), "optim.lr=0.01")
    assert code == 0 and out.count("nothing to do") == 2, out
    assert {name: (run / name).read_bytes() for name in files} == files


def test_a_students_own_resume_leaves_the_changed_keys_to_its_study(trained, capsys):
    """`judged_resume` with ``say_resume`` False (a study's student) says neither the re-split nor the keys."""
    cfg = load_config(str(trained / "config.yaml"), ["schedule.max_steps=5"])
    for said in (False, True):
        judged_resume(cfg, 1, scoring=False, command="train", say_resume=said)
        assert (
            "resume: changed since step-00000004: schedule.max_steps (4 -> 5)" in capsys.readouterr().out
        ) is said


@pytest.mark.slow
def test_a_student_that_diverges_stops_alone_the_others_go_on_and_the_study_exits_2(
    tmp_path, tiny_teacher_dir, capsys, monkeypatch
):
    """The others train and are reported, but the job ends as `train` does on a non-finite loss (exit 2, one
    line naming the student), not COMPLETED under SLURM; run again, it stays stopped and says so again."""
    run = tmp_path / "study"
    yaml = _study_yaml(
        tmp_path,
        tiny_teacher_dir,
        "students:\n  - name: fine\n  - name: diverges\n    optim.lr: 1.0e+30\n    transfer.atd_weight: 1.0e+30\n",
    )
    code, out, err = run_cli(capsys, "study", "-c", str(yaml), *BASE, f"run_dir={run}")
    assert code == 2 and err.splitlines()[-1].startswith(
        "attnxfer study: error: student 'diverges' stopped: non-fin"
    )
    assert f"attnxfer train -c {run / 'diverges' / 'config.yaml'} with that change" in err, err
    again, out_again, err_again = run_cli(capsys, "study", "-c", str(run / "study.yaml"))
    assert again == 2 and "fine: nothing to do" in out_again and "student 'diverges' stopped" in err_again
    assert "\ndiverges: stopped earlier (non-finite loss" in out_again, out_again
    # `submit --command study` runs the same study as a job, which fails as the command does (not COMPLETED)
    module, name = SUBMITTABLE["study"].split(":")
    with pytest.raises(NonFiniteLossError, match="student 'diverges' stopped"):
        getattr(importlib.import_module(module), name)(load_study(run / "study.yaml"))
    # on every rank of the job, as train's ranks fail: a rank other than 0 knows the stop too
    monkeypatch.setattr("attnxfer.launch.commands.study.is_main", lambda: False)
    with pytest.raises(NonFiniteLossError, match="student 'diverges' stopped"):
        getattr(importlib.import_module(module), name)(load_study(run / "study.yaml"))
    stopped = [line for line in out.splitlines() if line.startswith("diverges: stopped: ")]
    # the students share one 4-step schedule: the study says it once, for all of them
    warned = [line for line in out.splitlines() if line.startswith("warning: this run takes")]
    assert warned == [
        f"warning: this run takes {STEPS} optimiser steps, fewer than 100 (schedule.max_steps={STEPS}): raise "
        "schedule.max_steps for a student that learns (every student of the study)"
    ]
    assert len(stopped) == 1 and "non-finite loss" in stopped[0] and "the others go on" in stopped[0]
    assert ".;" not in stopped[0]  # the error's own full stop is not kept before the clause that follows
    # the students say the same lines in turn: each its own under its name
    plans = [line for line in out.splitlines() if "transfer plan:" in line]
    assert [line.partition(":")[0] for line in plans] == ["fine", "diverges"]
    scores = [line for line in out.splitlines() if "val top1" in line]
    assert scores and all(line.startswith("fine: ") for line in scores)
    record = {s["name"]: s for s in json.loads((run / "study.json").read_text())["students"]}
    assert record["fine"]["step"] == STEPS and record["fine"]["stopped"] is None
    assert "non-finite" in record["diverges"]["stopped"]
    assert ResumePoint.find(run / "fine").step == STEPS
    # its last checkpoint holds no weights trained after the bad step
    kept = ResumePoint.find(run / "diverges")
    assert kept is None or all(torch.isfinite(t).all() for t in kept.load_tensors()["model"].values())


@pytest.mark.slow
def test_a_study_killed_at_any_instant_resumes_to_the_uninterrupted_weights(tmp_path, tiny_teacher_dir):
    """SIGKILL at random instants (inside saves too): the same command goes on from the last step every student
    saved, and every student ends bit-identical to the uninterrupted study's."""
    yaml = _study_yaml(
        tmp_path, tiny_teacher_dir, "students:\n  - name: copy\n    transfer.mode: copy\n  - name: distill\n"
    )
    args = ["study", "-c", str(yaml), *BASE, "checkpoint.every_steps=1", "checkpoint.keep_last=1"]
    ref, t0 = tmp_path / "ref", time.monotonic()
    proc = fork_cli([*args, f"run_dir={ref}"], tmp_path / "ref.log")
    proc.join(180)
    seconds = time.monotonic() - t0
    assert proc.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    rng, resumed = random.Random(3), 0
    for trial in range(3):
        run, log = tmp_path / f"t{trial}", tmp_path / f"t{trial}.log"
        victim = fork_cli([*args, f"run_dir={run}"], log)
        if trial == 2 and not resumed:
            # the random instants may all fall before the first save on a loaded machine: the last trial waits
            # for a committed step of every student (its manifest is written last), then kills at a random
            # instant after it
            while victim.is_alive() and not all(
                any((run / n / "checkpoints").glob(f"step-*/{MANIFEST_NAME}")) for n in ("copy", "distill")
            ):
                time.sleep(0.01)
            victim.join(rng.uniform(0.0, 0.5))
        else:
            victim.join(rng.uniform(0.3, seconds))
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        again = fork_cli([*args, f"run_dir={run}"], log)
        again.join(180)
        assert again.exitcode == 0, log.read_text()[-3000:]
        resumed += "resuming every student from step" in log.read_text()
        for name in ("copy", "distill"):
            assert_same_tensors(_final(run / name), _final(ref / name), f"trial {trial} {name}")
    assert resumed >= 1  # at least one kill landed after a committed step


@pytest.mark.slow
def test_a_study_stopped_after_a_student_diverged_resumes_the_other_to_the_uninterrupted_weights(
    tmp_path, tiny_teacher_dir
):
    """The first student stops (non-finite) at step 2, the study is stopped by SIGTERM after step 3 and run
    again: the one left out of the resumed loop stays stopped, and the other (with drop path: random streams
    of its own) ends bit for bit, metrics too, where it ends in the uninterrupted study."""
    yaml = _study_yaml(
        tmp_path,
        tiny_teacher_dir,
        "students:\n  - name: diverges\n    optim.lr: 1.0e+30\n    transfer.atd_weight: 1.0e+30\n"
        "  - name: fine\n    model.drop_path_rate: 0.2\n",
    )
    args = ["study", "-c", str(yaml), *BASE, "schedule.max_steps=6", "checkpoint.every_steps=1", "device=cpu"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = fork_cli([*args, f"run_dir={ref}"], tmp_path / "ref.log")
    proc.join(180)
    assert proc.exitcode == 2, (tmp_path / "ref.log").read_text()[
        -3000:
    ]  # as train exits on a non-finite loss
    victim = fork_cli([*args, f"run_dir={run}"], tmp_path / "run.log")
    while victim.is_alive() and not (run / "checkpoints" / "step-00000003").is_dir():
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGTERM)
    victim.join()
    recorded = {s["name"]: s for s in json.loads((run / "study.json").read_text())["students"]}
    assert recorded["diverges"]["stopped"] and recorded["fine"]["step"] < 6
    again = fork_cli([*args, f"run_dir={run}"], tmp_path / "run.log")
    again.join(180)
    log = (tmp_path / "run.log").read_text()
    assert again.exitcode == 2 and "study: resuming every student from step" in log, log[-3000:]
    assert "diverges: stopped earlier (non-finite loss" in log
    final = lambda r: load_file(str(r / "fine" / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert_same_tensors(final(run), final(ref), "fine model")
    rows = lambda r: [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in (r / "fine" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(run) == rows(ref)


#: a study of two students on CPU without drop-path (nothing random in a step): the one-process reference of
#: the torchrun tests, whose ranks split its global batch of 16
PARALLEL = [*BASE, "model.drop_path_rate=0", "device=cpu", "--vary", "transfer.mode=copy,distill"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_teacher_dir, one_intra_op_thread):
    """`PARALLEL` in one process (this one, one thread as each rank has) at a batch of 16, uninterrupted."""
    one = tmp_path_factory.mktemp("one") / "one"
    argv = ["study", *PARALLEL, f"teacher.spec=local-dir:{tiny_teacher_dir}", "data.batch_size=16"]
    assert cli.main([*argv, f"run_dir={one}"]) == 0
    return one


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_teacher_dir, one_intra_op_thread):
    """One torchrun launch (two ranks, tests/dist_commands.py) for both torchrun tests, each a command of it:
    `PARALLEL` trained from scratch at 8 images a rank (``two``), then the same study trained 2 steps in this
    process (one thread, as each rank has) at a batch of 16 and resumed on the two ranks to `STEPS` (``moved``,
    with what that resume said). A second launch would cost a launcher and two fresh torch imports again."""
    folder = tmp_path_factory.mktemp("ranks")
    teacher = f"teacher.spec=local-dir:{tiny_teacher_dir}"
    moved = folder / "moved"
    argv = ["study", *PARALLEL, teacher, "data.batch_size=16", f"run_dir={moved}", "schedule.max_steps=2"]
    assert cli.main(argv) == 0
    assert ResumePoint.find(moved).world_size == 1
    _, (out, err) = torchrun_commands(
        ["study", f"run_dir={folder / 'two'}", *PARALLEL, teacher, "data.batch_size=8"],
        ["study", "-c", str(moved / "study.yaml"), f"schedule.max_steps={STEPS}"],
        out=folder / "said",
    )
    return SimpleNamespace(two=folder / "two", moved=moved, moved_out=out, moved_err=err)


@pytest.mark.slow
def test_a_study_under_torchrun_trains_each_student_data_parallel_like_one_process(one_process, two_ranks):
    """Two ranks, each student's DDP over them: the same global batch as one process, the same weights up to
    the order of the gradient sums, and an evaluation that counts every image once."""
    run = two_ranks.two
    for name in ("copy", "distill"):
        state = ResumePoint.find(run / name).state
        assert state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1
        got, want = _final(run / name), _final(one_process / name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
        last, ref = (
            json.loads((r / name / "metrics.jsonl").read_text().splitlines()[-1]) for r in (run, one_process)
        )
        assert last["val_count"] == ref["val_count"] and last["val_top1"] == pytest.approx(ref["val_top1"])


@pytest.mark.slow  # a study on 1 process, resumed on 2 torchrun ranks, against an uninterrupted one
def test_a_study_resumed_on_another_number_of_processes_keeps_its_global_batch_as_train_does(
    one_process, two_ranks
):
    """The study's checkpoint records its processes, so a resume on others is judged as `train` judges one: the
    same command on 2 ranks re-splits its global batch of 16 (8 a rank) and ends where the uninterrupted study
    ends; 3 processes, which cannot share it, are refused with the counts that can."""
    run, stdout, stderr = two_ranks.moved, two_ranks.moved_out, two_ranks.moved_err
    assert f"{run} was trained by 1 process" in stdout and "the global batch stays 16" in stdout
    # said once, for the study: each student's resume keeps the split the study chose, not said again
    assert stdout.count("the global batch stays 16") == 1, stdout
    assert "RNG streams (dropout, drop-path) restart" in stdout and "start afresh" not in stderr
    assert "data.batch_size=8 optim.accum_steps=1" in stdout
    assert ResumePoint.find(run).world_size == 2
    for name in ("copy", "distill"):
        got, want = _final(run / name), _final(one_process / name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"which cannot share a global batch of 16 .*\(1, 2, 4, 8, 16\)"):
        judged_study_point(load_study(run / "study.yaml"), 3)


@pytest.mark.slow
def test_a_study_runs_its_teacher_once_a_batch_for_all_its_students(tmp_path, tiny_teacher_dir, monkeypatch):
    """Three students that each need the teacher (its maps, its logits) pay for one teacher forward per batch;
    each alone pays one per batch too."""
    passes: list[int] = []
    real = pairs.run_teacher

    def counted(teacher, x, needs, layers=None):
        passes.append(x.shape[0])
        return real(teacher, x, needs, layers)

    monkeypatch.setattr(pairs, "run_teacher", counted)
    args = [*BASE, f"teacher.spec=local-dir:{tiny_teacher_dir}", "--vary", "transfer.atd_weight=1,3"]
    assert (
        cli.main(["study", f"run_dir={tmp_path / 's'}", *args, "--vary", "transfer.logit_distill=0,1"]) == 0
    )
    assert len(passes) == STEPS  # 4 students, one teacher forward a step
    passes.clear()
    one = tmp_path / "s" / "atd_weight=1_logit_distill=1"
    assert cli.main(["train", "-c", str(one / "config.yaml"), f"run_dir={tmp_path / 'alone'}"]) == 0
    assert len(passes) == STEPS


@pytest.mark.slow
def test_a_student_after_the_first_with_mixup_and_accumulation_ends_where_it_ends_alone(
    tmp_path, tiny_teacher_dir
):
    """Accumulation steps make the feed prepare each micro-batch once per student: the second student's
    batches were mixed twice, and it ended away from its own run's weights."""
    yaml = _study_yaml(
        tmp_path, tiny_teacher_dir, "students:\n  - name: copy\n    transfer.mode: copy\n  - name: distill\n"
    )
    mixed = [*BASE, "data.kwargs.length=32", "optim.accum_steps=2", "aug.mixup=0.8", "device=cpu"]
    assert cli.main(["study", "-c", str(yaml), *mixed, f"run_dir={tmp_path / 'study'}"]) == 0
    student, alone = tmp_path / "study" / "distill", tmp_path / "alone"
    assert cli.main(["train", "-c", str(student / "config.yaml"), f"run_dir={alone}"]) == 0
    assert_same_tensors(_final(student), _final(alone), "distill model")


@pytest.mark.slow  # a study of two students for two steps, and the second trained alone
def test_a_student_with_a_task_loss_after_a_first_without_one_gets_its_labels_and_ends_where_it_ends_alone(
    tmp_path, tiny_teacher_dir
):
    """The study's loaders were built from its first student's config: one without a task loss
    (transfer.task_weight=0) reads images alone, so the next student's first step stopped on a batch without
    labels, told to set transfer.task_weight=0."""
    run = tmp_path / "study"
    argv = [*BASE, "schedule.max_steps=2", f"teacher.spec=local-dir:{tiny_teacher_dir}", "device=cpu"]
    assert cli.main(["study", *argv, f"run_dir={run}", "--vary", "transfer.task_weight=0,1"]) == 0
    student, alone = run / "task_weight=1", tmp_path / "alone"
    assert cli.main(["train", "-c", str(student / "config.yaml"), f"run_dir={alone}"]) == 0
    last = "checkpoints/step-00000002/model.safetensors"
    assert_same_tensors(load_file(str(student / last)), load_file(str(alone / last)), "task_weight=1 model")


def test_a_batch_fed_again_is_mixed_as_the_first_time_not_mixed_twice():
    """With accumulation steps each student takes its micro-batches in turn, so the study's feed prepares a
    batch once per student: timm's Mixup mixes in place, and on CPU the move to the device kept the loaded
    tensor, so the second student got the first one's mix mixed again (not the batch it gets alone)."""
    mixup = Mixup(mixup_alpha=0.8, num_classes=4)

    def prepare(x: torch.Tensor, y: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        np.random.seed(seed)
        return mixup(x, y)

    first, second = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    labels = torch.arange(4)
    place = BatchPlace(torch.device("cpu"), 3, prepare)
    alone = prepare(first.clone(), labels, 3)[0]
    feed = SharedFeed()
    fed = [
        feed(x, labels, place)[0].clone() for x in (first, second, first)
    ]  # micro-batches 1, 2, then 1 again
    assert torch.equal(fed[0], alone) and torch.equal(fed[2], alone)


@pytest.mark.slow
def test_the_study_benchmark_measures_its_ratios_in_one_run(tmp_path, monkeypatch, capsys):
    """benchmarks/study_step.py on tiny models at its least (2 students, batch 2, no warm-up, one repeat; its
    main in this process): every step it times ran, and its ratios are the medians'."""
    out, k = tmp_path / "bench.json", 2
    argv = ["--quick", "--students", str(k), "--batch", "2", "--warmup", "0", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["study_step.py", *argv, "--json", str(out)])
    threads = torch.get_num_threads()  # the benchmark sets its own (--threads)
    try:
        script_module("study_step", folder="benchmarks").main()
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    s = record["seconds"]
    assert set(s) == {*(f"solo_{i}" for i in range(1, k + 1)), "study", "teacher", "train_1", "study_1"}
    solo = sum(s[f"solo_{i}"] for i in range(1, k + 1))
    assert record["ratios"]["study / solo steps"] == pytest.approx(s["study"] / solo)
    assert record["floor"] == pytest.approx(solo - (k - 1) * s["teacher"])
    assert "study / floor" in capsys.readouterr().out and record["peak_bytes"]["study"] > 0


@pytest.mark.slow
def test_the_report_alone_is_written_and_said_once(families, capsys):
    """``--report`` (the report of a study trained by several ranks, written by one process)."""
    capsys.readouterr()
    assert cli.main(["study", "-c", str(families / "study.yaml"), "--report"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "report ->" in line]
    assert said == [f"study report -> {families / 'study.md'}"]
