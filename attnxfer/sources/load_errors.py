"""Why weights could not be had or used: each a UserError whose message says what to do."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError, UserError
from ..run_layout import (
    CHECKPOINTS_SUBDIR,
    LOCK_NAME,
    MANIFEST_NAME,
    MODEL_WEIGHTS,
    ONNX_FILE,
    RUN_CONFIG,
    RUN_RECORD,
    SEARCH_CANDIDATES,
    STAGE_DIRS,
    STATE_NAME,
    STUDY_RECORD,
    is_exported_model,
    read_record,
)
from ..transfer.modes import MODES


class TeacherNotAvailable(UserError, RuntimeError):
    """The teacher's weights are neither on this machine nor reachable; the message says how to get them."""


class TeacherLoadError(InputError):
    """The weights do not fit the architecture (missing/unexpected/mis-shaped keys, wrong head)."""

    def __init__(self, message: str, missing_keys: Sequence[str] = (), unexpected_keys: Sequence[str] = ()):
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)


class UnsafeCheckpointError(InputError):
    """A checkpoint that can only be read by unpickling arbitrary Python objects; the message ends with where
    to give its ``converted`` copy (``give_again``), which `restated` says for the command that read it."""

    def __init__(self, refusal: str, converted: Path, give_again: str) -> None:
        super().__init__(f"{refusal}\nthen give {converted} where this file was ({give_again})")
        self.refusal, self.converted, self.give_again = refusal, converted, give_again

    def __reduce__(self):  # pickled as it was made (a SLURM task's error comes back through submitit)
        return type(self), (self.refusal, self.converted, self.give_again)

    def restated(self, give_again: str) -> UnsafeCheckpointError:
        """The same refusal, naming where the converted file is given to the command that read this one."""
        return UnsafeCheckpointError(self.refusal, self.converted, give_again)


def newest_step(run: Path) -> Path:
    """The newest checkpoint folder of ``run`` that finished saving (a killed save leaves a step folder without
    its manifest); ``step-N`` where it has none yet."""
    saved = sorted(
        (int(p.name[5:]), p)
        for p in (run / CHECKPOINTS_SUBDIR).glob("step-*")
        if p.name[5:].isdigit() and (p / MANIFEST_NAME).is_file()
    )
    return saved[-1][1] if saved else run / CHECKPOINTS_SUBDIR / "step-N"


def copy_student_alone(run: Path) -> str:
    """What a copy run's student needs before it is a model of its own, as the command that makes it one: a
    fine-tune without the teacher from its newest checkpoint's weights, built as run.json's student and fed
    as the copy run fed it, its config's data and keys (an export refuses it, and a run folder's usual advice
    is to export it), into a folder beside the run (beside a study's folder for its student)."""
    record = read_record(run / RUN_RECORD)
    config = f"-c {shlex.quote(str(run / RUN_CONFIG))} " if (run / RUN_CONFIG).is_file() else ""
    study = (run.parent / STUDY_RECORD).is_file()
    alone = run.parent.parent / f"{run.parent.name}-{run.name}-alone" if study else Path(f"{run}-alone")
    student = record.get("student") or {}
    args = {k: v for k, v in (student.get("model_args") or {}).items() if k != "num_classes"}
    kwargs = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in args.items()) + "}"
    weights = newest_step(run) / MODEL_WEIGHTS
    stats = "".join(
        f" data.{k}={json.dumps(record[k]).replace(' ', '')}" for k in ("mean", "std") if record.get(k)
    )
    made = (
        f" ({alone} holds it already: export it, attnxfer export {alone} OUT_DIR, or re-run it to go on)"
        if (alone / RUN_RECORD).is_file()
        else ""
    )
    return (
        f"fine-tune it without the teacher first, on the copy run's data and keys (its head starts fresh there, "
        f"as model.init starts every head), then export that run: "
        f"`attnxfer train {config}{shlex.quote(f'model.init={weights}')} model.name={student.get('architecture')} "
        f"{shlex.quote(f'model.kwargs={kwargs}')} model.mirror_teacher=false transfer.mode=none teacher.spec=null"
        f"{stats} {shlex.quote(f'run_dir={alone}')}`{made}"
    )


def run_folder_hint(folder: Path, role: str = "teacher") -> str | None:
    """What a folder attnxfer wrote is, where a model's folder was expected, and where its model is: a
    student's run folder (its model is its export), a conversion's (its final student's export is under
    stage2/), a study's or a search's; None for any other folder. ``role``: what the model was given as (a
    "student" is told to export one that attends efficiently, anything else that it is no teacher)."""
    if (folder / STUDY_RECORD).is_file():  # a study writes no export: what each of its students' folders says
        students = [p for p in sorted(folder.iterdir()) if p.is_dir() and run_folder_hint(p)]
        if not students:
            return f"{folder} is a study's folder whose students have no run folder yet"
        # told of one that is a model alone where there is one (a copy student needs a fine-tune first)
        shown = next(
            (p for p in students if "is no model alone" not in (run_folder_hint(p, role) or "")), students[0]
        )
        return (
            f"{folder} is a study's folder of students {', '.join(p.name for p in students)}, each a run "
            f"folder; {shown.name}: " + (run_folder_hint(shown, role) or "").removeprefix("this is ")
        )
    # a run's checkpoints/ (a study's is its own steps, which the study's line above would list again)
    study = (folder.parent / STUDY_RECORD).is_file()
    if folder.name == CHECKPOINTS_SUBDIR and not study and (of_run := run_folder_hint(folder.parent, role)):
        return f"{folder} holds the checkpoints of {folder.parent}; " + of_run.replace(
            "this is", f"{folder.parent} is", 1
        )
    if folder.parent.name == CHECKPOINTS_SUBDIR:  # a checkpoint holds a search's state.json too
        run = folder.parent.parent
        if run.name == STAGE_DIRS[0] and (run.parent / STAGE_DIRS[-1]).is_dir():  # exported: its conversion
            stage = run_folder_hint(run, role).removeprefix(f"{run} is ")
            return f"{folder} is one of the checkpoints of {stage}"
        of_run = run_folder_hint(run, role) or ""
        # a copy student: its export is refused too (model.init fine-tunes it alone, export's own advice)
        if "is no model alone" in of_run and role != "model.init":
            return f"{folder} is one of the checkpoints of the run {run}; " + of_run.replace(
                "this is", "it is", 1
            )
        hint = (
            f"{folder} is one of the checkpoints of the run {run}, not a model's folder: export the run "
            f"(`attnxfer export {run} {run / 'export'}`: its best checkpoint, an MAE pre-training's latest; "
            "--checkpoint best|latest picks one), then use "
            f"local-dir:{run / 'export'}"
        )
        if role == "model.init" and read_record(run / RUN_RECORD).get("objective") == "mae":
            hint += (
                f"; to go on pre-training with its decoder (the export drops it), give `attnxfer pretrain` its "
                f"weights file: model.init={folder / MODEL_WEIGHTS}"
            )
        return hint
    if folder.name == STAGE_DIRS[0] and (folder.parent / STAGE_DIRS[-1]).is_dir():  # stage 2 has the student
        rest = (run_folder_hint(folder.parent, role) or "").removeprefix("this is a conversion's run folder")
        return f"{folder} is stage 1 of the conversion {folder.parent}{rest}"
    if any((folder / stage).is_dir() for stage in STAGE_DIRS):
        run, what = folder / STAGE_DIRS[-1], "a conversion's run folder"
    elif (folder / SEARCH_CANDIDATES).is_file() or (folder / STATE_NAME).is_file():  # checkpoints/ too
        return (
            f"{folder} is a search's folder: it holds attention formulas, not a model (its report prints the "
            "convert command that makes a student of its winner)"
        )
    elif (folder / RUN_RECORD).is_file() or (folder / CHECKPOINTS_SUBDIR).is_dir():
        run, what = folder, "a student's run folder"
    elif (folder / RUN_CONFIG).is_file() and not is_exported_model(folder):
        if (folder / LOCK_NAME).is_file():  # a conversion's stage 1 writes no folder before its first save
            return (
                f"{folder} holds a run's config.yaml and its lock alone: its command is still at work (or was "
                "killed before its first save), nothing to read yet; give it once that command has ended"
            )
        return f"{folder} holds a run's config.yaml alone: its run never got past its start, nothing to read"
    elif (folder / ONNX_FILE).is_file() and not is_exported_model(folder):
        return (
            f"{folder} is an ONNX-only export (`attnxfer export --format onnx`), for ONNX Runtime; attnxfer and "
            "timm read an export's timm format: export the run again with --format timm onnx"
        )
    else:
        return None
    export = run / "export"
    record = read_record(run / RUN_RECORD)
    pretraining = record.get("objective") == "mae"  # as export tells one
    if pretraining:
        what = "an MAE pre-training's run folder (`attnxfer pretrain`)"
    mode = MODES.get(record.get("mode"))
    if mode is not None and mode.teacher_at_eval and role != "student":  # exports refuse it: no model alone
        return (
            f"this is {what}, whose student attends with its teacher's projections (transfer.mode={record['mode']}) "
            f"and is no model alone: {copy_student_alone(run)}"
        )
    attention = (record.get("student") or {}).get("attention")
    if attention not in (None, "softmax") and role != "student":  # exported, a student still, no teacher
        return (
            f"this is {what}, whose student attends with {attention} (no teacher, exported or not: teachers "
            f"need softmax attention; the teacher it was converted from is teacher.spec in {folder / RUN_CONFIG})"
        )
    its = "its encoder's export" if pretraining else "its export"
    if (export / "config.json").is_file():
        hint = f"this is {what}; {its} is {export}: use local-dir:{export}"
    else:
        hint = (
            f"this is {what}; {its} would be {export}, which does not exist yet: write it with "
            f"`attnxfer export {folder} {export}`, then use local-dir:{export}"
        )
    # model.init may be meant to go on pre-training, with the decoder the export drops: `attnxfer pretrain`
    # resumes the run (optimiser and step too) or takes its newest checkpoint's weights file in a new run
    # (encoder and decoder, a new optimiser and schedule); a teacher or an inspected student is the encoder alone
    if pretraining and role == "model.init":
        config, weights = run / RUN_CONFIG, newest_step(run) / MODEL_WEIGHTS
        hint += (
            "; to go on pre-training with its decoder (the export drops it), resume the run with a longer "
            f"schedule: `attnxfer pretrain -c {config} run_dir={run} schedule.epochs=E` (or schedule.max_steps=N), "
            f"or start a new one from its newest checkpoint's encoder and decoder: `attnxfer pretrain -c {config} "
            f"model.init={weights} run_dir=NEW_DIR`"
        )
    return hint
