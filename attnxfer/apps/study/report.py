"""A study's report: its students scored on the same validation images, each compared with the first.

Scored on the same images, any two students are *paired*: McNemar's exact test on the images exactly one gets
right tells them apart where two overlapping 95 % intervals cannot. This module loads, scores and writes;
what the report says is `report_text.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from ...analysis.knn import knn_hits
from ...analysis.pictures import DPI, agreement_figure
from ...checkpoints.atomic_io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ...checkpoints.run_dir import RunDir
from ...config import TrainConfig, load_config
from ...data import dataset_info
from ...errors import InputError, MissingPathError
from ...run_layout import STUDY_AGREEMENT, STUDY_CURVES, STUDY_RECORD, STUDY_REPORT, STUDY_SCORES
from ...speak import say, speaking_for
from ...train.runtime import resolve_device, resolve_precision
from ...transfer.modes import get_mode
from ..inspect.inspect import LoadedModel, inspect_models, load_model
from ..inspect.report_text import json_safe
from ..run.loaders import build_bank_loader, first_images
from ..run.parts import RunParts, build_run_parts
from ..run.training import task_weight_of
from ..run.val_curves import draw_val_curves, val_series
from .report_text import StudentScore, render_study
from .seed_stats import student_correct

TOP1, KNN = "top-1", "k-NN top-1"


def write_study_report(
    study_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    trained_now: bool = False,
) -> Path:
    """Score every student of the study in ``study_dir`` and write its report there (``study.md``, with
    ``study_report.json``, ``study.png`` and ``study_agreement.png``); returns the path of ``study.md``. Draws
    nothing from the caller's random streams. ``trained_now``: written right after this process trained them;
    what their plans leave unused, said then, is not said again."""
    study_dir = Path(study_dir)
    record = read_study_record(study_dir)
    students = [_student(study_dir, entry) for entry in record["students"]]
    at = device if isinstance(device, torch.device) else resolve_device(device)
    insp, images = None, 0
    with torch.random.fork_rng(devices=[]):
        scoring = _Scoring.build(students, at)
        if scoring is not None:
            loaded = scoring.load_students(students)
            if scoring.teacher is not None and loaded:  # each student's maps against the teacher's, per layer
                subjects = {name: m.subject for name, m in loaded.items()}
                insp = inspect_models(
                    scoring.teacher.model, subjects, torch.cat(first_images(scoring.parts.val_loader, 64))
                )
            scoring.score(students, loaded, said=not trained_now)
            images = len(scoring.parts.val_loader.dataset)
    for s in students:
        s.curve = val_series(s.folder, s.metric)
    _save_png(study_curves_figure(students), study_dir / STUDY_CURVES)
    if insp is not None:
        title = "students against the teacher, per layer (study validation images)"
        _save_png(agreement_figure(insp, title=title), study_dir / STUDY_AGREEMENT)
    else:  # an earlier report's picture would describe students this one could not measure
        (study_dir / STUDY_AGREEMENT).unlink(missing_ok=True)
    base = record.get("base") or {}
    steps = [s.step for s in students if isinstance(s.step, int)]
    totals = [e["total_steps"] for e in record["students"] if isinstance(e.get("total_steps"), int)]
    e = scoring.config.eval if scoring is not None else None
    shared = {  # what the study's students shared, for the report's first lines
        "study": study_dir.resolve().name,
        "teacher": (base.get("teacher") or {}).get("spec"),
        "dataset": str((base.get("data") or {}).get("dataset", "?")),
        "batch_size": (base.get("data") or {}).get("batch_size"),
        "steps": max(steps) if steps else None,
        "total_steps": max(totals) if totals else None,  # a record of before it was kept: None
        "shared_seconds": record.get("shared_seconds"),
        "images": images,
        "knn": {} if e is None else {"k": scoring.knn_k or e.knn_k, "temperature": e.knn_temperature},
    }
    text, data = render_study(students, insp, shared)
    atomic_write_json(study_dir / STUDY_SCORES, json_safe(data))
    path = atomic_write_text(study_dir / STUDY_REPORT, text)
    say(f"study report -> {path}")
    return path


# ------------------------------------------------------------------------------------------- reading
def read_study_record(study_dir: Path) -> dict[str, Any]:
    """``study.json`` of the study in ``study_dir``, refused unless it lists named students."""
    path = study_dir / STUDY_RECORD
    if not path.is_file():
        raise MissingPathError(f"{study_dir} has no {STUDY_RECORD}: give the run_dir of an `attnxfer study`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}): is it a study's record?") from None
    students = record.get("students") if isinstance(record, dict) else None
    if (
        not isinstance(students, list)
        or not students
        or not all(isinstance(s, dict) and "name" in s for s in students)
    ):
        raise InputError(f"{path} lists no students: is it a study's record?")
    return record


def _student(study_dir: Path, entry: Mapping[str, Any]) -> StudentScore:
    """A study.json entry as a row, its config and metric read from its folder where it got that far."""
    s = StudentScore(
        name=str(entry["name"]),
        overrides=dict(entry.get("overrides") or {}),
        folder=study_dir / str(entry.get("folder", entry["name"])),
        step=entry.get("step"),
        stopped=entry.get("stopped"),
        seconds=entry.get("seconds"),
    )
    config = s.folder / "config.yaml"
    if config.is_file():
        s.config = load_config(str(config))
    with contextlib.suppress(MissingPathError):  # a student stopped before its run was recorded
        s.metric = RunDir(s.folder).record().get("best_metric") or s.metric
    return s


# ------------------------------------------------------------------------------------------- measuring
@dataclass
class _Scoring:
    """What every student is scored with, built once: the teacher and loaders from the first student's config,
    as the study built them (with labels where the data has them)."""

    config: TrainConfig
    parts: RunParts
    teacher: LoadedModel | None
    labelled: bool
    device: torch.device
    knn_k: int | None = None  # the k its k-NN voted with (eval.knn_k, or a smaller bank's size)

    @classmethod
    def build(cls, students: list[StudentScore], device: torch.device) -> _Scoring | None:
        if not any(s.config is not None and not s.stopped for s in students):
            return None  # nothing to score
        cfg = next(s.config for s in students if s.config is not None)
        labelled = dataset_info(cfg.data.dataset, root=cfg.data.root, options=cfg.data.kwargs).has_labels
        if labelled and not cfg.data.labels:  # trained without reading them; scored with them
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=True))
        parts = build_run_parts(cfg, labels=labelled, quiet=True)
        teacher = None
        if parts.teacher is not None:
            rec = parts.teacher_record or {}
            teacher = LoadedModel(
                cfg.teacher.spec,
                parts.teacher.to(device),
                str(rec.get("source", "")),
                sha256=rec.get("sha256"),
                mean=tuple(parts.mean),
                std=tuple(parts.std),
            )
        return cls(cfg, parts, teacher, labelled, device)

    def load_students(self, students: list[StudentScore]) -> dict[str, LoadedModel]:
        """Each student that did not stop, at its best checkpoint (EMA weights where kept), on the device."""
        loaded = {}
        for s in students:
            if s.stopped or s.config is None:
                continue
            try:
                model = load_model(str(s.folder), teacher=self.teacher)
            except MissingPathError:
                s.unscored = "no checkpoint to score yet"
                continue
            model.model.to(self.device)
            s.checkpoint = model.source.removeprefix("run ")
            s.checkpoint_step = RunDir(s.folder).checkpoint_state(model.checkpoint).get("step")
            loaded[s.name] = model
            say(f"study report: {s.name}: {s.checkpoint}")
        return loaded

    def score(self, students: list[StudentScore], loaded: Mapping[str, LoadedModel], said: bool) -> None:
        """Per-image correctness: top-1 of those that trained a head, k-NN top-1 of the others."""
        knn: list[StudentScore] = []
        for s in students:
            if s.name not in loaded:
                continue
            assert s.config is not None
            if not self.labelled:
                s.unscored = "the data has no labels: no top-1 or k-NN"
            elif task_weight_of(s.config) > 0 and s.config.data.labels:
                parts = dataclasses.replace(self.parts, student=loaded[s.name].model)
                with speaking_for(s.name):  # its plan's warnings again (a --report), said as the student's
                    s.score, s.correct = (
                        TOP1,
                        student_correct(
                            s.config, parts, self.device, said=said, own_keys=frozenset(s.overrides)
                        ),
                    )
            elif get_mode(s.config.transfer.mode).teacher_at_eval:
                s.unscored = (
                    f"no head trained, and a transfer.mode={s.config.transfer.mode} student's features alone are "
                    "not the model: no top-1 or k-NN"
                )
            else:
                knn.append(s)
        if knn:
            say(f"study report: k-NN top-1 of {', '.join(s.name for s in knn)}")
            e = self.config.eval
            precision = resolve_precision(self.config.precision, self.device)
            hits, self.knn_k = knn_hits(
                [loaded[s.name].model for s in knn],
                build_bank_loader(self.config, self.parts.val_loader.dataset),
                self.parts.val_loader,
                self.device,
                k=e.knn_k,
                temperature=e.knn_temperature,
                autocast=lambda: precision.autocast(self.device),
            )
            for s, h in zip(knn, hits, strict=True):
                s.score, s.correct = KNN, h.numpy()


# ------------------------------------------------------------------------------------------- pictures
_METRIC_LABELS = {
    "val_top1": "val top-1 (%)",
    "val_feat_cos_patch": "val feature cosine with the teacher",
    "val_loss": "val loss",
}


def study_curves_figure(students: list[StudentScore]) -> Figure:
    """The students' validation curves, one panel per metric their runs score by, one line per student (its
    EMA's curve where its run keeps one: the weights it is scored with)."""
    metrics = list(dict.fromkeys(s.metric.removeprefix("ema_") for s in students)) or ["val_top1"]
    fig = Figure(figsize=(6 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        drawn = draw_val_curves(
            ax, {s.name: s.curve for s in students if s.metric.removeprefix("ema_") == metric}
        )
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.suptitle("study: every student on the same batches and validation images", fontsize=10)
    fig.tight_layout()
    return fig


def _save_png(fig: Figure, path: Path) -> None:
    """Written atomically: a reader never sees half a picture."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
