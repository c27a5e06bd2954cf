"""`attnxfer eval`: score a run's checkpoint on its validation set, with the engine training would build
(writing nothing), plus what `eval_metrics` says; its one output file is ``RUN_DIR/eval-<step>.json``. A
model that is no run (timm's validate.py) is scored by `evaluate_model`, which writes nothing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...checkpoints.resume_point import ResumePoint, starts_over
from ...checkpoints.run_lock import check_writable, disk_error
from ...checkpoints.store import CheckpointError, atomic_write_json
from ...config import TrainConfig, to_dict
from ...data.registry import dataset_options
from ...errors import InputError
from ...models.mae import MaskedAutoencoder
from ...run_layout import CHECKPOINTS_SUBDIR, EVAL_SCORES, RUN_RECORD
from ...sources.exported_student import load_student
from ...sources.resolve import parse_teacher_spec, resolve
from ...speak import say
from ...train.distributed import DistributedInfo, backend_for, joined_process_group
from ...train.engine import Engine
from ...train.evaluation import evaluate, evaluate_features, evaluate_knn
from ...train.runtime import create_runtime
from ...transfer.modes import get_mode
from ...transfer.teacher_student import TeacherStudent
from .loaders import build_bank_loader, data_info
from .parts import RunParts, build_run_parts
from .training import build_engine, check_eval_metrics, same_tokens, task_weight_of


@dataclass
class EvalResult:
    step: int
    checkpoint: str
    metrics: dict[str, float]
    path: Path  # the result file: RUN_DIR/eval-<step>.json


def eval_metrics(cfg: TrainConfig, *, own_objective: bool = False) -> frozenset[str]:
    """``eval.metrics`` resolved (``auto``: top1 and knn where the data has labels, features where there is
    a teacher); a metric asked for by name that the run cannot give stops here, before any work.
    ``own_objective``: the engine scores an objective of its own (MAE's val loss)."""
    asked = set(cfg.eval.metrics)
    info = data_info(cfg.data)
    teacher = bool(cfg.teacher.spec)
    # copy modes: the student alone is not the model (it attends with the teacher's maps)
    with_teacher = not own_objective and get_mode(cfg.transfer.mode).teacher_at_eval
    if "auto" in asked:
        asked.discard("auto")
        asked |= {"top1", "knn"} if info.has_labels else set()
        asked |= {"features"} if teacher and not with_teacher and not own_objective else set()
        if with_teacher:
            asked -= {"knn", "features"}
    # those asked for by name: auto adds top1 and knn only where there are labels, top1 only with a task loss
    check_eval_metrics(cfg, own_objective=own_objective)
    if own_objective or task_weight_of(cfg) == 0:  # MAE's val loss, or feature agreement: no head was trained
        asked.discard("top1")
    if not asked and not own_objective:
        why = "top-1 and k-NN need labels (data.labels=true) and feature agreement a teacher (teacher.spec)"
        raise InputError(f"nothing to score: {why if cfg.eval.metrics else 'eval.metrics is empty'}")
    return frozenset(asked)


def _quality_metrics(
    cfg: TrainConfig, engine: Engine, wanted: frozenset[str], have: dict
) -> dict[str, float]:
    """Feature agreement and k-NN top-1 of the loaded checkpoint's student (its raw weights, not the EMA's)."""
    pair, student, teacher = engine.module, engine.student, None
    if isinstance(pair, TeacherStudent):
        teacher = pair.teacher
    elif isinstance(student, MaskedAutoencoder):  # pre-training: its encoder is the model
        student = student.encoder
    out: dict[str, float] = {}
    if "features" in wanted and not same_tokens(student, teacher):
        if "features" in cfg.eval.metrics:
            raise InputError(
                "eval.metrics=features: the student's final tokens differ from the teacher's (width or prefix "
                "tokens), so they cannot be compared token for token; drop features from eval.metrics"
            )
        wanted = wanted - {"features"}  # auto: a student of another shape has no feature agreement
    if "features" in wanted and "val_feat_cos_patch" not in have:  # a run without labels scored them already
        scores = evaluate_features(engine.model, engine.val_loader, engine.accelerator)
        out |= {f"val_{k}": v for k, v in scores.items()}
    if "knn" in wanted:
        e = cfg.eval
        out |= evaluate_knn(
            student,
            teacher,
            build_bank_loader(cfg, engine.val_loader.dataset),
            engine.val_loader,
            engine.accelerator,
            k=e.knn_k,
            temperature=e.knn_temperature,
        )
    return out


def _result_path(run_dir: Path, step: int, config: dict[str, Any]) -> Path:
    """``eval-<step>.json``, or where it holds another evaluation of that step (other metrics or settings)
    the next free ``eval-<step>-<n>.json``: a second eval keeps the first one's scores."""
    path, n = run_dir / EVAL_SCORES.format(step, ""), 1
    as_written = {**json.loads(json.dumps(config)), "run_dir": None}  # where the run was scored, not how
    while path.is_file():
        with contextlib.suppress(OSError, LookupError, TypeError, ValueError):  # unreadable or not ours: kept
            if {**json.loads(path.read_text(encoding="utf-8"))["config"], "run_dir": None} == as_written:
                return path  # the same evaluation again: its scores replace their own
        n += 1
        path = run_dir / EVAL_SCORES.format(step, f"-{n}")
    return path


def evaluate_run(
    cfg: TrainConfig,
    parts: RunParts | None = None,
    build: Callable[[TrainConfig, ResumePoint], Engine] | None = None,
    command: str = "eval",
) -> EvalResult:
    """Score the run's newest checkpoint (or ``checkpoint.resume=PATH``); a run without one, or whose dir
    cannot take the result file, is refused before anything is computed. No lock: scoring a run that
    trains is fine. ``command``: the one whose sections ``build``'s score reads too (pretrain: mae.*), so
    the result file records them."""
    wanted = eval_metrics(cfg, own_objective=build is not None)
    if starts_over(cfg.checkpoint.resume):
        raise CheckpointError("eval needs a checkpoint: use checkpoint.resume=auto (the newest) or a PATH")
    point = ResumePoint.find(cfg.run_dir, cfg.checkpoint.resume)
    if point is None:
        raise CheckpointError(
            f"{cfg.run_dir} has no checkpoint to evaluate (no intact {cfg.run_dir}/checkpoints/step-*); "
            "train it first, or point -c at the config.yaml of a run that has checkpoints"
        )
    # the training run whose checkpoints/ holds it: its scores are that run's (a conversion's stage 1 is none:
    # its checkpoint is refused below for what it holds)
    owner = point.path.parent.parent
    of_a_run = point.path.parent.name == CHECKPOINTS_SUBDIR and (owner / RUN_RECORD).is_file()
    if of_a_run and owner.resolve() != Path(cfg.run_dir).resolve():
        raise CheckpointError(
            f"checkpoint.resume={cfg.checkpoint.resume} is a checkpoint of the run {owner}, not of {cfg.run_dir}: "
            f"its scores belong with that run, where eval writes them: attnxfer eval {point.path}"
        )
    if DistributedInfo.from_environment().is_main_process:
        check_writable(cfg.run_dir)
    with joined_process_group(backend_for(cfg.device), cfg.dist.timeout):
        if build is None:
            engine = build_engine(cfg, parts, scoring=True, found=point)
        else:  # another objective's engine (pretrain), built without writing into the run
            engine = build(cfg, point)
        metrics = engine.evaluate_checkpoint()
        metrics |= _quality_metrics(cfg, engine, wanted, metrics)
        config = to_dict(cfg, command)  # the sections every command reads, and the objective's own
        path = _result_path(Path(cfg.run_dir), engine.step, config)
        if engine.is_main:
            record = {
                "step": engine.step,
                "checkpoint": engine.last_ckpt,
                "metrics": metrics,
                "config": config,
            }
            try:
                atomic_write_json(path, record)
            except OSError as e:  # filled up while scoring: say so in one line, with the scores
                plain = disk_error(e, cfg.run_dir)
                if plain is None:
                    raise
                raise type(plain)(f"{plain} (the scores: {json.dumps(metrics)})") from e
        return EvalResult(engine.step, str(engine.last_ckpt), metrics, path)


def evaluate_model(cfg: TrainConfig) -> dict[str, float]:
    """timm's validate.py for a model that is no run (``teacher.spec``: a timm name, ``hf-hub:``,
    ``local-dir:``, a weights file): on the val split of ``data``, at its own input size and statistics
    unless data.* says, its top-1/top-5/loss where its head has the data's classes, and the k-NN top-1 of its
    pooled features where the data has labels (with a head or without). Writes nothing."""
    asked = set(cfg.eval.metrics)
    if not asked:
        raise InputError("nothing to score: eval.metrics is empty (top1, knn or auto)")
    if "features" in asked:  # a student's agreement with its teacher; a model alone has neither
        raise InputError(
            "eval.metrics=features compares a run's student with its teacher: drop it for a model"
        )
    if not data_info(cfg.data).has_labels:
        raise InputError(
            f"data.dataset={cfg.data.dataset} has no labels here: top-1 and k-NN top-1 need them (data.labels=true)"
        )
    # as timm's validate.py: the model's own crop and interpolation where the dataset takes them and data.kwargs
    # leaves them out (a run's val split keeps the dataset's: its student learned on those)
    t, d = cfg.teacher, cfg.data
    res = resolve(parse_teacher_spec(t.spec, t.revision), arch=t.arch, cache_dir=t.cache_dir)
    own, takes = res.pretrained_cfg, dataset_options(d.dataset)
    fill = ("crop_pct", "crop_mode", "interpolation")
    d = replace(d, kwargs={**{k: own[k] for k in fill if k in takes and own.get(k)}, **d.kwargs})
    # the model is built as a run's teacher is, or, a converted student's export (which no teacher can be), as
    # load_student builds it, its images normalised by its own statistics (a teacher's come from its record)
    exported = res.efficient_attention is not None
    if exported:
        d = replace(d, mean=d.mean or own.get("mean"), std=d.std or own.get("std"))
        cfg = replace(cfg, teacher=replace(t, spec=None), transfer=replace(cfg.transfer, mode="none"))
    cfg = replace(cfg, data=d)
    with joined_process_group(backend_for(cfg.device), cfg.dist.timeout):
        runtime = create_runtime(cfg.device, cfg.precision, deterministic=cfg.deterministic)
        parts = build_run_parts(
            cfg,
            runtime.rank,
            runtime.world,
            lambda teacher, _: (
                load_student(t.spec, revision=t.revision, cache_dir=t.cache_dir) if exported else teacher
            ),
            labels=True,
        )
        model, classes = parts.student.to(runtime.device).eval(), parts.num_classes
        head = getattr(model, "num_classes", 0)
        its_head = f"{t.spec} has {f'a head of {head} outputs' if head else 'no head'}, and data.dataset="
        its_head += f"{cfg.data.dataset} has {classes} classes"
        if "top1" in asked and head != classes:
            raise InputError(f"eval.metrics=top1: {its_head}: drop top1 (k-NN top-1 needs no head)")
        # a head of as many outputs, for other classes (config.json's label_names): its top-1 would mean nothing
        named, theirs = [str(n) for n in own.get("label_names") or ()], parts.class_names
        if head == classes and named and theirs and named != theirs:
            shown = lambda names: ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            its_head = (
                f"{t.spec}'s head names its classes {shown(named)}, and data.dataset={cfg.data.dataset}'s are"
            )
            its_head += f" {shown(theirs)}"
            if "top1" in asked:
                raise InputError(f"eval.metrics=top1: {its_head}: give the data it learned, or drop top1")
            head = -1  # no top-1 under auto, said below
        top1 = "top1" in asked or ("auto" in asked and head == classes)
        if "auto" in asked and not top1:
            say(f"no top-1: {its_head}")
        scores = evaluate(model, parts.val_loader, runtime.accelerator) if top1 else {}
        metrics = {f"val_{k}": v for k, v in scores.items()}  # as a run's eval names them
        if "knn" in asked or "auto" in asked:
            bank = build_bank_loader(cfg, parts.val_loader.dataset)
            e = cfg.eval
            knn = evaluate_knn(
                model,
                None,
                bank,
                parts.val_loader,
                runtime.accelerator,
                k=e.knn_k,
                temperature=e.knn_temperature,
            )
            metrics |= knn
        return metrics
