"""A convert study: K efficient attentions converted from one teacher in one job (stage 1 in lock step on one
teacher pass a batch, stage 2 as a training study), each student ending with exactly the stage-1 and stage-2
weights `attnxfer convert` gives it alone; its folder laid out as a conversion's; a comparison of the students;
a re-run with nothing left to do; a study cut short in stage 1 with its students at different steps going on
to the same weights."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    assert_same_tensors,
    on_each_line,
    run_cli,
    script_main,
    script_module,
    tiny_convert_report,
    tiny_run,
    torchrun_attnxfer,
)
from safetensors.torch import load_file

from attnxfer.apps.convert import conversion_study as study_app
from attnxfer.apps.convert.conversion_study import convert_study
from attnxfer.apps.run.uncertainty import mcnemar
from attnxfer.config import ConfigError
from attnxfer.config.study_spec import load_study
from attnxfer.launch import cli
from attnxfer.train import stage1
from attnxfer.train.distributed import DistributedInfo
from attnxfer.train.stop import StopRequested

ROOT = Path(__file__).resolve().parents[2]

STAGE1, STAGE2 = 4, 3
BASE = [
    *tiny_run(64, 16),
    f"convert.stage1_steps={STAGE1}",
    f"schedule.max_steps={STAGE2}",
    "transfer.mode=distill",
    "transfer.logit_distill=1.0",
    "transfer.ce_path=rows",
    "deterministic=true",
    "log.every_steps=1",
    "checkpoint.every_steps=2",
    *tiny_convert_report(2, 4),
    "convert.speed_sweep=[]",
]
#: two attentions that differ in what stage 1 fits (new feature maps; q/k rows with an output loss, which
#: widens the teacher's shared pass by its attention outputs) and in their seed
STUDENTS = """
students:
  - name: hedgehog
    convert.attention: hedgehog
  - name: performer
    convert: {attention: performer, stage1_train: qk, output_mse: 0.1}
    seed: 3
"""
NAMES = ("hedgehog", "performer")
# hundreds of tiny ops a step: a second intra-op thread only waits for a core on a busy machine
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _study_args(folder: Path, teacher: Path, run: Path) -> list[str]:
    yaml = folder / "study.in.yaml"
    yaml.write_text(f"teacher:\n  spec: local-dir:{teacher}\n{STUDENTS}")
    return ["study", "--command", "convert", "-c", str(yaml), *BASE, f"run_dir={run}"]


def _weights(run: Path, stage: str, group: str = "model") -> dict[str, torch.Tensor]:
    step = STAGE1 if stage == "stage1" else STAGE2
    return load_file(str(run / stage / "checkpoints" / f"step-{step:08d}" / f"{group}.safetensors"))


#: the teacher passes of the `study` fixture's run: (blocks, signals) of each call, through the study's shared
#: pass ("study") and through a student's own stage 1 ("own")
TEACHER_PASSES: dict[str, list[tuple[int, ...]]] = {"study": [], "own": []}


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_teacher_dir):
    """The study of `STUDENTS` run once, its teacher passes counted into `TEACHER_PASSES` as it runs (a
    pass-through: the counting changes nothing it computes)."""

    def counted(where, real):
        def teacher_signals(teacher, x, layers, fields):
            TEACHER_PASSES[where].append((len(layers), len(fields)))
            return real(teacher, x, layers, fields)

        return teacher_signals

    folder = tmp_path_factory.mktemp("convert-study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study_app, "teacher_signals", counted("study", study_app.teacher_signals))
        patch.setattr(stage1, "teacher_signals", counted("own", stage1.teacher_signals))
        assert cli.main(_study_args(folder, tiny_teacher_dir, folder / "study")) == 0
    return folder / "study"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_student_ends_with_the_weights_it_converts_to_alone(study, name, tmp_path):
    """Bit for bit (fp32 CPU): stage 1 on the study's shared teacher pass, stage 2 in the training study; the
    student's folder is a conversion's, which `attnxfer convert` of its config.yaml reproduces."""
    student = study / name
    assert {"config.yaml", "report.json", "report.md", "stage1", "stage2"} <= {
        p.name for p in student.iterdir()
    }
    alone = tmp_path / "alone"
    assert cli.main(["convert", "-c", str(student / "config.yaml"), f"run_dir={alone}"]) == 0
    assert_same_tensors(_weights(student, "stage1"), _weights(alone, "stage1"), f"{name} stage 1")
    for group in ("model", "optimizer"):
        assert_same_tensors(
            _weights(student, "stage2", group), _weights(alone, "stage2", group), f"{name} stage 2"
        )
    ours, theirs = (json.loads((p / "report.json").read_text()) for p in (student, alone))
    assert ours["stage1"]["history"] == theirs["stage1"]["history"]
    assert ours["top1"] == theirs["top1"] and ours["agreement"] == theirs["agreement"]


@pytest.mark.slow
def test_the_comparison_has_a_row_per_attention_with_one_teacher_timing(study):
    rows = json.loads((study / "conversion_study.json").read_text())["students"]
    reports = {n: json.loads((study / n / "report.json").read_text()) for n in NAMES}
    assert [(r["name"], r["attention"], r["stage"]) for r in rows] == [
        ("hedgehog", "hedgehog", "after_stage2"),
        ("performer", "performer", "after_stage2"),
    ]
    for row in rows:
        report = reports[row["name"]]
        assert row["top1"] == report["top1"]["after_stage2"] and row["val_size"] == 64
        assert row["knn_top1"] == report["knn"]["after_stage2"]["knn_top1"]
        assert row["feat_cos_patch"] == report["features"]["after_stage2"]["feat_cos_patch"]
        assert [v for *_, v in row["agreement"]["end_to_end"]] == [
            r["after_stage2"] for r in report["agreement"]["end_to_end"]
        ]
        assert row["speed"]["speedup"] == report["speed"]["speedup"]
        # which val images it got right, recorded so that students can be paired: they add up to its top-1
        hits = report["val_hits"]["after_stage2"]
        assert len(hits) == 64 and 100 * hits.count("1") / 64 == pytest.approx(row["top1"])
    # the teacher and the floor were timed once, in the same calls as both students
    teacher = {r["speed"]["teacher_ms"] for r in rows} | {r["speed"]["teacher_ms"] for r in reports.values()}
    floor = {r["speed"]["floor_ms"] for r in rows}
    assert len(teacher) == 1 and len(floor) == 1
    md = (study / "conversion_study.md").read_text()
    for row in rows:
        s = row["speed"]
        assert (
            f"| {row['name']} ({row['attention']}) | {s['student_ms']:.2f} | {s['student_images_per_s']:.1f} |"
            in md
        )
        assert f"| {row['name']} | {row['attention']} | after stage 2 | {row['top1']:.2f} |" in md
    # the floor is called a ceiling only where it timed faster than the teacher (not on a loaded machine)
    ceiling = " (ceiling)" if rows[0]["speed"]["floor_over_teacher"] >= 1 else ""
    assert f"| floor{ceiling} | " in md and "| block | hedgehog (hedgehog) | performer (performer) |" in md
    best = max(rows, key=lambda r: r["top1"])["name"]
    assert f"McNemar's exact test against {best}" in md and "| the best |" in md
    # --report writes it again from the students' reports alone, training and measuring nothing
    (study / "conversion_study.md").unlink()
    assert cli.main(["study", "-c", str(study / "study.yaml"), "--report"]) == 0
    assert (study / "conversion_study.md").read_text() == md


def test_the_pareto_script_draws_a_study_and_pairs_its_students_on_their_val_hits(study, tmp_path, capsys):
    """scripts/recall_pareto.py (docs/choosing-attention.md's figures) reads conversion_study.json as the study
    writes it: a figure, and each student's McNemar counts against another from the two reports' val hits.
    Its main() runs here (script_main), not in a new interpreter: a fresh torch import is most of its cost."""
    out = tmp_path / "pareto.png"
    code, printed, err = script_main(
        capsys, script_module("recall_pareto"), str(study), "--against", "hedgehog", "--out", str(out)
    )
    assert code == 0, err
    assert out.stat().st_size > 10_000
    hits = {n: json.loads((study / n / "report.json").read_text())["val_hits"]["after_stage2"] for n in NAMES}
    paired = mcnemar(*([c == "1" for c in hits[n]] for n in ("performer", "hedgehog")))
    line = next(ln for ln in printed.splitlines() if ln.split()[0] == "performer")
    assert f"vs hedgehog: {paired.only_a}/{paired.only_b} p " in line
    # the tiny students may agree on every image (0/0 reads the same either way round): the same study with
    # val hits that differ, 3 images only performer gets right and 1 only hedgehog, printed in that order
    crafted = tmp_path / "crafted"
    for name in NAMES:
        (crafted / name).mkdir(parents=True)
        for file in ("config.yaml", "report.json"):
            shutil.copy(study / name / file, crafted / name / file)
    table = json.loads((study / "conversion_study.json").read_text())
    n = len(table["students"][0]["val_hits"])
    made = {"performer": "1110" + "1" * (n - 4), "hedgehog": "0001" + "1" * (n - 4)}
    for row in table["students"]:
        row["val_hits"] = made[row["name"]]
    (crafted / "conversion_study.json").write_text(json.dumps(table))
    args = [str(crafted), "--against", "hedgehog", "--out", str(tmp_path / "crafted.png")]
    code, printed, err = script_main(capsys, script_module("recall_pareto"), *args)
    assert code == 0, err
    assert " vs hedgehog: 3/1 p " in next(ln for ln in printed.splitlines() if ln.split()[0] == "performer")


def test_the_pareto_script_pairs_students_of_two_studies_only_on_the_same_val_images(study, tmp_path, capsys):
    """--against across studies whose val images differ (another data seed, another recall task of as many
    images) is refused in one line naming what differs: McNemar on other images is a wrong test, not an error."""
    other = tmp_path / "other"
    shutil.copytree(study, other)
    table = json.loads((other / "conversion_study.json").read_text())
    for row in table["students"]:
        (other / row["name"]).rename(other / f"o_{row['name']}")
        row["name"] = f"o_{row['name']}"
    (other / "conversion_study.json").write_text(json.dumps(table))
    args = [str(study), str(other), "--against", "hedgehog", "--out"]
    code, _, err = script_main(capsys, script_module("recall_pareto"), *args, str(tmp_path / "same.png"))
    assert code == 0 and (tmp_path / "same.png").is_file(), err
    config = other / "o_hedgehog" / "config.yaml"
    config.write_text(re.sub(r"(?m)^  seed: (\d+)$", "  seed: 12345", config.read_text()))
    code, _, err = script_main(capsys, script_module("recall_pareto"), *args, str(tmp_path / "other.png"))
    assert code != 0 and "Traceback" not in err, err
    assert f"which {study} and {other} make differently: data.seed " in err
    assert err.strip().endswith(" vs 12345") and not (tmp_path / "other.png").exists()


def test_the_pareto_script_given_a_folder_without_the_study_table_says_what_to_give_it(tmp_path, capsys):
    """A folder that is not a finished convert study (a running one, a typo): one line naming the file it
    lacks and the command that writes it, where the script met a FileNotFoundError traceback."""
    code, _, err = script_main(
        capsys, script_module("recall_pareto"), str(tmp_path), "--out", str(tmp_path / "pareto.png")
    )
    assert code == 2 and "Traceback" not in err, err
    assert f"{tmp_path} holds no conversion_study.json" in err.strip().splitlines()[-1]
    assert "attnxfer study --report" in err and not (tmp_path / "pareto.png").exists()


def test_the_pareto_script_marks_a_speed_the_report_withheld(tmp_path, monkeypatch, capsys):
    """A student whose report withheld its speed-up (rounds on both sides of 1) is drawn hollow and named as
    withheld in the legend, its point and the printed table with the report's reason: not a plain point."""
    pareto = script_module("recall_pareto")
    why = "over 5 interleaved rounds at 64 px the student ran at 0.91x to 1.12x the teacher's speed"
    students = [
        {"name": name, "report": "r", "attention": name, "top1": 90.0, "val_size": 100, "speed": speed}
        for name, speed in (
            ("hedgehog", {"speedup": 2.0}),
            ("window_linear", {"speedup": 1.02, "speedup_withheld": why}),
        )
    ]
    (tmp_path / "conversion_study.json").write_text(json.dumps({"students": students}))
    (tmp_path / "hedgehog").mkdir()
    (tmp_path / "hedgehog" / "report.json").write_text("{}")
    drawn = {p["name"]: p for p in pareto.points(tmp_path, None)}
    assert drawn["window_linear"]["withheld"] == why and drawn["hedgehog"]["withheld"] is None
    assert all(
        p["withheld"] is None for p in pareto.points(tmp_path, {"hedgehog": 2.1, "window_linear": 1.3})
    )
    left, zoomed = pareto.draw(list(drawn.values()), None, "x", "t").axes
    faces = {c.get_label(): c.lines[0].get_markerfacecolor() for c in left.containers}
    assert faces["single attention, speed withheld (median drawn)"] == "none", faces
    assert faces["single attention"] != "none" and left.get_legend() is not None
    assert "window_linear (speed withheld)" in [t.get_text() for t in zoomed.texts]
    monkeypatch.setattr(sys, "argv", ["recall_pareto.py", str(tmp_path), "--out", str(tmp_path / "p.png")])
    pareto.main()
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[0] == "window_linear")
    assert line.endswith(f"speed withheld: {why}")


@pytest.mark.slow
def test_a_finished_study_run_again_has_nothing_to_do(study, capsys):
    """study.yaml runs it again as a convert study: both stages at their ends, so nothing trains, no checkpoint
    is written, and each report stands as measured (measuring again would only move its speed figures)."""
    checkpoints = sorted(p for p in study.rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in checkpoints}
    reports = {p: p.read_bytes() for p in study.glob("*/report.*")}
    capsys.readouterr()
    assert cli.main(["study", "-c", str(study / "study.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("has run both stages to their ends") == 2 and "its report stands unchanged" in out
    assert "stage 1 step" not in out and "val top1" not in out and "after stage 2:" not in out
    assert sorted(study.rglob("*.safetensors")) == checkpoints
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == before
    assert len(reports) == 4 and {p: p.read_bytes() for p in reports} == reports


@pytest.mark.slow
def test_a_study_cut_short_in_stage_1_goes_on_to_the_same_weights(
    study, tmp_path, tiny_teacher_dir, capsys, monkeypatch
):
    """Cut short after hedgehog saved stage 1's step 2 and before performer did: the re-run fits performer
    from step 0 alone until the stream reaches hedgehog's batch, then both together; both end as the
    uninterrupted study's students. The reports count the attempt cut short (its stage-1 clock runs a minute a
    reading): hedgehog's stage 1 is resumed, and the study's time holds its stage 1."""

    class Cut(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith(f"performer: stage 1 step 2/{STAGE1}"):
            raise Cut(line)

    run = tmp_path / "study"
    args = _study_args(tmp_path, tiny_teacher_dir, run)
    spec = load_study(args[4], [*BASE, f"run_dir={run}"], command="convert")
    with monkeypatch.context() as slow_clock, pytest.raises(Cut), on_each_line(log):
        slow_clock.setattr(stage1, "time", SimpleNamespace(monotonic=itertools.count(0, 60).__next__))
        convert_study(spec)
    assert (run / "hedgehog" / "stage1" / "checkpoints" / "step-00000002").is_dir()
    assert not (run / "performer" / "stage1" / "checkpoints").exists()
    capsys.readouterr()
    assert cli.main(["study", "-c", str(run / "study.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"hedgehog: stage 1: resumed from {run / 'hedgehog' / 'stage1'}" in out and "(step 2 of 4)" in out
    assert "performer: stage 1 step 1/4" in out and "hedgehog: stage 1 step 3/4" in out
    for name in NAMES:
        for stage in ("stage1", "stage2"):
            assert_same_tensors(_weights(run / name, stage), _weights(study / name, stage), f"{name} {stage}")
    reports = {name: json.loads((run / name / "report.json").read_text()) for name in NAMES}
    assert reports["hedgehog"]["stage1"]["resumed"] and not reports["performer"]["stage1"]["resumed"]
    stage1_s = reports["hedgehog"]["seconds"]["stage1"]
    total = float(
        re.search(r"- time: (\d+) s for the whole study", (run / "conversion_study.md").read_text())[1]
    )
    assert stage1_s >= 60 and total >= stage1_s - 0.5


@pytest.mark.slow
def test_a_stop_signal_in_stage_1_saves_every_student_and_the_study_goes_on(
    study, tmp_path, tiny_teacher_dir
):
    """SIGTERM during stage 1 (as SLURM sends before a preemption): the round ends, every student saves the
    step it reached, the study stops; run again, it ends as the uninterrupted study."""

    def log(line: str) -> None:
        if line.startswith("hedgehog: stage 1 step 1/"):
            os.kill(os.getpid(), signal.SIGTERM)  # read once the round is over

    run = tmp_path / "study"
    args = _study_args(tmp_path, tiny_teacher_dir, run)
    spec = load_study(args[4], [*BASE, f"run_dir={run}"], command="convert")
    with pytest.raises(StopRequested) as stop, on_each_line(log):
        convert_study(spec)
    # named as the study's, not as its first student's alone
    assert stop.value.step == 1 and stop.value.checkpoint == f"every student's, in {run}"
    for name in NAMES:
        assert (run / name / "stage1" / "checkpoints" / "step-00000001").is_dir()
    assert cli.main(["study", "-c", str(run / "study.yaml")]) == 0
    for name in NAMES:
        for stage in ("stage1", "stage2"):
            assert_same_tensors(_weights(run / name, stage), _weights(study / name, stage), f"{name} {stage}")


@pytest.mark.slow
def test_a_student_whose_stage_1_ends_first_is_saved_complete_before_the_others_end(
    tmp_path, tiny_teacher_dir, capsys
):
    """A kill after the short fit's last step and before the long one's end: the short fit's stage 1 is on disk,
    complete, and the re-run fits only the long one."""

    class Cut(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith("long: stage 1 step 3/4"):
            raise Cut(line)

    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        f"teacher:\n  spec: local-dir:{tiny_teacher_dir}\nstudents:\n  - name: short\n"
        "    convert.stage1_steps: 2\n  - name: long\n"
    )
    run = tmp_path / "study"
    spec = load_study(yaml, [*BASE, "convert.attention=hedgehog", f"run_dir={run}"], command="convert")
    with pytest.raises(Cut), on_each_line(log):
        convert_study(spec)
    assert (run / "short" / "stage1" / "checkpoints" / "step-00000002").is_dir()
    capsys.readouterr()
    assert cli.main(["study", "-c", str(run / "study.yaml")]) == 0
    out = capsys.readouterr().out
    assert "long: stage 1 step 4/4" in out and "short: stage 1 step" not in out


@pytest.mark.slow
def test_a_student_whose_stage_1_diverges_stops_alone_and_the_others_go_on(
    tmp_path, tiny_teacher_dir, capsys
):
    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        f"teacher:\n  spec: local-dir:{tiny_teacher_dir}\nstudents:\n  - name: fine\n"
        "  - name: diverges\n    convert.output_mse: 1.0e+300\n"  # inf in fp32: a non-finite stage-1 loss
    )
    run = tmp_path / "study"
    base = [*BASE, "convert.stage1_steps=2", "schedule.max_steps=1", "convert.attention=hedgehog"]
    assert cli.main(["study", "--command", "convert", "-c", str(yaml), *base, f"run_dir={run}"]) == 2
    out, err = capsys.readouterr()
    assert "attnxfer study: error: student 'diverges' stopped: stage 1: non-finite" in err, err
    # said under its name, as its other lines are, once when it stops (the summary at the end says it again)
    stopped = [line for line in out.splitlines() if line.endswith("; the others go on")]
    assert len(stopped) == 1 and stopped[0].startswith("diverges: stopped: stage 1: non-finite"), stopped
    fine, diverges = (json.loads((run / n / "report.json").read_text()) for n in ("fine", "diverges"))
    assert "stopped" not in fine and isinstance(fine["top1"]["after_stage2"], float)
    assert "non-finite" in diverges["stopped"] and diverges["stage2"]["stopped"] == diverges["stopped"]
    assert diverges["top1"]["after_stage1"] is None and diverges["top1"]["after_stage2"] is None
    assert not (run / "diverges" / "stage2" / "checkpoints").exists()
    rows = json.loads((run / "conversion_study.json").read_text())["students"]
    assert [(r["name"], r["stage"], r["stopped"] is None) for r in rows] == [
        ("fine", "after_stage2", True),
        ("diverges", "before_stage1", False),
    ]
    assert "- diverges stopped early: stage 1: non-finite" in (run / "conversion_study.md").read_text()


@pytest.mark.slow  # a convert study on 2 gloo ranks: ~25 s
def test_every_rank_of_a_study_whose_student_diverges_exits_as_the_main_rank_does(tmp_path, tiny_teacher_dir):
    """As train's ranks do: rank 0 refuses (exit 2, naming the student) and the other rank exits 2 too, not 0
    (a launcher or SLURM that reads any rank's code would see a study that succeeded)."""
    yaml = tmp_path / "s.yaml"
    yaml.write_text(
        f"teacher:\n  spec: local-dir:{tiny_teacher_dir}\nstudents:\n  - name: fine\n"
        "  - name: diverges\n    convert.output_mse: 1.0e+300\n"
    )
    base = [*BASE, "convert.stage1_steps=2", "schedule.max_steps=1", "convert.attention=hedgehog"]
    argv = ["study", "--command", "convert", "-c", str(yaml), *base, "data.batch_size=8", "device=cpu"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "MASTER_PORT": str(port)}
    env |= {"MASTER_ADDR": "127.0.0.1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "attnxfer", *argv, f"run_dir={tmp_path / 'study'}"],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errs = [rank.communicate(timeout=300)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], errs[1][-2000:]
    assert "error: student 'diverges' stopped: stage 1: non-finite" in errs[0], errs[0][-2000:]


def test_the_teacher_runs_once_a_stage_1_batch_for_every_student(study):
    """Stage 1 of two students: one teacher pass a batch, for both (and none of their own). Counted in the
    `study` fixture's run, which the other tests read: no study of its own."""
    # both blocks; the input, q and k for both, the attention's output for performer's output loss
    assert TEACHER_PASSES == {"study": [(2, 4)] * STAGE1, "own": []}


@pytest.mark.slow
def test_a_study_under_torchrun_converts_each_student_as_it_converts_alone_there(
    study, tmp_path, tiny_teacher_dir
):
    """Two ranks, each stage of each student data parallel over them: a student ends bit for bit as
    `attnxfer convert` of it alone under torchrun, and its stage 1 as in the one-process study on the same global
    batch (the fixture) up to the order of the gradient sums."""
    run, alone = tmp_path / "two", tmp_path / "alone"
    torchrun_attnxfer(*_study_args(tmp_path, tiny_teacher_dir, run), "data.batch_size=8", "device=cpu")
    torchrun_attnxfer("convert", "-c", str(run / "hedgehog" / "config.yaml"), f"run_dir={alone}")
    for stage in ("stage1", "stage2"):
        assert_same_tensors(_weights(run / "hedgehog", stage), _weights(alone, stage), f"hedgehog {stage}")
    for name in NAMES:
        got, want = _weights(run / name, "stage1"), _weights(study / name, "stage1")
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{name} stage 1 {k}")
    assert (run / "conversion_study.md").is_file()


def test_a_key_every_convert_student_shares_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "study"
    for vary in ("convert.stage1_batch_size=8,16", "convert.speed_repeats=2,3", "data.batch_size=8,16"):
        argv = ["study", "--command", "convert", *BASE, f"run_dir={run}", "--vary", "convert.attention=a,b"]
        code = cli.main([*argv, "--vary", vary])
        err = capsys.readouterr().err.strip().splitlines()
        key = vary.split("=")[0]
        assert code == 2 and len(err) == 1 and key in err[0] and "every student of a study shares" in err[0]
        assert not run.exists()
    # a training study does not read the convert section: its students may set those keys
    spec = load_study(None, [f"run_dir={run}"], {"convert.stage1_batch_size": ["8", "16"]})
    assert spec.command == "train"


def test_a_key_a_student_leaves_unread_is_warned_about_once_under_its_name(
    tmp_path, tiny_teacher_dir, capsys
):
    """The study's teacher and loaders are built around the teacher's copy, not as a whole first student,
    whose build warned too (unnamed) before each student's own said it under its name."""
    base = [*BASE, f"teacher.spec=local-dir:{tiny_teacher_dir}", "convert.attention=hedgehog"]
    spec = load_study(None, [*base, f"run_dir={tmp_path}"], {"convert.speedup": ["1.2", "1.3"]}, "convert")
    study_app._ConvertStudy.build(spec, DistributedInfo.from_environment())
    warned = capsys.readouterr().err.splitlines()
    assert [line.split(": warning: convert.speedup=")[0] for line in warned] == ["speedup=1.2", "speedup=1.3"]


def test_a_refusal_of_the_parts_every_student_shares_is_the_studys_not_its_first_students(
    tmp_path, tiny_teacher_dir, capsys
):
    """The teacher and the data are every student's: their refusal is said as the study's, not as the first
    student's (whose own keys a reader would then look through in vain)."""
    for keys, said in (
        (["data.kwargs.bogus=1"], "dataset 'synthetic' has no option(s) bogus (data.kwargs)"),
        (["teacher.spec=local-dir:/nowhere"], "local-dir:/nowhere: /nowhere does not exist"),
    ):
        code, _, err = run_cli(capsys, *_study_args(tmp_path, tiny_teacher_dir, tmp_path / "run"), *keys)
        assert code == 2 and err.strip().startswith(f"attnxfer study: error: {said}"), err


def test_a_study_yaml_names_its_command_and_a_flag_that_disagrees_is_refused(tmp_path):
    yaml = tmp_path / "s.yaml"
    yaml.write_text("command: convert\nstudents:\n  - name: a\n    convert.attention: hedgehog\n")
    spec = load_study(yaml)
    assert spec.command == "convert" and "command: convert\nstudents:" in str(spec)
    again = tmp_path / "again.yaml"
    again.write_text(str(spec))
    assert load_study(again).command == "convert"
    with pytest.raises(ConfigError, match="drop --command"):
        load_study(yaml, command="train")
    yaml.write_text("command: pretrain\nstudents:\n  - name: a\n")
    with pytest.raises(ConfigError, match="not a study's command"):
        load_study(yaml)


def test_each_student_is_paired_with_the_best_on_the_images_exactly_one_of_them_got_right():
    """The comparison's McNemar column, against counts made by hand; reports without per-image hits (written
    before they were recorded) give no column rather than a wrong one."""
    from scipy.stats import binomtest

    from attnxfer.apps.convert.comparison import paired_with_best

    rows = [
        {"name": "a", "top1": 50.0, "val_hits": "1100110000"},
        {"name": "b", "top1": 70.0, "val_hits": "1111110100"},
        {"name": "c", "top1": 40.0, "val_hits": "0011000011"},
    ]
    paired = paired_with_best(rows)
    assert paired["best"] == "b" and paired["b"] == "the best"
    # a vs b: a alone right on none, b alone on images 2, 3, 7 -> 0 / 3
    assert paired["a"] == f"0 / 3, p {binomtest(0, 3, 0.5).pvalue:.3f}"
    # c vs b: c alone right on images 8, 9; b alone on 0, 1, 4, 5, 7 -> 2 / 5
    assert paired["c"] == f"2 / 5, p {binomtest(2, 7, 0.5).pvalue:.3f}"
    assert paired_with_best([{**r, "val_hits": None} for r in rows]) is None
    # a tie for the best top-1: the first listed is the reference, and says whom it ties with
    tie = paired_with_best([*rows, {"name": "d", "top1": 70.0, "val_hits": "1111110001"}])
    assert tie["b"] == "the best (tied with d)" and tie["d"].startswith("1 / 1, p ")


def test_the_comparison_shows_each_students_speed_over_the_sweep_and_says_why_a_side_is_missing(tmp_path):
    """Sides whose speed was measured, a side one student cannot run at (a fixed-length attention) named
    with its reason; the rows go into conversion_study.json as they are (JSON keys are strings). The header
    gives the students' stage-1 steps, each student's own (not the first's)."""
    from attnxfer.apps.convert.comparison import COMPARISON_DATA, write_conversion_comparison

    def report(name: str, rows, skipped) -> dict:
        speed = {"speedup": 2.0, "student_ms": 1.0, "student_images_per_s": 8.0, "student_over_floor": 0.5}
        speed |= {"teacher_ms": 2.0, "teacher_images_per_s": 4.0, "floor_ms": 0.5, "floor_images_per_s": 16.0}
        speed |= {"floor_over_teacher": 4.0, "break_even": 128, "batch": 8, "input": [3, 128, 128]}
        speed |= {"tokens": 1024, "device": "cpu", "threads": 1, "precision": "fp32", "repeats": 1}
        speed["sweep"] = {"rows": rows, "skipped": skipped}
        return {
            "run_dir": str(tmp_path / name),
            "teacher": {"spec": "local-dir:teacher"},
            "student": {"attention": [name, name]},
            "top1": {"teacher": 99.0, "after_stage2": 90.0},
            "data": {"val_size": 10, "dataset": "recall", "agreement_images": 4},
            "features": {"after_stage2": {"feat_cos_patch": 0.9}},
            "agreement": {"teacher_input": [], "end_to_end": []},
            "stage1": {"steps": 1, "batch_size": 4},
            "stage2": {"steps": 1},
            "seconds": {"total": 1.0},
            "speed": speed,
        }

    def row(side: int, tokens: int, ratio: float) -> dict:
        return {
            "resolution": side,
            "tokens": tokens,
            "student_over_teacher": ratio,
            "floor_over_teacher": 5.0,
        }

    why = "linformer was built for seq_len=1024 tokens but got 4096"
    reports = {
        "relu_linear": report("relu_linear", [row(128, 1024, 1.6), row(256, 4096, 6.6)], []),
        "linformer": report("linformer", [row(128, 1024, 1.7)], [{"resolution": 256, "reason": why}]),
    }
    reports["linformer"]["stage1"]["steps"] = 3
    (tmp_path / "study.json").write_text(json.dumps({"students": [{"name": n} for n in reports]}))
    for name, r in reports.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(r))
    md = write_conversion_comparison(tmp_path).read_text()
    assert "- stage 1: 1 to 3 steps of batch 4;" in md
    assert "| model | 128 px (1024 tokens) | 256 px (4096 tokens) |" in md
    assert "| relu_linear (relu_linear) | 1.60 | 6.60 |" in md
    assert "| linformer (linformer) | 1.70 | not run |" in md and f"- not run: {why}" in md
    rows = json.loads((tmp_path / COMPARISON_DATA).read_text())["students"]
    assert rows[1]["sweep"] == {"128": [1024, 1.7, 5.0], "256": why}


def test_a_finished_study_given_other_students_is_refused_before_any_stage_1(
    study, tiny_teacher_dir, capsys, tmp_path
):
    yaml = tmp_path / "other.yaml"  # one student kept, one new one that stage 1 would train
    yaml.write_text(
        f"teacher:\n  spec: local-dir:{tiny_teacher_dir}\nstudents:\n  - name: hedgehog\n"
        "    convert.attention: hedgehog\n  - name: other\n    convert: {attention: performer, stage1_train: qk}\n"
    )
    before = {p: p.stat().st_mtime_ns for p in study.rglob("*")}
    capsys.readouterr()
    assert cli.main(["study", "--command", "convert", "-c", str(yaml), *BASE, f"run_dir={study}"]) == 2
    out = capsys.readouterr()
    assert (
        "holds a study (study.json) of other students (hedgehog {'convert.attention': 'hedgehog'}" in out.err
    )
    assert "given: hedgehog {'convert.attention': 'hedgehog'}, other {" in out.err
    assert f"(attnxfer study -c {study / 'study.yaml'} continues it)" in out.err
    assert "stage 1" not in out.out and {p: p.stat().st_mtime_ns for p in study.rglob("*")} == before


@pytest.mark.slow
def test_inspect_takes_a_convert_studys_folder_as_its_students_final_ones(
    study, tiny_teacher_dir, tmp_path, capsys
):
    """Each student of a convert study is a conversion: its checkpoints are its stage 2's, not its own."""
    out = tmp_path / "inspection"
    argv = [
        "inspect",
        f"local-dir:{tiny_teacher_dir}",
        str(study),
        "--data",
        "synthetic",
        "--num-images",
        "2",
    ]
    assert cli.main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    assert "left out" not in capsys.readouterr().out
    assert sorted(json.loads((out / "metrics.json").read_text())["students"]) == sorted(NAMES)


@pytest.mark.slow
def test_train_given_a_conversions_stage_2_config_points_to_convert_not_to_that_config(study, capsys):
    """That config builds the teacher's softmax student: only convert rebuilds the converted one."""
    student = study / "hedgehog"
    capsys.readouterr()
    assert cli.main(["train", "-c", str(student / "stage2" / "config.yaml"), "schedule.max_steps=5"]) == 2
    err = capsys.readouterr().err
    said = f"is stage 2's config of the conversion {student}: go on with attnxfer convert -c {student / 'config.yaml'}"
    assert said in err, err
