"""`attnxfer convert`: a pretrained softmax teacher becomes an efficient-attention student.

One step function per stage or measurement, run in order by `_convert` (those after the build by `convert_runs`,
which a convert study runs for its students too): a new stage is one more step and one more line there.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ... import speak
from ...checkpoints.resume_point import ResumePoint, starts_over
from ...checkpoints.run_dir import RunDir
from ...checkpoints.store import CheckpointManager, atomic_write_json, atomic_write_text, set_aside
from ...config import (
    NO_CONVERT_TEACHER,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_changes,
    dump_config,
    find_key,
    require_teacher,
)
from ...errors import InputError, UserError
from ...models.efficient import build_efficient_student, new_parameters, set_drop_path
from ...models.efficient.swap import refuses_an_option
from ...models.image_input import image_input
from ...models.student import student_spec
from ...run_layout import RUN_CONFIG, STAGE_DIRS
from ...train.devices import resolve_precision
from ...train.distributed import rank_and_world
from ...train.engine import TrainResult, schedule_steps
from ...train.measure import evaluate_top1, map_agreement, operation_counts, top1_and_hits
from ...train.runtime import resolve_device
from ...train.stage1 import Stage1Result
from ...transfer.conversion import ConversionPlan, build_conversion_plan
from ...transfer.plan import TransferPlan, build_plan
from ..run.loaders import build_bank_loader, data_info, dataset_size
from ..run.parts import RunParts, build_run_parts, stamp_input_cfg
from ..run.resume import teacher_where_it_was
from ..run.training import (
    check_eval_metrics,
    judged_resume,
    locked_run,
    loop_settings,
    plan_from_config,
    prepare_trackers_from_config,
    require_task_labels,
    train,
)
from .quality import QualityProbe, stage1_worse, stage2_worse
from .report import (
    HEADLESS_TEACHER,
    NO_LABELS,
    STAGE_ROWS,
    render_conversion_report,
    teacher_near_chance,
)
from .selection import (
    AUTO,
    PARTIAL_FILE,
    SELECTION_FILE,
    check_auto,
    check_candidates,
    choose_attentions,
    measured_section,
)
from .speed import conversion_speeds, speed_lines, sweep_sides
from .stage1 import Stage1Found, Stage1Job, judge_stage1, open_stage1
from .stage2 import Stage2Objective, stage2_layers, stage2_objective, student_head

_REPORT_VERSION = 2  # 2: final-feature agreement, k-NN top-1 and stage 2's objective
#: what a conversion writes besides its stages' folders (checkpoint.resume=none keeps them aside)
_RESULTS = (RUN_CONFIG, SELECTION_FILE, PARTIAL_FILE, "report.json", "report.md")


@dataclass
class ConvertResult:
    run_dir: str
    report: dict[str, Any]


def conversion_plan_from_config(cfg: TrainConfig, teacher: nn.Module, student: nn.Module) -> ConversionPlan:
    """The ``convert`` section as a `ConversionPlan` (stage-1 batch defaults to data.batch_size)."""
    c = cfg.convert
    return build_conversion_plan(
        teacher,
        student,
        stage1_steps=c.stage1_steps,
        stage1_lr=c.stage1_lr,
        stage1_batch_size=c.stage1_batch_size or cfg.data.batch_size,
        stage1_train=c.stage1_train,
        map_loss=c.map_loss,
        output_mse=c.output_mse,
        attention_kwargs=c.attention_kwargs,
    )


def _merge_agreement(stages: dict[str, list[dict[str, Any]] | None]) -> list[dict[str, Any]]:
    """Per layer: metric value at each stage (None where a stage did not run)."""
    first = next(rows for rows in stages.values() if rows is not None)
    merged = []
    for i, row in enumerate(first):
        entry = {k: row[k] for k in ("layer", "attention", "map_kind", "metric")}
        for stage, rows in stages.items():
            entry[stage] = rows[i]["value"] if rows is not None else None
            entry[f"output_mse_{stage}"] = rows[i]["output_mse"] if rows is not None else None
            entry[f"kl_floor_{stage}"] = rows[i].get("kl_floor") if rows is not None else None
        merged.append(entry)
    return merged


def convert(cfg: TrainConfig, *, skip_stage1: bool = False, parts=None) -> ConvertResult:
    """The whole conversion of ``cfg`` into ``cfg.run_dir`` (the library function behind `attnxfer convert`);
    ``parts`` (its student from `build_efficient_student`) lets a notebook pass models and data it built.

    Under torchrun every rank runs this (both stages data parallel, the measurements summed over ranks); rank
    0 alone writes files, speaks and holds the run dir's lock."""
    require_convert_labels(cfg)
    cfg = checked_config(cfg, skip_stage1)
    with locked_run(cfg, "convert") as info:
        if skip_stage1:
            _refuse_skipping_a_saved_stage1(cfg)
        return _convert(cfg, info, parts=parts)


def _refuse_skipping_a_saved_stage1(cfg: TrainConfig) -> None:
    """``--skip-stage1`` into a run whose stage 1 was saved: refused as any change of convert.stage1_steps, but
    naming the flag, since giving the key its recorded value back would not lift it (the flag wins)."""
    if starts_over(cfg.checkpoint.resume):
        return
    saved = ResumePoint.find(Path(cfg.run_dir) / STAGE_DIRS[0], verify_hash=False)
    if saved is None:
        return
    steps = find_key(saved.config or {}, "convert.stage1_steps")[1]
    raise ConfigError(
        f"{cfg.run_dir} holds a conversion whose stage 1 was saved ({saved.path}, convert.stage1_steps={steps}), "
        "which --skip-stage1 (convert.stage1_steps=0) would leave out; nothing was written. To continue this "
        "conversion, drop --skip-stage1; to convert without stage 1, choose another run_dir (run_dir=...) or "
        "start this one over (checkpoint.resume=none, which keeps the earlier stage 1 aside)"
    )


@dataclass
class Conversion:
    """What the steps of one conversion share, and what they measured so far (None: a stage did not run)."""

    cfg: TrainConfig
    parts: RunParts
    plan: ConversionPlan
    stage2: Stage2Objective
    stage2_plan: TransferPlan
    stage2_steps: int
    main: bool
    name: str | None  # a convert study's student, whose name starts each of its lines (`speak.speaking_for`)
    run_dir: Path
    labelled: bool  # the data hands out labels (the report's top-1 and k-NN read them)
    classes: int | None  # the outputs a head has for top-1 to score it: model.num_classes, else the data's
    sweep: tuple[list[int], float | None] = ([], None)  # the speed sweep's sides and budget (`sweep_sides`)
    device: torch.device = field(init=False)  # set by `_place`
    probe: list[torch.Tensor] = field(default_factory=list)
    quality: QualityProbe = field(init=False)  # set by `_place`
    measured: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # why a convert study's student stopped early (a non-finite loss)
    selection: dict[str, Any] | None = None  # convert.attention=auto's choice (`choose_attentions`)
    stage1_found: Stage1Found = field(init=False)  # set by `judge_stage1`

    @property
    def teacher(self) -> nn.Module:
        return self.parts.teacher

    @property
    def student(self) -> nn.Module:
        return self.parts.student

    def say(self, line: str) -> None:
        with speak.speaking_for(self.name):
            speak.say(line)

    def judge_stage1(self) -> None:
        """What an earlier run left in ``stage1/``, judged before any work (`judge_stage1`)."""
        with speak.speaking_for(self.name):
            self.stage1_found = judge_stage1(
                self.cfg, self.parts, self.plan, self.run_dir / "stage1", main=self.main
            )

    def stage1_job(self) -> Stage1Job:
        """Its stage 1, as far as the earlier run judged by `judge_stage1` left it (`open_stage1`)."""
        with speak.speaking_for(self.name):
            return open_stage1(self.stage1_found, self.device)


def _convert(cfg: TrainConfig, info, *, parts) -> ConvertResult:
    # stage 2's trackers, decided before the teacher loads (a server that does not answer stops here)
    if info.is_main_process:
        prepare_trackers_from_config(cfg, Path(cfg.run_dir) / "stage2")
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    run = build_conversion(cfg, info, parts)
    (report,) = convert_runs([run], t0, stage1=_each(_stage1), stage2=_each(_stage2))
    return ConvertResult(str(run.run_dir), report)


def convert_runs(
    runs: list[Conversion],
    t0: float,
    *,
    stage1: Callable[[list[Conversion]], list[Stage1Result]],
    stage2: Callable[[list[Conversion]], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Built conversions of one teacher on one data (one, or a convert study's students), step by step; the
    teacher is measured and timed once for all. Returns the reports, in order."""
    first = runs[0]
    # the run's side: data.img_size, else the size stamped on the student (`parts_around`)
    stamped = getattr(first.student, "pretrained_cfg", {}).get("input_size")
    side = int(
        first.cfg.data.img_size or (stamped[-1] if stamped else image_input(first.teacher).img_size[-1])
    )
    # a sweep side the teacher's family cannot run at stops here, before any work
    sweep = sweep_sides(first.cfg, first.teacher, side)
    with _configs_kept_if_refused(runs) as judged:
        for run in runs:
            run.sweep = sweep
            _describe(run)
            _place(run, first)
            # a stage that cannot resume is refused before the teacher is measured; judged when skipped too,
            # so that --skip-stage1 into a run with a stage 1 saved is refused, not silently set aside
            run.judge_stage1()
            with speak.quiet():  # stage 2's own run judges it again, saying what changed
                judged_resume(
                    stage2_config(run),
                    rank_and_world()[1],
                    scoring=False,
                    command="convert",
                    loaders_built=run.parts is not None,
                )
        judged()  # from here on, work is done under the new config
        if earlier := _finished_reports(runs):
            return earlier
        teacher_top1 = (
            evaluate_top1(first.teacher, first.parts.val_loader, first.device, first.classes)
            if first.labelled
            else None
        )
        if teacher_top1 is None:
            speak.say(f"teacher val top-1: none ({HEADLESS_TEACHER if first.labelled else NO_LABELS})")
        else:
            speak.say(f"teacher val top-1 {teacher_top1:.2f}")
        if (
            near_chance := teacher_near_chance(teacher_top1, getattr(first.teacher, "num_classes", 0))
        ) is not None:
            speak.warn(near_chance)
        for run in runs:
            measure(run, "before_stage1")
        t1 = time.monotonic()
        stage1s = stage1(runs)
        t2 = time.monotonic()
        stage2s = stage2(runs)
        t3 = time.monotonic()
    speeds = _speeds(runs)
    reports = []
    for run, s1, s2, speed in zip(runs, stage1s, stage2s, speeds, strict=True):
        operations = operation_counts(run.teacher, run.student, batch=1)
        # a resumed stage's seconds count the attempts before this one (its checkpoints'): so does the total,
        # by what each stage counts beyond the time this attempt spent in it
        earlier = (
            max(0.0, run.seconds.get(s, 0.0) - t) for s, t in (("stage1", t2 - t1), ("stage2", t3 - t2))
        )
        run.seconds["total"] = time.monotonic() - t0 + sum(earlier)
        report = _report(run, teacher_top1, s1, s2, speed, operations)
        for worse in (report["stage1_worse"], report["stage2_worse"]):
            if worse:
                run.say(f"warning: {worse['message']}")
        if run.main:
            atomic_write_json(run.run_dir / "report.json", report)
            atomic_write_text(run.run_dir / "report.md", render_conversion_report(report))
            run.say(f"report: {run.run_dir / 'report.md'}")
        reports.append(report)
    return reports


def _finished_reports(runs: list[Conversion]) -> list[dict[str, Any]] | None:
    """The reports of conversions whose two stages had both ended where their configs plan them: a rerun has
    nothing to train, and measuring again would only rewrite each report's figures (a speed differs from one
    measurement to the next). None where any of them has work left, or no report."""
    reports = []
    for run in runs:
        report, stage1 = run.run_dir / "report.json", run.stage1_found.point
        stage2 = ResumePoint.find(run.run_dir / STAGE_DIRS[1], run.cfg.checkpoint.resume, verify_hash=False)
        stage1_ended = run.plan.stage1_steps <= 0 or (
            stage1 is not None and stage1.step >= run.plan.stage1_steps
        )
        if not (report.is_file() and stage1_ended and stage2 is not None and stage2.step >= run.stage2_steps):
            return None
        reports.append(json.loads(report.read_text(encoding="utf-8")))
    for run in runs:
        run.say(
            f"nothing to do: {run.run_dir} has run both stages to their ends (stage 1 {run.plan.stage1_steps} "
            f"steps, stage 2 {run.stage2_steps}), and its report stands unchanged: {run.run_dir / 'report.md'}. "
            "To measure it again, move report.json aside; to train stage 2 longer, raise schedule.epochs (or schedule.max_steps)"
        )
    return reports


@contextlib.contextmanager
def _configs_kept_if_refused(runs: list[Conversion]) -> Iterator[Callable[[], None]]:
    """Each run's config.yaml as it was where a stage refuses to resume: its refusal says nothing was written,
    and the run's own config still resumes it. Before the caller calls what this yields (the runs judged, no
    work done) any refusal counts (values its checkpoints cannot take, checkpoints none of which is usable, a
    ``checkpoint.resume`` that names no checkpoint); after it, only values refused (stage 2's own judgement)."""
    folders = [RunDir(run.run_dir) for run in runs if run.main]
    kept = [(f, f.config_file.read_text(encoding="utf-8")) for f in folders if f.config_file.is_file()]
    working = False

    def judged() -> None:
        nonlocal working
        working = True

    try:
        yield judged
    except UserError as e:
        if working and not isinstance(e, ConfigError):
            raise
        for folder, text in kept:
            folder.write_config(text)
        raise


def _each(step: Callable[[Conversion], Any]) -> Callable[[list[Conversion]], list[Any]]:
    return lambda runs: [step(run) for run in runs]


def require_convert_labels(cfg: TrainConfig) -> None:
    """Labels the data lacks where a key asks for them, before any work (a convert study's students and
    `attnxfer submit` too): a task loss asked for by name, a label metric named in eval.metrics (stage 2
    without labels is label-free by default; the report's top-1 and k-NN need labels where they run)."""
    if cfg.transfer.task_weight is not None:
        require_task_labels(cfg)
    check_eval_metrics(cfg)


def checked_config(cfg: TrainConfig, skip_stage1: bool) -> TrainConfig:
    """What convert refuses of its config alone, before any work (`attnxfer submit --command convert` and a
    convert study too): a fresh student's attention key; ``--skip-stage1`` is ``convert.stage1_steps=0``."""
    check_auto(cfg)
    for key, value in (("attention", cfg.model.attention), ("attention_kwargs", cfg.model.attention_kwargs)):
        if value:
            raise InputError(
                f"model.{key}={value!r} is for a fresh student (`attnxfer train`); convert builds its student "
                f"from the teacher's weights with convert.{key}: set that instead"
            )
    changed = config_changes(TrainConfig(), cfg)
    if unread := [
        f"{k}={changed[k][1]}" for k in ("model.name", "model.kwargs", "model.init") if k in changed
    ]:
        speak.warn(
            f"warning: {', '.join(unread)} unused: convert's student is the teacher's architecture and weights, "
            "with convert.attention in its blocks (a train recipe's student keys do not apply)"
        )
    return apply_overrides(cfg, {"convert.stage1_steps": 0}) if skip_stage1 else cfg


def build_conversion(
    cfg: TrainConfig,
    info,
    parts: RunParts | None,
    *,
    name: str | None = None,
    shared: RunParts | None = None,
    study_chooses: bool = False,
) -> Conversion:
    """Teacher, student, data and both stages' plans (``parts`` built by the caller are used as they are;
    ``shared``: a convert study's teacher and loaders, around which only the student ``name`` is built;
    ``study_chooses``: a student of it is convert.attention=auto). Stage 2's weights, chosen here
    (`stage2_objective`), go into the run's config."""
    data, auto = data_info(cfg.data), cfg.convert.attention == AUTO
    labelled = data.has_labels
    if parts is None:
        parts = conversion_parts(cfg, info, shared)
    if parts.teacher is None:
        raise InputError(NO_CONVERT_TEACHER)
    # starting over keeps the earlier attempt's results aside, as stage 1 its checkpoints: no work is lost
    if info.is_main_process and starts_over(cfg.checkpoint.resume):
        for old in (Path(cfg.run_dir) / name for name in _RESULTS):
            if old.is_file():
                speak.warn(
                    f"checkpoint.resume=none: kept the earlier {old.name} as {set_aside(old, 'replaced')}"
                )
    # stage 2's plan refuses a headless teacher's logits: said before the candidates are timed and fitted
    if auto and cfg.transfer.logit_distill:
        t = cfg.transfer
        build_plan(
            parts.teacher, parts.student, "none", logit_weight=1, logit_temperature=t.logit_temperature
        )
    check_candidates(cfg, parts.teacher, parts.img_size)  # before the candidates are timed
    cfg, selection = choose_attentions(
        cfg,
        parts,
        resolve_device(cfg.device),
        main=info.is_main_process,
        plan_for=lambda c, student: conversion_plan_from_config(c, parts.teacher, student),
        others_choose=study_chooses,
    )
    if auto:  # the chosen student, around the stand-in's teacher and loaders
        student = _student_builder(cfg, labelled)(parts.teacher, parts.num_classes)
        stamp_input_cfg(student, parts.mean, parts.std, parts.in_chans, parts.img_size)
        parts = replace(parts, student=student, student_spec=student_spec(student))
        unfitted = apply_overrides(cfg, {"convert.stage1_steps": 0})
        if (
            cfg.convert.stage1_steps
            and not conversion_plan_from_config(unfitted, parts.teacher, student).active
        ):
            # as the choice measured them: swapped in, as a stage 1 with nothing to train leaves them
            speak.say(
                "convert.attention=auto: the chosen attentions have nothing to fit under "
                f"convert.stage1_train={cfg.convert.stage1_train}: stage 1 is skipped (new+qk fits every one)"
            )
            cfg = unfitted
    stage2 = stage2_objective(cfg, parts.teacher, labelled, parts.num_classes)
    student_head(cfg, parts.teacher, stage2, parts.num_classes)  # a task loss without a head stops here
    if stage2.task_weight > 0 and not getattr(parts.student, "num_classes", 0):
        raise InputError(
            "stage 2 has a task loss (transfer.task_weight > 0) but the student has no classifier head; set "
            "model.num_classes=K, or transfer.task_weight=0"
        )
    cfg = apply_overrides(cfg, stage2.overrides | stage2_layers(cfg, parts.student))
    parts = replace(parts, num_classes=int(getattr(parts.student, "num_classes", 0) or 0))
    # as stage 2's engine will count them (a training set of fewer batches than optim.accum_steps refused)
    _, stage2_steps, _ = schedule_steps(parts.train_loader, loop_settings(cfg, world=1))
    return Conversion(
        cfg,
        parts,
        conversion_plan_from_config(cfg, parts.teacher, parts.student),
        stage2,
        plan_from_config(cfg, parts),
        stage2_steps,
        info.is_main_process,
        name,
        Path(cfg.run_dir),
        labelled,
        cfg.model.num_classes or data.num_classes,
        selection=selection,
    )


def conversion_parts(
    cfg: TrainConfig, info, shared: RunParts | None = None, *, stand_in: bool = False
) -> RunParts:
    """Teacher, data and student of a conversion (``shared``: a study's teacher and loaders). The teacher's
    copy stands in for the student under auto, until the attentions are chosen, and where ``stand_in`` asks: a
    study's shared parts, which neither choose nor warn for a student (its own build does, under its name)."""
    # the conversion's own refusal, not the transfer mode's: its advice, transfer.mode=none, converts nothing
    require_teacher(cfg, conversion=True)
    stand_in = stand_in or cfg.convert.attention == AUTO
    builds = (
        apply_overrides(cfg, {"convert.attention": "softmax", "convert.attention_kwargs": {}})
        if stand_in
        else cfg
    )
    student_fn = _student_builder(builds, data_info(cfg.data).has_labels, stand_in=stand_in)
    saved = any(CheckpointManager(Path(cfg.run_dir) / stage).step_dirs() for stage in STAGE_DIRS)
    fresh = starts_over(cfg.checkpoint.resume)
    with teacher_where_it_was(cfg.run_dir, saved and not fresh):
        return build_run_parts(
            cfg, rank=info.rank, world_size=info.world_size, student_fn=student_fn, labels=True, shared=shared
        )


def _student_builder(
    cfg: TrainConfig, labelled: bool, stand_in: bool = False
) -> Callable[[nn.Module, int], nn.Module]:
    """How `build_run_parts` makes the student: the teacher with ``convert.attention`` swapped in, with the
    head stage 2 needs (`student_head`). A ``stand_in`` (while auto chooses) draws nothing from the run's
    random streams, leaving the chosen student's initialisation to the seed alone."""
    c = cfg.convert

    def make_student(teacher: nn.Module, num_classes: int) -> nn.Module:
        objective = stage2_objective(cfg, teacher, labelled, num_classes)
        head = student_head(cfg, teacher, objective, num_classes)
        with torch.random.fork_rng(devices=[]) if stand_in else contextlib.nullcontext():
            try:
                student = build_efficient_student(
                    teacher, c.attention, num_classes=head, **c.attention_kwargs
                )
            except InputError as e:
                if refuses_an_option(e, c.attention_kwargs):  # said under the key the options sit in
                    raise InputError(f"convert.attention_kwargs: {e}") from None
                raise
            except (TypeError, ValueError, RuntimeError) as e:  # a value the attention cannot be built with
                if not c.attention_kwargs:  # without the user's options, a failure is attnxfer's bug
                    raise
                raise InputError(
                    f"convert.attention={c.attention} cannot be built with convert.attention_kwargs "
                    f"{c.attention_kwargs}: {type(e).__name__}: {e}"
                ) from e
        return set_drop_path(student, cfg.model.drop_path_rate)

    return make_student


def _describe(run: Conversion) -> None:
    run.say(run.plan.describe())
    starts = "after stage 1" if run.plan.stage1_steps > 0 else "with the new attention swapped in, no stage 1"
    run.say(
        f"stage 2: fine-tunes the converted student end to end (the teacher's weights {starts}; not a "
        f"fresh initialisation), {run.stage2_steps} steps (schedule/optim sections), by "
        f"{run.stage2.describe()}; " + run.stage2_plan.describe().replace("\n", "\n  ")
    )


def _place(run: Conversion, like: Conversion) -> None:
    """Write the run's config, put both models on the device and take the probe images (``like``'s: a study's
    students are measured on the same images)."""
    if run.main:
        RunDir(run.run_dir).write_config(dump_config(run.cfg, "convert", as_run=True))
    run.device = resolve_device(run.cfg.device)
    # Stage 1 and every measurement run the teacher in fp32: its maps are regression targets and the report
    # compares stages in one precision. Stage 2 runs it in teacher.dtype (bf16 on GPU by default).
    run.teacher.to(device=run.device, dtype=torch.float32).eval()
    run.student.to(run.device)
    if like is not run:
        run.probe, run.quality = like.probe, like.quality
        return
    run.probe = [
        x.to(run.device)
        for x, *_ in itertools.islice(run.parts.val_loader, run.cfg.convert.agreement_batches)
    ]
    if not run.probe:
        raise InputError("the validation set is empty: convert measures map agreement on it")
    bank = build_bank_loader(run.cfg, run.parts.val_loader.dataset) if run.labelled else None
    e = run.cfg.eval
    run.quality = QualityProbe(
        run.teacher, run.parts.val_loader, run.device, bank, e.knn_k, e.knn_temperature
    )


def measure(run: Conversion, stage: str) -> None:
    """The student at ``stage``: map agreement with the teacher (on the teacher's hidden inputs and on its
    own), final-feature agreement, and where the data has labels k-NN top-1 and (with a head) val top-1."""
    start = time.monotonic()
    top1, hits = (
        top1_and_hits(run.student, run.parts.val_loader, run.device, run.classes)
        if run.labelled
        else (None, None)
    )
    res = {
        "teacher_input": map_agreement(run.teacher, run.student, run.probe, inputs="teacher"),
        "end_to_end": map_agreement(run.teacher, run.student, run.probe, inputs="own"),
        "features": run.quality.features(run.student),
        "knn": run.quality.knn(run.student),
        "val_top1": top1,
        "val_hits": hits,  # one 0/1 per val image, in the val set's order: paired tests between students
    }
    name = stage.replace("_stage", " stage ")  # after_stage1 -> after stage 1
    run.seconds[f"measure_{name}"] = time.monotonic() - start
    knn = res["knn"]
    # a KL beside the floor its map's zeros put under it (a window's), which no stage can lower
    agreement = [
        f"{row['value']:.3g}"
        + (f" (floor {floor:.3g})" if (floor := row.get("kl_floor") or 0) > 0.01 else "")
        for row in res["end_to_end"]
    ]
    quality = [f"final-feature cosine (patch tokens) {res['features']['feat_cos_patch']:.4f}"]
    if knn and "knn_top1" in knn:
        quality.append(f"k-NN top-1 {knn['knn_top1']:.2f} (teacher {knn['knn_teacher_top1']:.2f})")
    if top1 is not None:
        quality.append(f"val top-1 {top1:.2f}")
    run.say(f"{name}: student {', '.join(quality)}; end-to-end per-layer agreement {', '.join(agreement)}")
    run.measured[stage] = res


def _stage1(run: Conversion) -> Stage1Result:
    """Stage 1: each new attention fitted to the teacher's, then measured."""
    return stage1_done(run, run.stage1_job().run() if run.plan.stage1_steps > 0 else None)


def stage1_done(run: Conversion, stage1: Stage1Result | None) -> Stage1Result:
    """After stage 1 (None: it was skipped, or it stopped): its seconds, and the student measured."""
    if stage1 is None:
        run.measured["after_stage1"] = None
        return Stage1Result()
    run.seconds["stage1"] = stage1.seconds
    measure(run, "after_stage1")
    return stage1


def _stage2(run: Conversion) -> dict[str, Any]:
    """Stage 2: an ordinary training run in ``stage2/``, then measured; the report's ``stage2`` section."""
    return stage2_done(run, train(stage2_config(run), run.parts, command="convert"))


def stage2_config(run: Conversion) -> TrainConfig:
    return apply_overrides(run.cfg, {"run_dir": str(run.run_dir / "stage2")})


def stage2_done(run: Conversion, result: TrainResult | None, stopped: str | None = None) -> dict[str, Any]:
    """The report's ``stage2`` section (``result`` None: it did not run, or ``stopped`` says why it stopped),
    and the student measured where it trained."""
    stage2: dict[str, Any] = {
        "steps": run.stage2_steps,
        "plan": run.stage2_plan.describe(),
        "objective": run.stage2.describe(),
        "task_weight": run.stage2.task_weight,
        "feature_distill": run.stage2.feature_distill,
    }
    if stopped is not None:
        stage2["stopped"] = stopped
    if result is None:
        run.measured["after_stage2"] = None
        return stage2
    run.teacher.to(device=run.device, dtype=torch.float32)  # stage 2 may have cast it to teacher.dtype
    run.student.to(run.device)
    trained = dict(
        run_dir=result.run_dir,
        seconds=result.seconds,
        final=result.final,
        history=result.history,
        best_top1=result.best_top1,
        best_metric=result.metric,
        best=result.best,
    )
    if result.nothing_to_do:  # a finished stage 2 found again: what it trained is in the earlier report
        try:
            earlier = json.loads((run.run_dir / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = {}
        trained |= {k: v for k, v in earlier.get("stage2", {}).items() if k in trained}
    stage2.update(trained)
    run.seconds["stage2"] = stage2["seconds"]
    # measured as exported (the best checkpoint, its EMA where kept), not as the last step left the weights
    exported = RunDir(result.run_dir).load_student()
    run.student.load_state_dict(exported.model.state_dict())
    stage2["measured"] = f"{exported.why}, {exported.weights} weights, as `attnxfer export` takes them"
    measure(run, "after_stage2")
    return stage2


def _speeds(runs: list[Conversion]) -> list[dict[str, Any]]:
    """Images/s of teacher, each student and the floor at the run's size and precision, interleaved in one
    call (the teacher timed once for all), then the break-even sweep, each side's students made as the runs'."""
    first = runs[0]
    shape = (first.cfg.convert.speed_batch_size, *first.probe[0].shape[1:])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(first.device)
    precision = resolve_precision(first.cfg.precision, first.device)
    by_key = {str(i): run for i, run in enumerate(runs)}  # students by place (their names may repeat)
    makers = {
        k: (_student_builder(run.cfg, run.labelled), run.parts.num_classes) for k, run in by_key.items()
    }
    sides, budget_s = first.sweep
    speeds = conversion_speeds(
        first.cfg,
        first.teacher,
        {k: run.student for k, run in by_key.items()},
        x,
        sides=sides,
        budget_s=budget_s,
        make_students=lambda teacher: {
            k: _made(make, teacher, classes) for k, (make, classes) in makers.items()
        },
        autocast=precision.dtype if precision.autocasts else None,
    )
    for k, run in by_key.items():
        for line in speed_lines(speeds[k]):
            run.say(line)
    return [speeds[k] for k in by_key]


def _made(
    make: Callable[[nn.Module, int], nn.Module], teacher: nn.Module, classes: int
) -> nn.Module | InputError:
    """A student of the sweep's ``teacher``, or the refusal of its build there (a linformer's seq_len is the
    run's token count): that side is skipped for that student alone, not for the study's others."""
    try:
        return make(teacher, classes)
    except InputError as e:
        return e


def _report(
    run: Conversion,
    teacher_top1: float | None,
    stage1: Stage1Result,
    stage2: dict[str, Any],
    speed: dict[str, Any],
    operations: dict[str, Any],
) -> dict[str, Any]:
    cfg, plan, parts, measured = run.cfg, run.plan, run.parts, run.measured
    final_stage = next(s for s, _ in reversed(STAGE_ROWS) if measured[s] is not None)
    student_top1 = measured[final_stage]["val_top1"]
    top1 = {"teacher": teacher_top1, **{s: (m["val_top1"] if m else None) for s, m in measured.items()}}
    agreement = {
        which: _merge_agreement({s: (m[which] if m else None) for s, m in measured.items()})
        for which in ("teacher_input", "end_to_end")
    }
    return {
        "version": _REPORT_VERSION,
        "run_dir": str(run.run_dir),
        "teacher": {"spec": cfg.teacher.spec, "record": parts.teacher_record, "val_top1": teacher_top1},
        "student": {
            "attention": [layer.attention for layer in plan.layers],
            "attention_kwargs": plan.attention_kwargs,
            "spec": parts.student_spec,
            "num_classes": int(getattr(run.student, "num_classes", 0) or 0),  # 0: a headless encoder
            "new_parameters": sum(p.numel() for _, p in new_parameters(run.student)),
        },
        "data": {
            "dataset": cfg.data.dataset,
            "labels": run.labelled,
            "val_size": dataset_size(parts.val_loader),
            "agreement_images": sum(x.shape[0] for x in run.probe),
        },
        "plan": plan.to_dict(),
        "stage1": {
            "steps": stage1.steps,
            "skipped": plan.stage1_steps <= 0,
            "resumed": stage1.resumed,
            "seconds": stage1.seconds,
            "history": stage1.history,
            "batch_size": plan.stage1_batch_size,
            "lr": plan.stage1_lr,
            "train": plan.stage1_train,
            "memory": stage1.memory,  # peak beside the teacher's whole maps (`train.peak_memory`)
        },
        "stage2": stage2,
        "top1": top1,
        "val_hits": {s: (m.get("val_hits") if m else None) for s, m in measured.items()},
        "student_top1": student_top1,
        "recovered_pct": (
            100.0 * student_top1 / teacher_top1 if teacher_top1 and student_top1 is not None else None
        ),
        "agreement": agreement,
        # final-token agreement with the teacher per stage (feat_cos_patch, feat_rel_err_patch, ..._prefix)
        "features": {s: (m["features"] if m else None) for s, m in measured.items()},
        # k-NN top-1 of student and teacher per stage (None: no labels), with intervals and the share recovered
        "knn": {s: (m["knn"] if m else None) for s, m in measured.items()} if run.labelled else None,
        # stage 1 left a block's map further from the teacher's than swapped in (None: it did not)
        "stage1_worse": stage1_worse(agreement["teacher_input"], stage1.steps),
        # stage 2 left the student worse than stage 1 by its quality measure (None: it did not)
        "stage2_worse": stage2_worse(measured, stage2["steps"]),
        "speed": speed,
        "operations": operations,
        "seconds": run.seconds,
        **({"stopped": run.stopped} if run.stopped else {}),
        **({"selection": measured_section(run, speed)} if run.selection else {}),
    }


def convert_main(cfg: TrainConfig) -> dict[str, Any]:
    """`convert` as a job's main (``attnxfer submit --command convert``): the report is the job's result."""
    return convert(cfg).report
