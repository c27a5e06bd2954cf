"""The names of what attnxfer writes into a run directory, in one table: at the bottom of the layers because
the config loader must recognise a run's own ``config.yaml`` (and an exported model's folder, given where a
config or a run is expected, or a path that is not there: `missing_path`). Nothing else spells these names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: what was trained, from what (the student spec, the teacher record, the plan, how it ran)
RUN_RECORD = "run.json"
#: the resolved config: re-run with ``-c RUN_DIR/config.yaml``
RUN_CONFIG = "config.yaml"
#: the checkpoints' folder (``step-XXXXXXXX`` folders inside)
CHECKPOINTS_SUBDIR = "checkpoints"
#: a checkpoint's JSON state; a search keeps its own at the run dir's top
STATE_NAME = "state.json"
#: a checkpoint's list of its files and their hashes, written last: a step folder without it never finished saving
MANIFEST_NAME = "MANIFEST.json"
#: the lock a live run holds (`attnxfer.checkpoints.run_lock`)
LOCK_NAME = "attnxfer.lock"
#: one JSON line per logged step
METRICS = "metrics.jsonl"
#: a checkpoint's student weights: the raw ones and the EMA's
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
#: the graph `attnxfer export --format onnx` writes (for ONNX Runtime; attnxfer and timm read the timm format)
ONNX_FILE = "model.onnx"
#: a study's record: its students (name, overrides, folder) and how each stands
STUDY_RECORD = "study.json"
#: the YAML that runs a study again (its base keys and its students)
STUDY_YAML = "study.yaml"
#: a study's report and its figures (`attnxfer.apps.study.report`), and a conversion study's comparison
STUDY_REPORT = "study.md"
STUDY_SCORES = "study_report.json"  # what the report shows, as data
STUDY_CURVES = "study.png"
STUDY_AGREEMENT = "study_agreement.png"
COMPARISON_REPORT = "conversion_study.md"
COMPARISON_DATA = "conversion_study.json"
#: a study's reports (a study started over keeps the earlier attempt's aside)
STUDY_REPORTS = (
    STUDY_REPORT,
    STUDY_SCORES,
    STUDY_CURVES,
    STUDY_AGREEMENT,
    COMPARISON_REPORT,
    COMPARISON_DATA,
)
#: what a study writes into its own folder, beside its students' folders
STUDY_FILES = (CHECKPOINTS_SUBDIR, LOCK_NAME, STUDY_RECORD, STUDY_YAML, *STUDY_REPORTS)
#: convert's stage folders
STAGE_DIRS = ("stage1", "stage2")
#: a search's every candidate, one JSON line each (its state is a checkpoint, under checkpoints/)
SEARCH_CANDIDATES = "candidates.jsonl"
#: what attnxfer writes into a run dir besides config.yaml (train/pretrain, convert, search, a held lock)
RUN_DIR_MARKERS = (RUN_RECORD, CHECKPOINTS_SUBDIR, *STAGE_DIRS, STATE_NAME, LOCK_NAME, STUDY_RECORD)
#: a sweep's point folders under its run dir (``RUN_DIR/000_KEY=VALUE``: `attnxfer submit --sweep`'s points)
SWEEP_POINT = re.compile(r"\d{3,}_.")
#: a sweep's record of what it sweeps, at its run dir's top: written as it is submitted, before any point starts
SWEEP_RECORD = "sweep.json"
#: `attnxfer eval`'s scores of a step's checkpoint, ``eval-<step>.json`` (``eval-<step>-<n>.json``: another
#: evaluation of that step), and the step in such a name
EVAL_SCORES = "eval-{:08d}{}.json"
EVAL_STEP = re.compile(r"eval-(\d+)(?:-\d+)?\.json")
#: TensorBoard's event files and the PNGs of what it shows as images, in a run dir
TENSORBOARD_DIR = "tb"
PICTURES_DIR = "pictures"
#: an exported model's files in timm's Hub layout (`attnxfer export`'s, a teacher's local-dir)
EXPORTED_MODEL = ("config.json", MODEL_WEIGHTS)


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object attnxfer wrote (a run.json, an export's config.json), {} where there is none to read: for
    what a folder is, asked of folders that may be anything."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def eval_scores(run_dir: Path, since: int = 0) -> list[Path]:
    """The score files `attnxfer eval` left in ``run_dir`` for the checkpoints of step ``since`` and later."""
    steps = {p: EVAL_STEP.fullmatch(p.name) for p in Path(run_dir).glob("*.json")}
    return sorted(p for p, m in steps.items() if m and int(m[1]) >= since)


def is_exported_model(folder: Path) -> bool:
    """Whether ``folder`` holds a model in timm's Hub layout: a model, not a run or a config."""
    return all((folder / name).is_file() for name in EXPORTED_MODEL)


def missing_path(path: Path) -> str:
    """``PATH does not exist``, with what the nearest folder above it that exists holds (a mistyped or
    renamed folder shows beside the name that was given)."""

    def starting_run(p: Path) -> bool:
        # a folder holding only a lock, however deep (runs/search/demo/ under runs/search/), is a run being
        # started (this command's own run_dir): not what was meant
        end = p
        while end.is_dir() and len(inside := list(end.iterdir())) == 1 and inside[0].is_dir():
            end = inside[0]
        return end.is_dir() and [c.name for c in end.iterdir()] == [LOCK_NAME]

    for above in (a for a in path.absolute().parents if a.is_dir()):
        if above == Path.cwd() or above.parent == above:
            return f"{path} does not exist"
        entries = list(above.iterdir())
        shown = [p for p in entries if not starting_run(p)]
        if shown or not entries:  # else the folder holds only the starting run: this command made it
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in shown)
            held = (
                ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
                or "nothing"
            )
            # a run of that name a folder deeper (the demo's students: runs/demo/mae_study-<hash>/distill)
            deeper = sorted(p.parent for p in above.glob(f"*/{path.name}/{RUN_CONFIG}"))
            named_here = path.parent.absolute() == above  # the folder given's own parent exists
            there = (
                f"; a run of that name is {path.parent / deeper[0].relative_to(above)}"
                if deeper and named_here
                else ""
            )
            return f"{path} does not exist ({above} holds: {held}){there}"
    return f"{path} does not exist"


def no_run_folder(folder: Path) -> str:
    """``FOLDER is no run's folder``, with the runs it holds where it is a folder of runs (``runs/``): what a
    command that reads a run says of a folder attnxfer did not write."""
    inside = sorted(folder.iterdir()) if folder.is_dir() else []
    runs = [p for p in inside if (p / RUN_CONFIG).is_file() or (p / STUDY_RECORD).is_file()]  # a study's too
    held = ", ".join(p.name for p in runs[:8]) + (f", ... ({len(runs)} runs)" if len(runs) > 8 else "")
    inside = f"; it holds the runs {held}: give one, e.g. {runs[0]}" if runs else ""
    return (
        f"{folder} is no run's folder (it has no {RUN_CONFIG}, {RUN_RECORD} or {CHECKPOINTS_SUBDIR}/){inside}"
    )


#: where `attnxfer demo` writes by default (``--out``), and where it leaves each teacher's export (real files,
#: replaced whole when the teacher changes) beside its hashed run folders ``<key>-<hash>``: the paths the demo
#: recipes and the documentation's examples name (``teacher.spec=local-dir:runs/demo/mae/export``)
DEMO_OUT = "runs/demo"
DEMO_EXPORTS = {"mae": "mae/export", "supervised": "teacher/export"}
