"""A study's report (`attnxfer.apps.study.report`): one row per student, scored on the same validation images
and paired with the first student by McNemar's exact test; checked against a recount from per-image
predictions made here, the engine's own top-1, `attnxfer eval`'s k-NN top-1 and the runs' metrics files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import peaked_teacher, tiny_run
from PIL import Image
from scipy.stats import binomtest

from attnxfer.apps.inspect.inspect import inspect_models
from attnxfer.apps.run.evaluation import evaluate_run
from attnxfer.apps.run.parts import build_run_parts
from attnxfer.apps.study.report import (
    STUDY_CURVES,
    STUDY_SCORES,
    StudentScore,
    study_curves_figure,
    write_study_report,
)
from attnxfer.apps.study.report_text import render_study
from attnxfer.checkpoints.run_dir import RunDir
from attnxfer.config import load_config
from attnxfer.errors import InputError, MissingPathError
from attnxfer.launch import cli
from attnxfer.train.metrics import read_metrics
from attnxfer.transfer import TeacherStudent, build_plan

STUDENTS = """\
students:
  - name: copy
    transfer.mode: copy
    transfer.atd_weight: 2.0
  - name: distill
    transfer.mode: distill
    ema.decay: 0.9
  - name: headless
    transfer.mode: distill
    transfer.task_weight: 0
  - name: blowup
    transfer.mode: distill
    optim.lr: 1.0e+30
"""


# ------------------------------------------------------------------------------------------- rendering
def _scored(name: str, correct: np.ndarray | None, score: str | None = "top-1", **kw) -> StudentScore:
    return StudentScore(
        name, {"transfer.mode": name}, Path(name), 10, None, 5.0, score=score, correct=correct, **kw
    )


def test_rows_pair_each_student_with_the_first_by_mcnemar():
    """Rendered from per-image scores alone: b and c are the images exactly one of the two gets right, p is
    the exact binomial test on them, the first row compares with nothing, a stopped row shows why, and a
    k-NN score is never paired with a top-1."""
    rng = np.random.default_rng(0)
    first, other = rng.random(200) < 0.6, rng.random(200) < 0.45
    students = [
        _scored("copy", first, checkpoint="step-10"),
        _scored("distill", other, checkpoint="step-10"),
        _scored("headless", rng.random(200) < 0.5, "k-NN top-1", checkpoint="step-10"),
        StudentScore("blowup", {"optim.lr": 1e30}, Path("blowup"), 3, "non-finite loss | at step 3", None),
    ]
    shared = {"teacher": "t", "dataset": "d", "batch_size": 8, "steps": 10, "shared_seconds": 2.0}
    text, data = render_study(
        students, None, {**shared, "images": 200, "knn": {"k": 20, "temperature": 0.07}}
    )
    rows = {r["name"]: r for r in data["students"]}
    b, c = int((first & ~other).sum()), int((~first & other).sum())
    assert rows["distill"]["vs_first"] == {"b": b, "c": c, "p": binomtest(b, b + c).pvalue}
    assert b + c == int((first != other).sum()) and b != c
    assert rows["copy"]["vs_first"] is None and "not paired" in rows["headless"]["vs_first"]
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| copy | transfer.mode=copy | step-10 | " in lines["| copy"]
    assert lines["| copy"].split(" | ")[4:6] == ["—", "—"]  # b / c and p against itself
    assert f" | {b} / {c} | " in lines["| distill"] and "| k-NN " in lines["| headless"]
    assert "stopped: non-finite loss \\| at step 3" in lines["| blowup"]
    assert lines["| distill"].endswith(" | 0.5 |")  # 5 s over 10 steps
    assert "(data loading and the teacher's pass): 0.2 s" in text
    for r in (rows["copy"], rows["distill"]):
        assert r["low"] <= r["top1"] <= r["high"]


def test_an_unfinished_study_says_how_many_of_its_steps_it_took():
    """A report of a study still training (or stopped) read "33 steps" as if that were the whole run."""
    shared, scored = (
        {"teacher": "t", "dataset": "d", "batch_size": 8, "images": 4},
        [_scored("a", np.ones(4, bool))],
    )
    for steps, total, said in (
        (33, 200, "33 of 200 steps;"),
        (200, 200, " 200 steps;"),
        (33, None, " 33 steps;"),
    ):
        text, _ = render_study(scored, None, {**shared, "steps": steps, "total_steps": total})
        assert said in text, text


def test_a_students_js_below_a_thousandth_and_the_floor_read_in_significant_digits():
    """A well-distilled student's JS and the teacher's noise floor are often below 0.0005: the tables give
    them in three significant digits, not 0.000 (a student's JS equal to the teacher's own)."""
    teacher = peaked_teacher(depth=2)
    near = copy.deepcopy(teacher)
    with torch.no_grad():
        for block in near.blocks:
            block.attn.qkv.weight.add_(1e-3 * torch.randn_like(block.attn.qkv.weight))
    insp = inspect_models(teacher, {"near": near}, torch.randn(4, 3, 32, 32), noise=1e-3)
    js = [r.mean["js"] for r in insp.students["near"]]
    floor = insp.teacher[0].mean["floor_js"]
    assert max(js) < 5e-4 and 0 < floor < 5e-5
    shared = {"teacher": "t", "dataset": "d", "batch_size": 8, "steps": 10, "images": 4}
    text, _ = render_study([_scored("near", np.ones(4, bool), checkpoint="step-10")], insp, shared)
    assert f" | {', '.join(f'{j:.3g}' for j in js)} | " in text
    assert f"| 0 | {floor:.3g} | {js[0]:.3g} / " in text


def test_a_folder_without_a_study_record_is_refused_in_one_line(tmp_path):
    with pytest.raises(MissingPathError, match="has no study.json"):
        write_study_report(tmp_path)
    (tmp_path / "study.json").write_text('{"students": []}')
    with pytest.raises(InputError, match="lists no students"):
        write_study_report(tmp_path)


def test_the_changes_column_shows_a_yaml_students_values_as_yaml_writes_them(tmp_path):
    """A key a students: list sets to null (false, a list) reads as the YAML said it, not as Python prints it."""
    keys = {"model.fc_norm": None, "model.class_token": False, "transfer.losses": [{"name": "mse"}]}
    entry = {"name": "a", "overrides": keys, "folder": "a", "step": 1, "stopped": "x"}
    (tmp_path / "study.json").write_text(json.dumps({"students": [entry], "base": {}}))
    text = write_study_report(tmp_path).read_text()
    assert (
        "| a | model.fc_norm=null, model.class_token=false, transfer.losses=[{name: mse}] | stopped:" in text
    )


def test_a_study_whose_students_all_stopped_still_gets_its_report(tmp_path):
    """Nothing to load or score: each row says why its student stopped, and the curves are drawn empty."""
    entries = [
        {"name": n, "overrides": {}, "folder": n, "step": 1, "stopped": f"{n} went non-finite"}
        for n in ("a", "b")
    ]
    (tmp_path / "study.json").write_text(json.dumps({"students": entries, "base": {}}))
    text = write_study_report(tmp_path).read_text()
    assert "| a | the base config | stopped: a went non-finite |" in text and "| b |" in text
    assert "No student could be scored" in text
    with Image.open(tmp_path / STUDY_CURVES) as img:
        assert img.format == "PNG"


# ------------------------------------------------------------------------------------------- a real study
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_teacher_dir, one_intra_op_thread) -> Path:
    """A study of four students for two steps on synthetic data: copy (with an atd_weight it does not read,
    which it warns of), distillation (with an EMA, which it is scored and drawn by), distillation without a task loss (no head: k-NN), and one whose loss
    blows up at once; then its report."""
    root = tmp_path_factory.mktemp("study")
    (root / "students.yaml").write_text(STUDENTS)
    code = cli.main(
        [
            "study",
            "-c",
            str(root / "students.yaml"),
            *tiny_run(32, 8),
            "schedule.max_steps=2",
            "log.attention_images=0",
            "deterministic=true",
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            "transfer.ce_path=rows",
            f"run_dir={root / 'st'}",
        ]
    )
    assert code == 2  # the student that blew up: the study exits as train does
    write_study_report(root / "st")
    return root / "st"


def _report(study_dir: Path) -> dict:
    return {r["name"]: r for r in json.loads((study_dir / STUDY_SCORES).read_text())["students"]}


def _predictions(folder: Path, parts) -> torch.Tensor:
    """Per-image top-1 hits of a student's best checkpoint, computed here from its model (and, for a copy
    student, its teacher's q and k)."""
    run = RunDir(folder)
    student = run.load_student().model.eval()
    mode = run.record()["mode"]
    model = TeacherStudent(parts.teacher, student, build_plan(parts.teacher, student, mode)).eval()
    hits = []
    with torch.no_grad():
        for x, y in parts.val_loader:
            hits.append(model(x).logits.argmax(-1) == y)
    return torch.cat(hits).numpy()


@pytest.mark.slow
def test_every_student_has_its_row_and_the_stopped_one_says_why(study_dir):
    text = (study_dir / "study.md").read_text()
    rows = _report(study_dir)
    assert list(rows) == ["copy", "distill", "headless", "blowup"]  # study.json's order
    table = [line for line in text.splitlines() if line.startswith("| ") and " / step |" not in line]
    assert [line.split(" | ")[0][2:] for line in table[:4]] == list(rows)
    assert "stopped: non-finite loss" in table[3] and rows["blowup"]["stopped"].startswith("non-finite")
    assert "top1" not in rows["blowup"]
    assert "teacher `local-dir:" in text and "2 steps" in text
    recorded = json.loads((study_dir / "study.json").read_text())["students"]
    assert [entry["total_steps"] for entry in recorded] == [2, 2, 2, 2]  # the blown-up one's plan too
    for entry, line in zip(
        json.loads((study_dir / "study.json").read_text())["students"], table, strict=False
    ):
        seconds = entry.get("seconds")  # the student's own time, where the study recorded it
        want = "—" if entry["stopped"] else "n/a" if seconds is None else f"{seconds / entry['step']:.3g}"
        assert line.endswith(f" | {want} |")


@pytest.mark.slow
def test_a_students_warning_said_again_while_scoring_starts_with_its_name(study_dir, capsys):
    capsys.readouterr()
    write_study_report(study_dir)
    said = [line for line in capsys.readouterr().err.splitlines() if "unused with transfer.mode=copy" in line]
    assert said and all(line.startswith("copy: ") for line in said), said
    # its own atd_weight, not the study's ce_path, which its distilled siblings read (a copy student of the
    # README's study was warned of the distill recipe's keys)
    assert all("transfer.atd_weight=2.0" in line and "transfer.ce_path=rows" not in line for line in said), (
        said
    )


@pytest.mark.slow
def test_top1_and_mcnemar_match_a_recount_from_per_image_predictions(study_dir):
    rows = _report(study_dir)
    cfg = load_config(str(study_dir / "copy" / "config.yaml"))
    parts = build_run_parts(cfg, labels=True)
    hits = {name: _predictions(study_dir / name, parts) for name in ("copy", "distill")}
    for name, hit in hits.items():
        row = rows[name]
        assert row["score"] == "top-1" and row["images"] == len(hit) == 32
        assert row["correct"] == int(hit.sum())
        assert row["low"] <= row["top1"] <= row["high"]
        logged = [r for r in read_metrics(study_dir / name, "val") if r["step"] == row["checkpoint_step"]]
        # the engine's own count agrees (the EMA's, for the student that keeps one and is scored by it)
        assert row["top1"] == pytest.approx(logged[-1][row["curve"]["metric"]])
    assert rows["distill"]["curve"]["metric"] == "ema_val_top1"
    b = int((hits["copy"] & ~hits["distill"]).sum())
    c = int((~hits["copy"] & hits["distill"]).sum())
    assert b + c == int((hits["copy"] != hits["distill"]).sum())
    paired = rows["distill"]["vs_first"]
    assert (paired["b"], paired["c"]) == (b, c)
    assert paired["p"] == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0)
    assert rows["copy"]["vs_first"] is None
    assert "| copy | transfer.mode=copy, transfer.atd_weight=2.0 |" in (study_dir / "study.md").read_text()


@pytest.mark.slow
def test_a_student_without_a_head_gets_knn_top1_as_eval_scores_it(study_dir):
    row = _report(study_dir)["headless"]
    cfg = load_config(str(study_dir / "headless" / "config.yaml"), ["eval.metrics=[knn]"])
    assert row["score"] == "k-NN top-1"
    metrics = evaluate_run(cfg).metrics
    assert row["top1"] == pytest.approx(metrics["knn_top1"])
    assert f"(k={metrics['knn_k']}, T=" in (study_dir / "study.md").read_text()  # the k both voted with
    assert "not paired" in row["vs_first"]  # k-NN against the first student's top-1


@pytest.mark.slow
def test_copy_layers_are_named_copied_and_distilled_layers_measured(study_dir):
    rows = _report(study_dir)
    assert [layer["copied"] for layer in rows["copy"]["layers"]] == [True, True]
    assert all(not layer["copied"] and layer["js"] > 0 for layer in rows["distill"]["layers"])
    text = (study_dir / "study.md").read_text()
    assert "copied: the teacher's own maps in every layer" in text
    assert (study_dir / "study_agreement.png").is_file()


@pytest.mark.slow
def test_the_curves_are_each_students_logged_validation_metric(study_dir):
    """study.png is a PNG, drawn from each student's val rows of its run's own metric: one line per student
    that logged one (the blown-up student logged none)."""
    with Image.open(study_dir / STUDY_CURVES) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]
    rows = _report(study_dir)
    for name in ("copy", "distill", "headless"):
        curve, metric = rows[name]["curve"], rows[name]["curve"]["metric"]
        logged = [r for r in read_metrics(study_dir / name, "val") if metric in r]
        assert curve["steps"] == [r["step"] for r in logged] and curve["values"] == [
            r[metric] for r in logged
        ]
        assert curve["steps"] == [2]
    assert rows["headless"]["curve"]["metric"] == "val_feat_cos_patch"
    students = [
        StudentScore(n, {}, study_dir / n, 2, None, None, metric=r["curve"]["metric"])
        for n, r in rows.items()
    ]
    for s, r in zip(students, rows.values(), strict=True):
        s.curve = (r["curve"]["steps"], r["curve"]["values"])
    fig = study_curves_figure(students)
    lines = {ax.get_ylabel(): [ln.get_label() for ln in ax.get_lines()] for ax in fig.axes}
    assert lines == {
        "val top-1 (%)": ["copy", "distill"],
        "val feature cosine with the teacher": ["headless"],
    }


@pytest.mark.slow
def test_a_study_folder_names_its_students_where_one_run_is_wanted(
    study_dir, tiny_teacher_dir, tmp_path, capsys
):
    """export (and inspect, eval) read one student: the study's folder answers with its students' runs; a train
    into it is refused by what the folder holds, before anything is written."""
    before = sorted(p.relative_to(study_dir) for p in study_dir.rglob("*"))
    capsys.readouterr()
    assert cli.main(["export", str(study_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{study_dir} is a study's folder: its students are the runs in it (" in err
    # the example is the first student that exports alone (copy attends with the teacher's maps)
    assert f"e.g. {study_dir / 'distill'}" in err and not (tmp_path / "out").exists()
    assert cli.main(["study", "--report", f"run_dir={study_dir}"]) == 2  # named by its folder alone
    assert (
        f"; the study in {study_dir} lists its own: -c {study_dir / 'study.yaml'}" in capsys.readouterr().err
    )
    assert cli.main(["eval", "data.dataset=synthetic", f"run_dir={study_dir}"]) == 2
    assert f"{study_dir} is a study's folder: its students are the runs in it (" in capsys.readouterr().err
    assert cli.main(["train", "data.dataset=synthetic", "transfer.mode=none", f"run_dir={study_dir}"]) == 2
    assert "holds a study (study.json), which attnxfer train does not write into" in capsys.readouterr().err
    # as a teacher: a study writes no export, so the advice is the export command of one of its students
    assert cli.main(["train", "data.dataset=synthetic", f"teacher.spec=local-dir:{study_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"{study_dir} is a study's folder of students blowup, copy, " in err
    assert f"`attnxfer export {study_dir / 'blowup'} {study_dir / 'blowup' / 'export'}`" in err
    assert sorted(p.relative_to(study_dir) for p in study_dir.rglob("*")) == before
    # told of a student that is a model alone, not of a copy student first in order (it needs a fine-tune)
    two = tmp_path / "two"
    for name in ("copy", "distill"):
        shutil.copytree(study_dir / name, two / name)
    (two / "study.json").write_text("{}")
    assert cli.main(["train", "data.dataset=synthetic", f"teacher.spec=local-dir:{two}"]) == 2
    assert f"{two} is a study's folder of students copy, distill, each a run folder; distill: " in (
        capsys.readouterr().err
    )
    # Ctrl-C in a study: it goes on from its own checkpoint (the step every student saved; a student's later
    # one is set aside), not "none saved, starts over" nor a student's newest
    import attnxfer.apps.study.study

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, here as the study starts its work

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attnxfer.apps.study.study, "study", ctrl_c)
        assert cli.main(["study", "-c", str(study_dir / "study.yaml")]) == 130
    err = capsys.readouterr().err
    assert f"continues from step 2 ({study_dir / 'checkpoints' / 'step-00000002'})" in err
    # inspect takes the folder as its students, in the study's order
    out = tmp_path / "inspect"
    flags = ["--num-images", "2", "--floor-images", "1", "--batch-size", "2", "--out", str(out)]
    code = cli.main(["inspect", f"local-dir:{tiny_teacher_dir}", str(study_dir), *flags])
    said = capsys.readouterr()
    assert code == 0 and f"{study_dir / 'blowup'}: left out, its student saved no checkpoint" in said.out, (
        said.err
    )
    assert list(json.loads((out / "metrics.json").read_text())["students"]) == ["copy", "distill", "headless"]


def test_a_study_trained_by_several_processes_ends_with_how_its_report_is_written():
    """No rank writes study.md under torchrun or SLURM: `submit --wait` ended with `study -> DIR (study.json)`
    and the hint was in the job's log alone; a convert study's line said `(study.json, None)`."""
    from types import SimpleNamespace

    from attnxfer.launch.commands.study import end_lines

    ranks = SimpleNamespace(students=[], run_dir="runs/st", report=None)
    hint = "; its report, from one process: attnxfer study -c runs/st/study.yaml --report"
    assert end_lines(ranks, converts=False) == [f"study -> runs/st (study.json){hint}"]
    assert end_lines(ranks, converts=True) == [f"study -> runs/st (study.json){hint}"]
    one = SimpleNamespace(students=[], run_dir="runs/st", report=Path("runs/st/conversion_study.md"))
    assert end_lines(one, converts=True) == ["study -> runs/st (study.json, conversion_study.md)"]
