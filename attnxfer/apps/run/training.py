"""`attnxfer train` / `eval`: the one place a `TrainConfig` becomes a runtime, models, data, a plan and an
`Engine` (as MAE's main_finetune.py does for its engine): the engine takes only what is built here."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from ...checkpoints.resume_point import ResumeFrom, ResumePoint
from ...checkpoints.run_dir import RunDir
from ...checkpoints.run_lock import refuse_file_in_the_way, run_lock
from ...config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    config_changes,
    dump_config,
    to_dict,
    validate_config,
)
from ...data import data_identity, dataset_has_labels, require_labels
from ...data.seeding import sample_seed
from ...errors import InputError
from ...models.attention import attention_blocks, get_attention_class, list_attentions
from ...models.efficient.hierarchical import is_hierarchical
from ...models.student import student_from_spec
from ...plugins import ATTENTION_GROUP, LOSS_GROUP, entry_point_origin
from ...speak import say, warn
from ...train.compile import checkpoint_gradients, compile_blocks, is_compiled
from ...train.distributed import DistributedInfo, backend_for, barrier, joined_process_group
from ...train.drive import Drive
from ...train.ema import StudentEMA
from ...train.engine import CheckpointPolicy, Engine, LoopSettings, TrainResult
from ...train.evaluation import evaluate, evaluate_features
from ...train.measure import attention_calls
from ...train.objective import Objective, Pictures, TaskLoss, TransferObjective
from ...train.optim import build_adamw, optimizer_implementation, student_param_groups
from ...train.runtime import Runtime, create_runtime, set_seed, teacher_dtype
from ...train.trackers import TRACKERS, prepare_trackers
from ...transfer.comparisons import COMPARISON_LOSSES
from ...transfer.modes import MODES
from ...transfer.plan import TransferPlan, build_plan
from ...transfer.teacher_student import TeacherStudent
from ...version import software_record
from .ce_choice import ce_choice_for_run
from .loaders import data_info, data_seed
from .parts import RunParts, build_run_parts
from .pictures import class_token_pictures
from .resume import check_same_data, check_teacher_content, judge, student_as_trained, teacher_where_it_was
from .world_size import fit_world_size, recorded_split, split_for_world


def require_task_labels(cfg: TrainConfig) -> None:
    """A run with a task loss reads labels: data read without them (``data.labels: false``) stops here, saying
    how to train without one. So does a label-based metric asked for by name (``eval.metrics``)."""
    if task_weight_of(cfg) > 0:
        fix = (  # a copy student alone is not the model: it has no score but its task loss's
            "use labelled data, or transfer.mode=distill (copy needs a task loss)"
            if MODES[cfg.transfer.mode].teacher_at_eval
            else "set transfer.task_weight=0 (no task loss: distil the teacher's final features with "
            "transfer.feature_distill, or its attention with transfer.mode)"
        )
        info = data_info(cfg.data)
        require_labels(info, "the task loss (cross-entropy of the student's logits)", fix)
        if (cfg.model.num_classes or info.num_classes) == 1:  # softmax over one class: a loss of 0 always
            raise InputError(f"data.dataset={info.name} has one class (task loss 0): add one, or {fix}")
    check_eval_metrics(cfg)


def check_eval_metrics(
    cfg: TrainConfig,
    *,
    own_objective: bool = False,
    task_weight: float | None = None,
    why: str = "transfer.task_weight=0",
) -> None:
    """``eval.metrics`` naming a metric the run cannot give stops here, in one line, before any work: in
    `attnxfer eval`, and in train, convert and pretrain, whose runs it would later score. A label-based metric
    (top1, knn) on data read without labels, top1 on a run without a task loss (no head trained), features
    without a teacher, features or knn of a copy-mode student (the teacher's maps are part of the model).
    ``own_objective``: MAE pre-training; ``task_weight``: the one the run uses where it is not
    ``transfer.task_weight``'s (convert's stage 2 resolves it), and ``why`` it is 0 (a headless teacher, data
    without labels)."""
    if "features" in cfg.eval.metrics and (own_objective or not cfg.teacher.spec):
        raise InputError(
            "eval.metrics=features compares the student's final features with its teacher's, and this run has "
            "no teacher (teacher.spec); drop features from eval.metrics"
        )
    named = sorted(set(cfg.eval.metrics) & {"knn", "features"})
    if named and not own_objective and MODES[cfg.transfer.mode].teacher_at_eval:
        raise InputError(
            f"eval.metrics={named}: a transfer.mode={cfg.transfer.mode} student attends with its teacher's "
            "maps, so its features alone are not the model; drop them from eval.metrics"
        )
    info = data_info(cfg.data)
    for name in sorted(set(cfg.eval.metrics) & LABEL_METRICS):
        fix = f"use labelled data with data.labels=true, or drop {name} from eval.metrics"
        require_labels(info, f"eval.metrics={name}", fix)
    weight = task_weight_of(cfg) if task_weight is None else task_weight
    if "top1" in cfg.eval.metrics and (own_objective or weight == 0):
        why = "MAE pre-training" if own_objective else why
        headless = "knn needs" if own_objective else "features and knn need"  # MAE's run has no teacher
        raise InputError(
            f"eval.metrics=top1: this run has no task loss ({why}), so no head was trained "
            f"to score; drop top1 from eval.metrics ({headless} no head)"
        )


#: the metrics of ``eval.metrics`` that read labels
LABEL_METRICS = frozenset({"top1", "knn"})


def task_weight_of(cfg: TrainConfig) -> float:
    """``transfer.task_weight`` as this run uses it (null: 1; `attnxfer convert` resolves it before training)."""
    weight = cfg.transfer.task_weight
    return 1.0 if weight is None else float(weight)


def plan_from_config(
    cfg: TrainConfig, parts: RunParts, *, said: bool = True, own_keys: Collection[str] | None = None
) -> TransferPlan:
    """The transfer plan the ``transfer`` section asks for, validated against the two models. ``said`` False:
    the values it leaves unused go unsaid (a study's report scoring students that said them as they trained);
    ``own_keys``: only those of them are said (a study's student: its own keys, not the base's that its
    siblings read, as a copy student beside a distilled one)."""
    t = cfg.transfer
    feature_weight = 0.0 if t.feature_distill is None else float(t.feature_distill)  # convert resolves null
    plan = build_plan(
        parts.teacher,
        parts.student,
        t.mode,
        end_layer=t.end_layer,
        layers=t.layers,
        weight=t.atd_weight,
        share_drop_path=t.share_drop_path,
        logit_weight=t.logit_distill,
        logit_temperature=t.logit_temperature,
        feature_weight=feature_weight,
        task_weight=task_weight_of(cfg),
        losses=t.losses,
    )
    if not said:
        return plan
    # a value set where nothing reads it is said, not silently dropped
    changed = config_changes(TrainConfig(), cfg)
    moves_none = not plan.pairs and not any(c.pairs for c in plan.comparisons)
    no_ce = not any(c.loss_fn.uses_ce_path and c.pairs for c in plan.comparisons)
    unread = {
        "transfer.atd_weight": plan.mode.distill is None,
        "transfer.layers": moves_none,
        "transfer.share_drop_path": moves_none,  # the masks of layers no comparison pairs
        "transfer.end_layer": moves_none or t.layers is not None,  # layers wins over end_layer
        "transfer.ce_path": no_ce,
        "transfer.materialise_budget_gib": no_ce or t.ce_path != "auto" or cfg.deterministic,  # nothing timed
    }
    unused = [
        f"{k}={changed[k][1]}"
        for k, u in unread.items()
        if u and k in changed and (own_keys is None or k in own_keys)
    ]
    if unused:
        warn(
            f"warning: {', '.join(unused)} unused with transfer.mode={t.mode}"
            f"{' and transfer.layers set' if t.layers is not None and not moves_none else ''}: atd_weight "
            "weighs a distill mode's loss; layers (or, without it, end_layer) choose the layers a mode, or a "
            "layer comparison in transfer.losses, moves; ce_path evaluates a distilled softmax map's CE "
            "(materialise_budget_gib: when auto times the ways, which deterministic=true does not)"
        )
    if not t.logit_distill and "transfer.logit_temperature" in changed:
        warn(
            f"warning: transfer.logit_temperature={t.logit_temperature:g} unused with transfer.logit_distill=0: "
            "it softens the logits of logit distillation alone; set transfer.logit_distill > 0, or drop it"
        )
    if plan.task_weight == 0 and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0):  # mixup mixes images with labels
        warn(
            "warning: aug.mixup/cutmix unused with transfer.task_weight=0: images are mixed only with their "
            "labels, for the task loss; set aug.mixup=0 aug.cutmix=0, or transfer.task_weight > 0"
        )
    return plan


def scoring_for(plan: TransferPlan, parts: RunParts) -> tuple[Callable, str]:
    """How a run is scored at each evaluation, and by which metric its best checkpoint is the highest: val
    top-1 where it has a task loss and labels, else the mean cosine of its patch tokens' final features with
    the teacher's (the share of what feature distillation trains that needs no label)."""
    if plan.task_weight > 0 and dataset_has_labels(parts.val_loader.dataset):
        return evaluate, "val_top1"
    if plan.mode.teacher_at_eval:  # as `attnxfer eval` refuses features: the student alone is not the model
        raise InputError(
            f"transfer.mode={plan.mode.name} without a task loss has no score: a run without one is scored "
            "by its student's final features alone, and this student attends with its teacher's maps; set "
            "transfer.task_weight > 0 (with labels), or transfer.mode=distill"
        )
    if parts.teacher is None or not same_tokens(parts.student, parts.teacher):
        raise InputError(
            "a run without a task loss (transfer.task_weight=0, or data without labels) is scored by its final "
            "features' agreement with the teacher's, so it needs a teacher (teacher.spec) whose final tokens "
            "the student's match (the same width and prefix tokens: model.mirror_teacher=true)"
        )
    return evaluate_features, "val_feat_cos_patch"


def task_loss_from_config(cfg: TrainConfig, num_classes: int) -> TaskLoss:
    """Cross-entropy with label smoothing, or timm's Mixup/CutMix with soft-target cross-entropy."""
    aug = cfg.aug
    if aug.mixup > 0 or aug.cutmix > 0:
        if cfg.data.batch_size % 2:  # timm's Mixup mixes each image with its mirror in the batch (an assert)
            raise InputError(
                f"aug.mixup/cutmix mix each image of a batch with another, in pairs, so data.batch_size (per "
                f"process) must be even, got {cfg.data.batch_size}: set data.batch_size={cfg.data.batch_size + 1}"
            )
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            prob=aug.mixup_prob,
            switch_prob=aug.mixup_switch_prob,
            label_smoothing=aug.label_smoothing,
            num_classes=num_classes,
        )
        return TaskLoss(SoftTargetCrossEntropy(), mixup)
    smoothing = aug.label_smoothing
    return TaskLoss(lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=smoothing))


def base_lr(cfg: TrainConfig, world: int, say_it: bool = False) -> float:
    """``optim.lr``, or MAE's rule lr = blr · global batch / 256; a ``optim.min_lr`` above it is said (the
    cosine would raise the lr to it: a recipe's min_lr, set for its global batch, on fewer processes).
    ``say_it``: one start-up line with the global batch, how it is split and the lr it gives, what MAE's
    main_finetune prints as its effective batch size, accumulation and base and actual lr."""
    o = cfg.optim
    batch = cfg.data.batch_size * world * o.accum_steps
    if o.lr is not None:
        if o.blr != OptimConfig().blr:  # one file sets both (blr over a recipe's lr is refused)
            warn(
                f"warning: optim.blr={o.blr:g} unused: optim.lr={o.lr:g} is set (blr counts where optim.lr=null)"
            )
        lr, how = o.lr, f"optim.lr={o.lr:g}"
    else:
        lr, how = o.blr * batch / 256, f"optim.blr={o.blr:g} x global batch {batch} / 256"
    if say_it:
        processes, steps = f"process{'es' * (world != 1)}", f"accumulation step{'s' * (o.accum_steps != 1)}"
        say(
            f"batch: {batch} images an optimiser step ({cfg.data.batch_size} per process x {world} {processes} x "
            f"{o.accum_steps} {steps}); lr {lr:.3g} ({how})"
        )
    if o.min_lr > lr:
        warn(
            f"warning: optim.min_lr={o.min_lr:g} is above the base lr {lr:g} ({how}): after warm-up the "
            "cosine schedule raises the lr towards min_lr instead of decaying it; lower optim.min_lr below "
            "the base lr"
        )
    return lr


def loop_settings(
    cfg: TrainConfig,
    world: int,
    resume: ResumePoint | None = None,
    prune_on_save: bool = True,
    say_world: bool = True,
    say_batch: bool = False,
) -> LoopSettings:
    """The ``schedule``/``optim``/``log``/``checkpoint`` sections as the loop's settings; ``resume`` is the
    checkpoint the app found and judged (`attnxfer.apps.run.resume`), so the engine does not look again.
    ``say_batch``: the start-up line of the global batch and the lr (`base_lr`)."""
    c = cfg.checkpoint
    return LoopSettings(
        run_dir=Path(cfg.run_dir),
        epochs=cfg.schedule.epochs,
        max_steps=cfg.schedule.max_steps,
        warmup_epochs=cfg.schedule.warmup_epochs,
        base_lr=base_lr(cfg, world, say_it=say_batch),
        min_lr=cfg.optim.min_lr,
        clip_grad=cfg.optim.clip_grad,
        accum_steps=cfg.optim.accum_steps,
        log_every=cfg.log.every_steps,
        trackers=tuple(cfg.log.trackers),
        project=cfg.log.project,
        progress=cfg.log.progress,
        seed=data_seed(cfg),
        checkpoint=CheckpointPolicy(
            every_steps=c.every_steps,
            every_minutes=c.every_minutes,
            every_epoch=c.every_epoch,
            keep_last=c.keep_last,
            resume=resume if resume is not None else ResumeFrom.parse(c.resume),
            prune_on_save=prune_on_save,
            say_world=say_world,
        ),
    )


def prepare_trackers_from_config(cfg: TrainConfig, run_dir: str | Path | None = None) -> None:
    """How ``log.trackers`` will log for ``run_dir`` (default the run's), decided and said on this process
    before the teacher and the data load: a tracker that cannot log from here stops the run at once."""
    named = [t for t in cfg.log.trackers if t in TRACKERS and TRACKERS[t].in_project]
    if named and not cfg.log.project.strip():  # MLflow refuses it only at the first record, after a step
        raise InputError(
            f"log.project is empty; {' and '.join(named)} log(s) into a named project: set one (default: attnxfer)"
        )
    prepare_trackers(cfg.log.trackers, run_dir or cfg.run_dir)


def compile_from_config(cfg: TrainConfig, pair: TeacherStudent) -> dict[str, int]:
    """torch.compile the student's blocks (``model.compile``) and the teacher's (``teacher.compile``) in
    place; returns how many blocks of each (what run.json records)."""
    if cfg.teacher.compile and pair.teacher is None:
        raise InputError(
            "teacher.compile=true, but this run has no teacher (transfer.mode=none without teacher.spec); "
            "remove teacher.compile"
        )
    mode = cfg.model.compile_mode
    teacher = attention_blocks(pair.teacher) if cfg.teacher.compile else []
    # a teacher that a study's students share is compiled once, by the first
    compile_blocks([b for b in teacher if not is_compiled(b)], mode)
    return {
        "student_blocks": compile_blocks(attention_blocks(pair.student), mode) if cfg.model.compile else 0,
        "teacher_blocks": len(teacher),
    }


def record_run(
    cfg: TrainConfig,
    engine: Engine,
    point: ResumePoint | None,
    command: str,
    info: dict,
    *,
    warn_schedule: bool = True,
) -> None:
    """For a run that will train, or a finished one that lost its run.json (a finished one's files otherwise
    stay as they are, and a folder given another run's finished checkpoint gets none): config.yaml (re-run
    with -c RUN_DIR/config.yaml; the sections ``command`` reads) and run.json (``info``, the training split,
    how the run executes) on rank 0, and the schedule's warnings."""
    finished = point is not None and point.step >= engine.total_steps
    if finished and (RunDir(cfg.run_dir).record_file.is_file() or engine.resumes_other_run):
        return
    if engine.is_main:
        run_dir = RunDir(cfg.run_dir)
        if point is not None and not engine.resumes_other_run and not run_dir.record_file.is_file():
            warn(  # deleted, or lost with a disk: written again, from what this start knows
                f"warning: {run_dir.record_file} was missing beside the run's checkpoints: written again from "
                "this start (the earlier starts' plans it kept are not recovered)"
            )
        if earlier := [] if engine.resumes_other_run else plans_so_far(run_dir, point, info.get("plan")):
            info = {**info, "earlier_plans": earlier}
        run_dir.write_config(dump_config(cfg, command, as_run=True))
        run_dir.write_record(
            {
                **info,
                "data": engine.record.get("data"),  # the training split (a resume on other data says so)
                "world_size": engine.world,
                "precision": engine.runtime.precision,
                "optimizer": f"AdamW ({optimizer_implementation(engine.optimizer)})",
                "base_lr": engine.base_lr,
                "steps_per_epoch": engine.steps_per_epoch,
                "total_steps": engine.total_steps,
                **({"plugins": origins} if (origins := plugin_origins(cfg)) else {}),
                "software": software_record(),  # this start's: versions, commit, machine, command line
            }
        )
    # a conversion's stage 2 fine-tunes the teacher's own weights: a few dozen steps are what it takes,
    # not a student that had no time to learn; a pre-training teaches no student, it trains an encoder
    learner = {"convert": None, "pretrain": "an encoder"}.get(command, "a student")
    for warning in schedule_warnings(engine, learner=learner) if warn_schedule and not finished else ():
        say(warning)


def plugin_origins(cfg: TrainConfig) -> dict[str, dict[str, dict[str, str]]]:
    """The installed packages the config's losses and attentions came from, by entry-point group and name
    (run.json's ``plugins``): a command that reads the run where one is gone names the package to install
    (`attnxfer.launch.value_checks`), not the nearest built-in name."""
    attentions = [cfg.model.attention or [], cfg.convert.attention, cfg.convert.candidates]
    names = {n for value in attentions for n in ([value] if isinstance(value, str) else value)}
    named = {
        LOSS_GROUP: {
            n: type(COMPARISON_LOSSES[n])
            for e in cfg.transfer.losses
            if (n := e["name"]) in COMPARISON_LOSSES
        },
        ATTENTION_GROUP: {n: get_attention_class(n) for n in names & set(list_attentions())},
    }
    origins = {
        group: {n: o for n, cls in classes.items() if (o := entry_point_origin(group, cls.__module__))}
        for group, classes in named.items()
    }
    return {group: found for group, found in origins.items() if found}


def plans_so_far(run_dir: RunDir, point: ResumePoint | None, plan: str | None) -> list[dict]:
    """The plans a resumed run's earlier steps were trained by, where they read otherwise than ``plan``, each
    with the step it held until (run.json's ``earlier_plans``; its ``plan`` is this start's). The config keys
    that would change a plan are refused on resume: a plan that differs comes from attnxfer's code (a loss's
    default, a mode's layers), which the run says, line by line, before it goes on."""
    try:
        before = json.loads(run_dir.record_file.read_text(encoding="utf-8")) if point else {}
    except (OSError, ValueError):  # no run.json to compare with: it is written anew
        return []
    before = before if isinstance(before, dict) else {}
    earlier, old = list(before.get("earlier_plans") or []), before.get("plan")
    if not isinstance(old, str) or plan is None or old == plan:
        return earlier
    gone, new = old.splitlines(), plan.splitlines()
    diff = [f"  was: {line.strip()}" for line in gone if line not in new]
    diff += [f"  now: {line.strip()}" for line in new if line not in gone]
    warn(
        f"warning: the transfer plan differs from the one run.json records for the steps up to {point.step} "
        "(attnxfer's code changed since; the config's own keys are as they were):\n"
        + "\n".join(diff)
        + f"\nthe run goes on by the plan of now; {run_dir.record_file} keeps the earlier one in earlier_plans"
    )
    return [*earlier, {"until_step": point.step, "plan": old}]


def assemble_engine(
    cfg: TrainConfig,
    runtime: Runtime,
    objective: Objective,
    parts: RunParts,
    groups: list[dict],
    *,
    settings: LoopSettings | None = None,
    ema: StudentEMA | None = None,
    record: dict | None = None,
    pictures: Sequence[Pictures] = (),
    drive: Drive | None = None,
) -> Engine:
    """The optimiser (AdamW over ``groups``) and the `Engine` driving ``objective`` on ``parts``' loaders:
    the one assembly that train, pretrain and convert's stage 2 (through `train`) share; ``drive``: a study's
    feed, stop check and streams for this student (default: a run trained alone)."""
    settings = settings or loop_settings(cfg, runtime.world)
    o = cfg.optim  # AdamW in the implementation build_adamw picks for the device (fused on CUDA and CPU)
    optimizer = build_adamw(
        groups, lr=settings.base_lr, betas=(o.beta1, o.beta2), eps=o.eps, device=runtime.device
    )
    if runtime.world > 1:  # the model is built alike on every rank; seeded alike, every rank would draw the
        # same dropout, drop-path and MAE masks (image i of each rank's batch the same ones): seeded apart
        set_seed(sample_seed(cfg.seed, -1, runtime.rank))  # epoch -1: never a sample's or a batch's seed
    return Engine(
        runtime,
        objective,
        optimizer,
        train_loader=parts.train_loader,
        val_loader=parts.val_loader,
        train_sampler=parts.train_sampler,
        settings=settings,
        ema=ema,
        record=record,
        pictures=pictures,
        drive=drive,
    )


def start_run(
    cfg: TrainConfig,
    runtime: Runtime | None,
    found: ResumePoint | None,
    *,
    scoring: bool,
    command: str,
    loaders_built: bool = False,
    say_resume: bool = True,
) -> tuple[TrainConfig, Runtime, ResumePoint | None]:
    """What every run does before it builds a model or reads data: its runtime, its checkpoint judged
    (`judged_resume`: ``found``, ``loaders_built``, ``say_resume``), its trackers prepared, the seed set on
    every rank. Returns the config on this world size, the runtime and the judged checkpoint."""
    runtime = runtime or create_runtime(
        cfg.device, cfg.precision, cfg.optim.accum_steps, cfg.deterministic, cfg.dist.timeout
    )
    cfg, point = judged_resume(
        cfg,
        runtime.world,
        found,
        scoring=scoring,
        command=command,
        loaders_built=loaders_built,
        say_resume=say_resume,
    )
    if not scoring:
        runtime.accelerator.gradient_accumulation_steps = cfg.optim.accum_steps  # the split it chose
    if not scoring and runtime.is_main:  # before the teacher and the data: how the trackers log
        prepare_trackers_from_config(cfg)
    set_seed(cfg.seed)  # same init on every rank
    return cfg, runtime, point


def judged_resume(
    cfg: TrainConfig,
    world: int,
    found: ResumePoint | None = None,
    *,
    scoring: bool,
    command: str,
    loaders_built: bool = False,
    what: str = "run",
    config_file: Path | None = None,
    say_resume: bool = True,
) -> tuple[TrainConfig, ResumePoint | None]:
    """The run's checkpoint found (or ``found``) and judged, its global batch kept on ``world`` ranks
    (``loaders_built``: the caller built the loaders at ``cfg``'s batch; ``what``, ``config_file``: as `judge`
    names them, a study's; ``say_resume`` False: the re-split and changes not said, its caller's): the config on
    this world size and the judged checkpoint. A resume refused raises here, before anything is written."""
    point = found or ResumePoint.find(cfg.run_dir, cfg.checkpoint.resume)
    recorded = None if scoring else recorded_split(point)
    # loaders built at cfg's batch keep it: the global batch must be that batch x ranks x whole steps (a
    # batch that does not divide it is fit_world_size's to refuse)
    whole = recorded and not recorded.global_batch % cfg.data.batch_size
    shares = recorded.global_batch // cfg.data.batch_size if whole else 0
    if loaders_built and recorded and recorded.world != world and shares % world:
        other = split_for_world(recorded.global_batch, world, cfg.data.batch_size)
        raise ConfigError(
            f"{cfg.run_dir} resumes on {world} process(es) with loaders built for "
            f"data.batch_size={cfg.data.batch_size}; to keep the run's global batch of {recorded.global_batch}, "
            f"run it on {', '.join(str(w) for w in range(1, shares + 1) if shares % w == 0)} process(es)"
            + (
                f", or (but for a study's student, whose batch the study keeps) with {other.overrides()}"
                if other
                else ""
            )
        )
    if not scoring:  # a resumed run keeps its global batch on another world size
        cfg = fit_world_size(cfg, world, point, said=say_resume)
    return cfg, judge(
        point,
        cfg,
        world=world,
        scoring=scoring,
        command=command,
        what=what,
        config_file=config_file,
        said=say_resume,
    )


def build_engine(
    cfg: TrainConfig,
    parts: RunParts | None = None,
    runtime: Runtime | None = None,
    scoring: bool = False,
    found: ResumePoint | None = None,
    shared: RunParts | None = None,
    prune_on_save: bool = True,
    warn_schedule: bool = True,
    drive: Drive | None = None,
    command: str = "train",
    own_keys: Collection[str] | None = None,
) -> Engine:
    """Everything ``cfg`` describes, assembled; nothing is written into the run dir before every check has
    passed, and nothing at all with ``scoring=True`` (`attnxfer eval`). ``parts``: models/data a notebook
    built; ``shared``: another run's teacher and loaders (a study's student); ``prune_on_save`` and
    ``warn_schedule`` False leave those, and a resume's re-split global batch, to the caller (a study);
    ``command``: whose config sections the records hold (``convert``: a conversion's stage 2); ``own_keys``:
    a study's student's own keys, the only ones whose values it leaves unused it says (`plan_from_config`)."""
    validate_config(cfg)  # a config built in Python skips load_config's checks
    refuse_file_in_the_way(cfg.run_dir, "run_dir")
    if not scoring:
        require_task_labels(cfg)
    # a notebook's own loaders: the engine resumes mid-epoch through their sampler (else an AttributeError at
    # the first step, after the run dir was written)
    if parts is not None and not hasattr(parts.train_sampler, "set_position"):
        raise TypeError(
            f"RunParts.train_sampler: the sampler train_loader draws from, resumable mid-epoch, got "
            f"{type(parts.train_sampler).__name__}: sampler = attnxfer.data.ResumableSampler(len(dataset), "
            "shuffle=True), and train_loader = attnxfer.data.build_loader(dataset, sampler=sampler, ...)"
        )
    built = (parts or shared) is not None
    cfg, runtime, point = start_run(
        cfg, runtime, found, scoring=scoring, command=command, loaders_built=built, say_resume=warn_schedule
    )
    # scoring a run (eval) reads labels wherever the data has them: its top-1 and k-NN need them
    labels = cfg.data.labels if scoring else None
    with teacher_where_it_was(cfg.run_dir, point is not None):
        parts = parts or build_run_parts(
            cfg, rank=runtime.rank, world_size=runtime.world, labels=labels, shared=shared
        )
    # eval of a student that attends without its teacher: its own scores do not read the teacher's weights
    alone = scoring and not MODES[cfg.transfer.mode].teacher_at_eval
    check_teacher_content(point, parts.teacher_record, cfg.teacher.spec, scoring_alone=alone)
    data = data_identity(parts.train_loader.dataset)
    if not scoring and not check_same_data(point, data, cfg):
        point = replace(point, restart_epoch=True)
    # a label is an index into the classes the head learned: other class folders would shift what it means
    run = RunDir(cfg.run_dir)
    learned = run.record().get("class_names") if point is not None and run.is_run() else None
    if learned and parts.class_names and learned != parts.class_names:
        raise InputError(
            f"data.dataset={cfg.data.dataset} has the classes {parts.class_names}, but {run.path} learned "
            f"{learned} (label index -> class): give it data with the run's classes (data.root)"
        )
    # the student the run trained, where its config builds another: eval scores it, training stops
    if point is not None and (
        recorded := student_as_trained(cfg.run_dir, parts.student_spec, scoring=scoring)
    ):
        # a conversion's stage 2 names its student in convert.attention: no other student to warn of
        if cfg.model.attention is not None or recorded.get("attention") != cfg.convert.attention:
            say(
                f"eval: scoring the student run.json records ({recorded.get('attention')} attention), "
                "not the config's"
            )
        parts = replace(parts, student=student_from_spec(recorded), student_spec=recorded)
    plan = plan_from_config(cfg, parts, own_keys=own_keys)
    pair = TeacherStudent(
        parts.teacher, parts.student, plan, teacher_dtype=teacher_dtype(cfg.teacher.dtype, runtime.precision)
    ).to(runtime.device)
    # transfer.ce_path: forced, the resumed checkpoint's, or measured here (rank 0) before any step
    choice = ce_choice_for_run(cfg, pair, runtime, point, scoring=scoring)
    ce_record = None if choice is None else choice.record()
    ema = StudentEMA(pair.student, cfg.ema.decay) if cfg.ema.decay else None
    compiled = compile_from_config(cfg, pair)  # after the EMA's copy: EMA weights are evaluated eagerly
    if cfg.model.grad_checkpointing:  # after the CE path's measurement, which runs no backward of the pair's
        checkpoint_gradients(pair.student)
    groups = student_param_groups(
        pair,
        weight_decay=cfg.optim.weight_decay,
        layer_decay=cfg.optim.layer_decay,
        layer_decay_rule=cfg.optim.layer_decay_rule,
    )
    evaluator, metric = scoring_for(plan, parts)
    # ranked by the weights `load_student` and export take, as timm's train.py ranks by its EMA's score; a
    # resumed run keeps the metric its checkpoints were ranked by (older runs: the raw weights')
    if ema is not None:
        metric = f"ema_{metric}"
    if point is not None:
        metric = point.state.get("best_metric", metric)
    settings = loop_settings(
        cfg,
        runtime.world,
        point,
        prune_on_save,
        say_world=warn_schedule,
        say_batch=not scoring,  # a study's students each (their lr may differ), under their names
    )
    settings = replace(settings, metric=metric, metric_mode="max")
    n = cfg.log.attention_images  # class-token maps at each evaluation, where a tracker shows them
    shown = n > 0 and bool(cfg.log.trackers)
    pictures = [class_token_pictures(pair, parts.val_loader, n, runtime.device)] if shown else []
    record = {
        "teacher": parts.teacher_record,
        "config": to_dict(cfg, command),
        "ce_path": ce_record,
        "data": data,
    }
    engine = assemble_engine(
        cfg,
        runtime,
        TransferObjective(pair, task_loss_from_config(cfg, parts.num_classes), evaluator),
        parts,
        groups,
        settings=settings,
        ema=ema,
        record=record,
        pictures=pictures,
        drive=drive,
    )
    if not scoring:
        info = {
            "teacher": parts.teacher_record,
            "student": parts.student_spec,
            "plan": plan.describe(),
            "mode": plan.mode.name,
            # what "best" means: the checkpoint `load_student` and `attnxfer export` pick
            "best_metric": engine.settings.metric,
            "best_mode": str(engine.settings.metric_mode),
            "num_classes": parts.num_classes,
            "class_names": parts.class_names,
            "mean": parts.mean,
            "std": parts.std,
            "compiled": compiled,
        }
        if ce_record is not None:  # how softmax layers' CE is evaluated (transfer.ce_path, resolved) and why
            info |= {"ce_path": ce_record["path"], "ce_path_choice": ce_record}
        record_run(cfg, engine, point, command, info, warn_schedule=warn_schedule)
    barrier()
    say(plan.describe())
    if (lone := single_key_layers(parts.teacher, plan, parts.img_size)) and warn_schedule:
        warn(
            f"warning: at {parts.img_size} px the teacher's layer{'s' * (len(lone) > 1)} "
            f"{', '.join(map(str, lone))} attend{'s' * (len(lone) == 1)} over a single key (a key reduction or "
            "window that leaves one token): such a map is all ones, so the transfer of it teaches nothing; a larger "
            "data.img_size gives them keys to choose among"
        )
    return engine


def single_key_layers(teacher: nn.Module, plan: TransferPlan, img_size: int) -> list[int]:
    """The teacher layers the plan transfers whose queries meet one key on an image of ``img_size`` (a
    hierarchical family's reduced keys or clamped window at a small size): a map of ones carries nothing. A
    plain ViT's keys are its tokens, never one: it is not run."""
    if not plan.pairs or not is_hierarchical(teacher):
        return []
    calls = attention_calls(teacher, img_size)
    return sorted({t for _, t in plan.pairs if calls[t][2] == 1})


#: fewer optimiser steps than this and a run says so at start: too few for most students to learn anything
FEW_STEPS = 100


def few_steps_warning(s: LoopSettings, per_epoch: int, total: int, learner: str = "a student") -> str | None:
    """One line, where a run of ``total`` optimiser steps (``per_epoch`` an epoch, by the settings ``s``) takes
    fewer than `FEW_STEPS`: how many, why (epochs x steps an epoch, or the ``schedule.max_steps`` cap) and the
    schedule key that gives it more (``learner``: what the run trains)."""
    if total >= FEW_STEPS:
        return None
    head = (
        f"warning: this run takes {total} optimiser step{'s' if total != 1 else ''}, fewer than {FEW_STEPS}"
    )
    if s.max_steps is not None and total == s.max_steps < per_epoch * s.epochs:
        return (
            f"{head} (schedule.max_steps={s.max_steps}): raise schedule.max_steps for {learner} that learns"
        )
    epochs = -(-FEW_STEPS // per_epoch)
    return (
        f"{head} ({s.epochs} epoch{'s' if s.epochs != 1 else ''} of {per_epoch} steps: the training split in "
        f"batches of data.batch_size x the processes x optim.accum_steps): raise schedule.epochs (at least "
        f"{epochs} for {FEW_STEPS} steps), or lower data.batch_size"
        + (
            f"; schedule.max_steps={s.max_steps} caps the run below {FEW_STEPS} too: raise it as well"
            if s.max_steps is not None and s.max_steps < FEW_STEPS
            else ""
        )
    )


def schedule_warnings(engine: Engine, *, learner: str | None = "a student") -> list[str]:
    """The lines a run's schedule earns at start: too few steps for ``learner``, what the run trains (unless
    None: a conversion's stage 2), a warm-up longer than the run."""
    at = (engine.settings, engine.steps_per_epoch, engine.total_steps)
    return [w for w in (learner and few_steps_warning(*at, learner), long_warmup_warning(*at)) if w]


def long_warmup_warning(s: LoopSettings, per_epoch: int, total: int) -> str | None:
    """One line, where ``schedule.warmup_epochs`` outlasts the run: its lr only rises, never reaching the base
    lr nor decaying. A ``schedule.max_steps`` cap of fewer than `FEW_STEPS` is a smoke run, said as such."""
    warmup = round(s.warmup_epochs * per_epoch)
    capped = total < per_epoch * s.epochs  # by schedule.max_steps
    if warmup <= total or (capped and total < FEW_STEPS):
        return None
    if capped:  # warmup stays warmup_epochs long under the cap, as the schedule's docs say
        return (
            f"warning: schedule.warmup_epochs={s.warmup_epochs:g} ({warmup} warm-up steps) is longer than the run's "
            f"schedule.max_steps={total}: the lr only rises, to {total / warmup:.0%} of the base lr {s.base_lr:g}, "
            f"and never decays; set schedule.warmup_epochs below {total / per_epoch:.3g}"
        )
    return (
        f"warning: schedule.warmup_epochs={s.warmup_epochs:g} is longer than the run's schedule.epochs="
        f"{s.epochs} ({warmup} warm-up steps, {total} in all): the lr only rises, to {total / warmup:.0%} of "
        f"the base lr {s.base_lr:g}, and never decays; set schedule.warmup_epochs below schedule.epochs"
    )


def train(cfg: TrainConfig, parts: RunParts | None = None, command: str = "train") -> TrainResult:
    """Train (or resume) the run described by ``cfg``; ``parts`` lets a notebook pass models/data it built.
    Every rank joins the process group (left again if it made it); rank 0 holds the run dir's lock."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(
            f"train takes a TrainConfig, got {type(cfg).__name__}: attnxfer.config.load_config(path)"
        )
    require_task_labels(cfg)  # before the run dir is made
    with locked_run(cfg, "train"):
        return build_engine(cfg, parts, command=command).run()


@contextlib.contextmanager
def locked_run(cfg: TrainConfig, command: str) -> Iterator[DistributedInfo]:
    """Where train, pretrain and convert run, as `train` says; rank 0 holds the lock for ``command``."""
    main = DistributedInfo.from_environment().is_main_process
    with (
        run_lock(cfg.run_dir, command, enabled=main),
        joined_process_group(backend_for(cfg.device), cfg.dist.timeout) as info,
    ):
        yield info


def same_tokens(student: nn.Module, teacher: nn.Module | None) -> bool:
    """Whether two models' final tokens can be compared one for one (same width and prefix tokens)."""
    return teacher is not None and all(
        getattr(student, a, None) == getattr(teacher, a, None) for a in ("num_features", "num_prefix_tokens")
    )
