"""A run directory, owned in one place (config.yaml, run.json, metrics.jsonl, attnxfer.lock, checkpoints/),
and the one rule for a student out of a run (`RunDir.load_student`: docs/architecture.md, "The run directory")."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import load_file

from ..errors import InputError, MissingPathError
from ..models.student import student_from_spec
from ..run_layout import (
    CHECKPOINTS_SUBDIR,
    EMA_WEIGHTS,
    LOCK_NAME,
    METRICS,
    MODEL_WEIGHTS,
    RUN_CONFIG,
    RUN_DIR_MARKERS,
    RUN_RECORD,
    SEARCH_CANDIDATES,
    STAGE_DIRS,
    STATE_NAME,
    STUDY_RECORD,
    is_exported_model,
    missing_path,
    read_record,
)
from ..sources.teacher import drop_unused_entries
from ..speak import debug, warn
from ..transfer.modes import MODES
from .resume_point import none_usable
from .run_lock import lock_holder
from .store import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    MetricMode,
    atomic_write_json,
    atomic_write_text,
)
from .verify import metric_words


class CheckpointChoice(StrEnum):
    """Which checkpoint of a run to export."""

    BEST = "best"  # the best validation metric the run recorded
    LATEST = "latest"


class ExportWeights(StrEnum):
    """Which weights of a checkpoint to export."""

    EMA = "ema"
    RAW = "raw"

    @property
    def filename(self) -> str:
        return EMA_WEIGHTS if self is ExportWeights.EMA else MODEL_WEIGHTS

    @property
    def other(self) -> ExportWeights:
        return ExportWeights.RAW if self is ExportWeights.EMA else ExportWeights.EMA


def _choice(enum: type[StrEnum], value: str, key: str) -> StrEnum:
    try:
        return enum(value)
    except ValueError:
        raise InputError(f"{key}={value!r}: choose {' or '.join(repr(m.value) for m in enum)}") from None


def default_weights(checkpoint: Path) -> ExportWeights:
    """The weights `RunDir.load_student` (and so an export) takes from ``checkpoint`` unless told: the EMA's
    where the run kept them, else the raw ones."""
    return ExportWeights.EMA if (checkpoint / EMA_WEIGHTS).is_file() else ExportWeights.RAW


def select_checkpoint(
    run_dir: str | os.PathLike,
    which: CheckpointChoice | str = "best",
    best_mode: MetricMode | str = "max",
    best_metric: str | None = None,
    *,
    quiet: bool = False,
) -> tuple[Path, str]:
    """(checkpoint folder, why it was chosen): the verified ``best()`` or ``latest()``. ``best`` ranks by the
    metric run.json names (``best_metric``: val top-1; a loss with ``best_mode="min"``, as MAE pre-training; a
    run without a task loss, its final-feature cosine); a run that recorded none gives its latest, saying so
    (``quiet``: only in ``why``, for a caller that reads the same checkpoint again, which says it)."""
    which = _choice(CheckpointChoice, which, "checkpoint")
    manager = CheckpointManager(run_dir, best_mode=best_mode)
    latest = manager.latest()
    if latest is None:
        if broken := manager.step_dirs():  # damaged (a size check can pass where the sha256 fails)
            raise none_usable(manager, broken)
        raise MissingPathError(f"no intact checkpoint under {Path(run_dir) / CHECKPOINTS_SUBDIR}")
    if which is CheckpointChoice.BEST:
        best = manager.best()
        if best is not None and best.metric is not None:
            # a run.json without best_metric ranks by val top-1, or an MAE's by val loss
            name = best_metric or ("val_top1" if manager.best_mode is MetricMode.MAX else "val_loss")
            return best.path, f"{best.path.name} (best {metric_words(name, best.metric)})"
        if not quiet:
            warn(f"no intact checkpoint in {run_dir} records a metric: using the latest")
        return latest.path, f"{latest.path.name} (latest: no intact checkpoint records a metric)"
    return latest.path, f"{latest.path.name} (latest)"


@dataclass
class LoadedRunStudent:
    """A run's student with its weights, and where they came from (for a report or a model card)."""

    model: nn.Module
    record: dict[str, Any]
    checkpoint: Path
    why: str  # which checkpoint and why (``step-00000100 (best val top-1 71.20)``)
    weights_file: Path
    weights: ExportWeights


@dataclass(frozen=True)
class RunDir:
    """The run directory at ``path``: its files' places, its record, its checkpoints and its student."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path).expanduser())

    @property
    def config_file(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def record_file(self) -> Path:
        return self.path / RUN_RECORD

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    def is_run(self) -> bool:
        """Whether this is a training run's dir (its run.json was written: the run got past its checks)."""
        return self.path.is_dir() and self.record_file.is_file()

    def is_conversion(self) -> bool:
        """Whether this is `attnxfer convert`'s folder (its stages' folders inside, no run.json of its own)."""
        return not self.record_file.is_file() and any((self.path / s).is_dir() for s in STAGE_DIRS)

    def study_runs(self) -> list[Path] | None:
        """A study's folder: its students' run folders, in the study's order; None for any other folder."""
        record = self.path / STUDY_RECORD
        if not record.is_file():
            return None
        return [self.path / s["folder"] for s in json.loads(record.read_text(encoding="utf-8"))["students"]]

    def final_student(self) -> RunDir:
        """The training run that holds this folder's final student: itself, or a conversion's stage 2 (refused,
        saying where its student is, while stage 2 has not run); a study's folder is refused naming its runs
        (`inspect` takes them all)."""
        runs = self.study_runs()
        if runs is not None:
            # the example one that stands alone: a copy student attends with the teacher's maps (no export)
            modes = [MODES.get(read_record(r / RUN_RECORD).get("mode")) for r in runs]
            alone = [r for r, mode in zip(runs, modes, strict=True) if not (mode and mode.teacher_at_eval)]
            raise MissingPathError(
                f"{self.path} is a study's folder: its students are the runs in it "
                f"({', '.join(p.name for p in runs) or 'none yet'}); give one of them, e.g. "
                f"{(alone or runs)[0] if runs else self.path / 'STUDENT'}"
            )
        if not self.is_conversion():
            return self
        stage2 = RunDir(self.path / STAGE_DIRS[-1])
        if stage2.is_run():
            return stage2
        if at_work := _at_work(self.path):  # "finish the conversion" would start a second one into the folder
            raise MissingPathError(
                f"{self.path} is a conversion still at work ({at_work}), its stage 2 not begun: export it once "
                "it has ended"
            )
        stage1 = self.path / STAGE_DIRS[0] / CHECKPOINTS_SUBDIR
        raise MissingPathError(
            f"{self.path} is a conversion whose stage 2 has not run (no {stage2.record_file}); its student "
            f"after stage 1 is in {stage1}, which is not read as a finished student: finish the conversion "
            f"(attnxfer convert -c {self.config_file}) and run this again"
        )

    def write_config(self, text: str) -> None:
        """The resolved config (re-run with ``-c RUN_DIR/config.yaml``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, text)

    def write_record(self, info: dict[str, Any]) -> None:
        """run.json: what was trained, from what (export, inspect and the demo read it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record_file, info)

    def record(self) -> dict[str, Any]:
        """run.json, refusing a folder that is not a run's."""
        if self.path.is_file():  # its config.yaml, say
            run = self.path.parent
            hint = f": give the folder it is in, {run}" if (run / RUN_RECORD).is_file() else ""
            raise MissingPathError(f"{self.path} is a file, not a run's folder{hint}")
        if not self.path.is_dir():
            raise MissingPathError(f"run dir {missing_path(self.path)}; give the run_dir of a training run")
        if self.is_conversion():
            raise MissingPathError(
                f"{self.path} is a conversion's run folder: its final student is the training run in "
                f"{self.path / STAGE_DIRS[-1]} (`attnxfer export {self.path} OUT` exports it)"
            )
        if not self.record_file.is_file():
            # what the folder is instead: a model already exported (or one inside: the demo's runs/demo/mae),
            # or a folder of runs (runs/demo)
            inside = sorted(self.path.iterdir())
            for model in (self.path, *inside):
                if is_exported_model(model):
                    raise MissingPathError(
                        f"{self.path} is an exported model, not a run's dir: it loads as local-dir:{model}"
                        if model == self.path
                        else f"{self.path} is not a run's dir; it holds an exported model, {model}, which loads as "
                        f"local-dir:{model}"
                    )
            # a run's checkpoints (whose step-* folders hold state.json: not runs to pick one of)
            if CHECKPOINTS_SUBDIR in (self.path.name, self.path.parent.name):
                run = self.path.parent if self.path.name == CHECKPOINTS_SUBDIR else self.path.parent.parent
                RunDir(run).final_student()  # a study's steps, not a run's: refused naming its students
                raise MissingPathError(
                    f"{self.path} belongs to the checkpoints of the run {run}: give the run's folder, {run}; "
                    "the command picks the checkpoint from there"
                )
            runs = [d.name + "/" for d in inside if any((d / m).exists() for m in RUN_DIR_MARKERS)]
            if runs:
                raise MissingPathError(
                    f"{self.path} is not a run's dir but holds runs ({', '.join(runs[:8])}"
                    f"{', ...' if len(runs) > 8 else ''}): give one of them, e.g. {self.path / runs[0]}"
                )
            if self.path.name in STAGE_DIRS and RunDir(self.path.parent).is_conversion():
                raise MissingPathError(
                    f"{self.path} is a stage of the conversion {self.path.parent}, whose final student is read "
                    f"from the conversion's folder: give {self.path.parent}"
                )
            if (self.path / SEARCH_CANDIDATES).is_file():  # its checkpoints are generations, not a student's
                raise MissingPathError(
                    f"{self.path} is a search's folder: it holds attention formulas, not a model; the convert "
                    f"command in {self.path / 'pareto.md'} makes a student of its winner: give that conversion's "
                    "run_dir once it has run"
                )
            if (self.path / CHECKPOINTS_SUBDIR).is_dir():
                raise MissingPathError(
                    f"{self.path} holds checkpoints but no {RUN_RECORD}, the run's record of what it trained: put "
                    f"it back, or run the command that trained it again, -c {self.config_file}, which writes it "
                    "anew (a finished run trains no further)"
                )
            # a conversion in stage 1 writes no folder before its first save
            if at_work := _at_work(self.path):
                raise MissingPathError(
                    f"{self.path} has no {RUN_RECORD} yet: its command is still at work ({at_work}); run this "
                    "again once it has ended"
                )
            raise MissingPathError(
                f"{self.path} has no {RUN_RECORD}: not a training run's dir (or its run never got past the start)"
            )
        try:
            return json.loads(self.record_file.read_text(encoding="utf-8"))
        except ValueError as e:  # written atomically: damaged by hand or by a copy that stopped
            raise InputError(
                f"{self.record_file} is damaged ({e}): move it aside, then run the command that trained the run "
                f"again, -c {self.config_file}, which writes it anew (a finished run trains no further)"
            ) from None

    def recipe(self) -> str | None:
        """The run's config.yaml as text, or None where it has none."""
        return self.config_file.read_text(encoding="utf-8") if self.config_file.is_file() else None

    def latest(self, verify_hash: bool | None = None) -> CheckpointInfo | None:
        """The newest intact checkpoint, or None."""
        return CheckpointManager(self.path).latest(verify_hash=verify_hash)

    def checkpoint_state(self, ckpt: Path) -> dict[str, Any]:
        """A checkpoint's state.json ({} where it has none)."""
        path = Path(ckpt) / STATE_NAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def metric_rows(self) -> list[dict[str, Any]]:
        """metrics.jsonl's rows ([] where the run logged none)."""
        if not self.metrics_file.is_file():
            return []
        lines = self.metrics_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def student_checkpoint(
        self, checkpoint: CheckpointChoice | str | None = None, *, quiet: bool = False
    ) -> tuple[Path, str]:
        """(checkpoint folder, why) that `load_student` reads: ``checkpoint=None`` takes the best, or an MAE
        pre-training's latest (MAE fine-tunes its last weights: a lower val loss ranks no features); ``quiet``
        as `select_checkpoint`'s."""
        record = self.record()
        if checkpoint is None:
            checkpoint = (
                CheckpointChoice.LATEST if record.get("objective") == "mae" else CheckpointChoice.BEST
            )
        best_mode, best_metric = record.get("best_mode", "max"), record.get("best_metric")
        return select_checkpoint(self.path, checkpoint, best_mode, best_metric, quiet=quiet)

    def load_student(
        self,
        checkpoint: CheckpointChoice | str | None = None,
        weights: ExportWeights | str | None = None,
        attn_layer: type[nn.Module] | None = None,
    ) -> LoadedRunStudent:
        """The run's student with the chosen checkpoint's weights: ``checkpoint=None`` takes the best, or an MAE
        pre-training's latest (MAE fine-tunes its last weights: a lower val loss ranks no features);
        ``weights=None`` takes the EMA's where kept, else the raw ones; a named kind must exist.
        ``attn_layer`` overrides the attention the spec records."""
        record = self.record()
        if "student" not in record:
            raise InputError(
                f"{self.record_file} has no 'student' spec (attnxfer.models.student_spec output): is "
                f"{self.path} an attnxfer run?"
            )
        ckpt, why = self.student_checkpoint(checkpoint)
        weights = default_weights(ckpt) if weights is None else weights
        weights = _choice(ExportWeights, weights, "weights")
        wfile = ckpt / weights.filename
        pruned = MissingPathError(
            f"{ckpt} was removed as it was read: the run writing {self.path} is still going and keeps its newest "
            "checkpoints only (checkpoint.keep_last); run this command again, or after the run ends"
        )
        if not ckpt.is_dir():
            raise pruned
        if not wfile.is_file():
            raise MissingPathError(
                f"{wfile} does not exist (the run kept no {weights} weights); try weights={weights.other.value!r}"
            )
        student = student_from_spec(record["student"], attn_layer=attn_layer)
        try:
            state = load_file(str(wfile), device="cpu")
        except FileNotFoundError:
            raise pruned from None
        # An MAE pre-training run checkpoints encoder + decoder in MAE's layout: the student is the encoder.
        state, dropped = drop_unused_entries(state)
        # Another objective's module may hold the student as a submodule (``self.encoder``) beside parts of its
        # own: the student is the one prefix under which every key of the spec's model sits.
        own = student.state_dict()
        first = next(iter(own))
        prefixes = {k.removesuffix(first) for k in state if k.endswith("." + first)}
        p = prefixes.pop() if len(prefixes) == 1 and first not in state else None
        if p is not None and all(p + k in state for k in own):
            dropped = [k for k in state if not k.startswith(p)]
            state = {k.removeprefix(p): v for k, v in state.items() if k.startswith(p)}
        if dropped:
            debug(f"student of {self.path}: dropped {len(dropped)} entries the encoder does not use")
        result = student.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{wfile} does not fit the run's student: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        return LoadedRunStudent(student, record, ckpt, why, wfile, weights)


def _at_work(folder: Path) -> str | None:
    """The live process (another one) that holds ``folder``'s lock, described; None where none does."""
    holder = lock_holder(folder / LOCK_NAME)
    alive = holder is not None and not holder.ours and holder.why_dead() is None
    return holder.describe() if alive else None
