"""`attnxfer study`: one teacher, K students, one job that pays for the teacher's forward once per batch.

Each student is built exactly as `attnxfer train` builds it alone. The study commits a step (a checkpoint of its
own) once every student has saved it; a resume goes on from there for all, and checkpoints a student wrote after
it (a save round a kill cut short) are set aside, never loaded or deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...checkpoints.resume_point import ResumeFrom, ResumePoint, ResumePolicy, starts_over
from ...checkpoints.run_lock import run_lock
from ...checkpoints.store import CheckpointManager, atomic_write_json, atomic_write_text, set_aside
from ...config import ConfigError, TrainConfig, to_dict
from ...config.study_spec import Student, StudySpec, recorded_students
from ...errors import InputError
from ...run_layout import STUDY_RECORD, STUDY_REPORTS, STUDY_YAML
from ...speak import say, speaking_for, warn
from ...train.distributed import DistributedInfo, backend_for, barrier, joined_process_group
from ...train.drive import Drive, StudentStreams, never_stop
from ...train.engine import TrainResult
from ...train.lockstep import Lockstep, Member, SharedBatches, SharedFeed
from ...train.runtime import Runtime, create_runtime, resolve_device
from ...transfer.teacher_pass import TeacherHandover, TeacherNeeds
from ...transfer.teacher_student import TeacherStudent
from ..run.parts import RunParts, build_run_parts
from ..run.resume import teacher_where_it_was
from ..run.training import (
    build_engine,
    judged_resume,
    require_task_labels,
    schedule_warnings,
    task_weight_of,
)
from .report import write_study_report


@dataclass
class StudentOutcome:
    """How one student of a study ended: its training result, or why it stopped early."""

    name: str
    run_dir: str
    result: TrainResult | None
    stopped: str | None = None


@dataclass
class StudyResult:
    run_dir: str
    students: list[StudentOutcome] = field(default_factory=list)
    report: Path | None = None  # study.md (None: not written by this process, see `study`)


def study(spec: StudySpec) -> StudyResult:
    """Train (or resume) every student of ``spec`` in one job (the library function behind `attnxfer study`).

    Under torchrun every rank runs this; rank 0 holds the locks. A study of one process ends with its report; a
    study of several ranks says how to write it (scoring is one process's work, the others would wait for it)."""
    info = DistributedInfo.from_environment()
    refuse_other_students(spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_lock(spec.run_dir, "study", enabled=info.is_main_process))
        for _, cfg in spec.configs():
            stack.enter_context(
                run_lock(cfg.run_dir, "study", enabled=info.is_main_process, writes="training run")
            )
        stack.enter_context(joined_process_group(backend_for(spec.base.device), spec.base.dist.timeout))
        check_study(spec)
        result = lockstep_study(spec, info.is_main_process)
        if info.world_size == 1:
            device = resolve_device(spec.base.device)
            result.report = write_study_report(spec.run_dir, device=device, trained_now=True)
        else:
            say(
                f"study: its report, from one process: attnxfer study -c {Path(spec.run_dir) / STUDY_YAML} --report"
            )
        return result


def lockstep_study(
    spec: StudySpec,
    main: bool,
    *,
    configs: list[tuple[Student, TrainConfig]] | None = None,
    parts: Mapping[str, RunParts] | None = None,
    stopped_before: Mapping[str, str] | None = None,
) -> StudyResult:
    """The students trained in lock step. ``configs``: each student's run config (default the spec's);
    ``parts``: each student's own parts, built by the caller around one teacher and one pair of loaders (a
    convert study's students); ``stopped_before``: students that stopped before this loop, left out of it."""
    base = spec.base
    runtime = create_runtime(
        base.device, base.precision, base.optim.accum_steps, base.deterministic, base.dist.timeout
    )
    # the study on this many processes: a resume keeps its global batch, re-split as `train` re-splits it
    spec, standing = _where_it_stands(spec, runtime.world, configs)
    configs = configs or spec.configs()
    standing.stopped.update(stopped_before or {})
    stopped = dict(standing.stopped)
    members, batches, feed = build_members(spec, runtime, standing, configs=configs, parts=parts)
    # every student at its end: nothing trains, and the study's files stay as it trained (a resumable key changed
    # since, optim.lr, would be written into study.yaml and study.json, which re-run it, and trained by none)
    finished = standing.resumed and all(standing.step >= m.engine.total_steps for m in members)
    if main and not finished:
        write_study_files(spec, members, stopped, standing.shared_seconds)
    barrier()

    # the study's checkpoints, as many as its students keep: a resume past a damaged one finds the step before
    own = CheckpointManager(spec.run_dir, keep_last=max(c.checkpoint.keep_last for _, c in configs))

    def commit(step: int, training: list[Member], shared_seconds: float) -> str:
        """Once every student still training has saved a step: record it (a checkpoint of the study's own),
        and only then let each student prune its older checkpoints; returns the study's checkpoint."""
        if main:
            state = {
                "step": step,
                "students": spec.record(),
                "checkpoints": {  # each student's checkpoint of this step, relative to the study's folder
                    m.name: os.path.relpath(m.engine.checkpointing.manager.path_for(step), spec.run_dir)
                    for m in training
                },
                "stopped": {**stopped, **{m.name: m.stopped for m in members if m.stopped}},
                "seconds": {m.name: m.seconds for m in members},
                "shared_seconds": shared_seconds,
                "config": to_dict(spec.base, spec.command),
                "world_size": runtime.world,  # how its global batch was split (a resume on others keeps it)
            }
            own.save(step, {}, state, replace=True)
            write_study_files(spec, members, state["stopped"], shared_seconds)  # the step each reached
            for m in training:
                m.engine.ckpt.prune()
        barrier()
        return str(own.path_for(step))

    loop = Lockstep(members, batches, feed, on_saved=commit, shared_before=standing.shared_seconds)
    results = loop.run()
    outcomes = [
        StudentOutcome(m.name, str(m.engine.run_dir), r, m.stopped)
        for m, r in zip(members, results, strict=True)
    ]
    outcomes += [
        StudentOutcome(s.name, cfg.run_dir, None, stopped[s.name]) for s, cfg in configs if s.name in stopped
    ]
    if main:
        stopped |= {o.name: o.stopped for o in outcomes if o.stopped}
        if not finished:
            write_study_files(spec, members, stopped, shared_seconds=loop.shared_seconds)
    barrier()
    order = [s.name for s in spec.students]
    return StudyResult(spec.run_dir, sorted(outcomes, key=lambda o: order.index(o.name)))


def build_members(
    spec: StudySpec,
    runtime: Runtime,
    standing: _Standing | None = None,
    *,
    configs: list[tuple[Student, TrainConfig]] | None = None,
    parts: Mapping[str, RunParts] | None = None,
) -> tuple[list[Member], SharedBatches, SharedFeed]:
    """The study's students as loop members around one teacher and one stream of batches, and the feed that
    runs the teacher once a batch for all; those that stopped earlier (``standing``) left out. ``configs``
    and ``parts``: as `lockstep_study` takes them."""
    standing = standing or _Standing()
    configs = configs or spec.configs()
    if parts:  # the caller's students around one teacher and one pair of loaders
        shared = next(iter(parts.values()))
    else:
        # the loaders hand out labels where any student's task loss reads them: built from the first student's
        # config alone, a first student without one (transfer.task_weight=0) left the others none
        labels = True if any(task_weight_of(cfg) > 0 for _, cfg in configs) else None
        # the shared parts draw nothing from the students' streams
        with torch.random.fork_rng(devices=[]), teacher_where_it_was(spec.run_dir, standing.resumed):
            shared = build_run_parts(
                configs[0][1], rank=runtime.rank, world_size=runtime.world, labels=labels, student_unsaid=True
            )
    batches, feed, members = SharedBatches(shared.train_loader, shared.train_sampler), SharedFeed(), []
    for student, cfg in configs:
        if student.name in standing.stopped:
            say(f"{student.name}: stopped earlier ({standing.stopped[student.name]}); it stays stopped")
            continue
        view = batches.view()
        # the shared feed, the study's stop check (once a round, for all) and the student's own streams
        streams = StudentStreams()
        drive = Drive(feed=feed, stop=never_stop, streams=streams)
        # the caller's own parts for the student (as `train(cfg, parts)` builds it), else the shared ones
        with speaking_for(student.name):
            try:
                engine = build_engine(
                    cfg,
                    dataclasses.replace(parts[student.name], train_loader=view) if parts else None,
                    runtime=runtime,
                    shared=None if parts else dataclasses.replace(shared, train_loader=view),
                    prune_on_save=False,
                    warn_schedule=False,
                    drive=drive,
                    command=spec.command,
                    own_keys=frozenset(student.overrides),
                )
            except InputError as e:  # its own keys (a loss entry, its attention): say whose they are
                raise InputError(f"student {student.name!r}: {e}") from None
        streams.start(runtime.accelerator)  # what building it left are its streams from now on
        members.append(Member(student.name, engine, view, seconds=standing.seconds.get(student.name, 0.0)))
    # the students share one schedule: its warnings are said once, for all (as alone, no few-steps one
    # for a conversion's stage 2, which fine-tunes the teacher's own weights)
    learner = None if spec.command == "convert" else "a student"
    for warning in schedule_warnings(members[0].engine, learner=learner) if members else ():
        say(f"{warning} (every student of the study)")
    feed.teacher_pass = shared_teacher_pass(
        [m.engine.objective.module for m in members], [m.name for m in members]
    )
    return members, batches, feed


def shared_teacher_pass(
    pairs: list[TeacherStudent], names: list[str]
) -> Callable[[Any], TeacherHandover | None]:
    """One teacher forward per batch for every student: the union of what their pairs need of it this step,
    run once and handed to each. A student whose teacher pass is its own is refused here, before any step."""
    for pair, name in zip(pairs, names, strict=True):
        if pair.train().owns_teacher_pass:
            raise ConfigError(
                f"student {name!r}: transfer.share_drop_path=true gives the teacher this student's drop-path "
                "masks, so its teacher pass is its own and a study shares one: set transfer.share_drop_path=false "
                "(the default) or model.drop_path_rate=0 for it"
            )
    with_teacher = [p for p in pairs if p.teacher is not None]

    def teacher_pass(x: Any) -> TeacherHandover | None:
        needs = TeacherNeeds().union(*(p.teacher_needs() for p in with_teacher))
        return None if needs.empty else with_teacher[0].teacher_pass(x, needs)

    return teacher_pass


def check_study(
    spec: StudySpec, configs: list[tuple[Student, TrainConfig]] | None = None, *, read_data: bool = True
) -> None:
    """What one batch and one teacher pass for all needs, checked before any work (``configs``: the students'
    run configs, default the spec's; ``read_data=False``: the labels left to the job, as submit leaves them)."""
    configs = configs or spec.configs()
    base = spec.base
    if ResumeFrom.parse(base.checkpoint.resume).policy is ResumePolicy.PATH:
        raise ConfigError(
            "checkpoint.resume: a study goes on from the last step every student saved (auto) or starts over "
            "(none); it takes no checkpoint path"
        )
    if base.precision == "fp16":
        raise ConfigError(
            "precision=fp16 scales losses with one scaler per process, which a study's students would share: use "
            "precision=bf16 (the GPU default) or fp32"
        )
    check_study_trackers(configs)
    for _, cfg in configs if read_data else ():
        require_task_labels(cfg)
    mixes = {s.name: task_weight_of(cfg) > 0 for s, cfg in configs}
    if (base.aug.mixup > 0 or base.aug.cutmix > 0) and len(set(mixes.values())) > 1:
        without = sorted(n for n, m in mixes.items() if not m)
        raise ConfigError(
            f"aug.mixup/cutmix mix the batch of students with a task loss, and {', '.join(without)} has none "
            "(transfer.task_weight=0): students of a study read one batch, so give all of them a task loss or "
            "none, or turn mixup off"
        )


def check_study_trackers(configs: list[tuple[Student, TrainConfig]]) -> None:
    """W&B and MLflow keep one active run per process (accelerate's trackers log to it): a study's students
    would all log into the first student's run, so more than one student with either is refused."""
    shared = sorted({t for _, cfg in configs for t in cfg.log.trackers if t in ("wandb", "mlflow")})
    if len(configs) > 1 and shared:
        raise ConfigError(
            f"log.trackers includes {' and '.join(shared)}, which log(s) one run per process, and this study's "
            f"{len(configs)} students would all log into the first one's: remove {' and '.join(shared)} from "
            "log.trackers (TensorBoard logs each student in RUN_DIR/<name>/tb), or train the students as separate "
            "runs (attnxfer submit --sweep)"
        )


@dataclass
class _Standing:
    """Where a study stands at its last committed step: who stopped early, and the seconds spent so far."""

    stopped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    shared_seconds: float = 0.0
    resumed: bool = False  # it goes on from a step it committed
    step: int = 0  # that step


def _where_it_stands(
    spec: StudySpec, world: int, configs: list[tuple[Student, TrainConfig]] | None
) -> tuple[StudySpec, _Standing]:
    """The study on ``world`` processes and its last committed step, judged as any resume; the students'
    checkpoints after that step (a save round a kill cut short) set aside. A fresh study stands nowhere."""
    spec, point = judged_study_point(spec, world)
    # each student's checkpoints, listed once: judged against the study's step, then the later ones set aside
    saved = [
        (s, c, CheckpointManager(Path(c.run_dir)).list(verify_hash=False))
        for s, c in configs or spec.configs()
    ]

    later: list[Path] = []  # the study's own steps after the one it goes on from
    while point is not None:
        # the students that trained on at the study's step and hold no intact checkpoint of it
        stopped = point.record("stopped") or {}
        missing = [
            (student, cfg, steps)
            for student, cfg, infos in saved
            if student.name not in stopped and point.step not in (steps := [i.step for i in infos])
        ]
        if not missing:
            break
        student, cfg, steps = missing[0]
        # its save of that step damaged (the warning above says how), or gone: pruned by a run of its own
        damaged = CheckpointManager(Path(cfg.run_dir)).path_for(point.step).is_dir()
        own = CheckpointManager(spec.run_dir).list(verify_hash=False) if damaged else []
        if earlier := [i for i in own if i.step < point.step]:
            # as train falls back past a damaged checkpoint: the newest step every student holds
            warn(
                f"study: student {student.name!r}'s checkpoint of step {point.step} is damaged (the warning "
                f"above says why): the study goes on from its step {earlier[-1].step} if every student holds it"
            )
            later.append(point.path)
            spec, point = judged_study_point(spec, world, resume=str(earlier[-1].path))
            continue
        why = (
            "it is damaged: the warning above says why"
            if damaged
            else f"it holds {', '.join(f'step {s}' for s in steps) or 'none'}: trained on alone?"
        )
        raise InputError(  # it would start from scratch beside students at the study's step
            f"student {student.name!r} has no {'usable ' if damaged else ''}checkpoint of the study's step "
            f"{point.step} in {cfg.run_dir} ({why}); nothing was moved: start the study over "
            "(checkpoint.resume=none) or elsewhere (run_dir=...)"
        )
    stopped = point.record("stopped") or {} if point is not None else {}
    fresh = starts_over(spec.base.checkpoint.resume)  # checkpoint.resume=none: the study starts over
    if DistributedInfo.from_environment().is_main_process:
        for *_, infos in saved:
            for info in infos:
                if fresh:
                    aside = set_aside(info.path, "replaced")
                    say(f"study: checkpoint.resume=none: kept the earlier attempt's {info.path} as {aside}")
                elif point is None or info.step > point.step:
                    aside = set_aside(info.path, "uncommitted")
                    cause = (
                        "a step the study goes back past"
                        if later
                        else "by a save round cut short, or by the student trained on alone"
                    )
                    say(
                        f"study: {info.path} was saved after the study's last complete step ({cause}); kept as {aside}"
                    )
        for own in later:  # a step some student's damaged checkpoint cannot go on from
            say(
                f"study: kept its step {own.name}, which a student cannot go on from, as {set_aside(own, 'unusable')}"
            )
        # its own steps too: left in place, the next auto would go on from the earlier attempt's last step
        # (refused as another config's, or missing the students' checkpoints set aside above); and its
        # reports, as a search's: the next report would overwrite the only account of the earlier attempt
        if fresh:
            reports = [Path(spec.run_dir) / r for r in STUDY_REPORTS]
            for own in [*CheckpointManager(spec.run_dir).step_dirs(), *(p for p in reports if p.exists())]:
                aside = set_aside(own, "replaced")
                say(f"study: checkpoint.resume=none: kept the earlier attempt's {own} as {aside}")
    barrier()
    if point is None:
        return spec, _Standing()
    say(f"study: resuming every student from step {point.step} ({point.path})")
    return spec, _Standing(
        dict(stopped),
        dict(point.record("seconds") or {}),
        point.record("shared_seconds") or 0.0,
        resumed=True,
        step=point.step,
    )


def judged_study_point(
    spec: StudySpec, world: int, *, verify_hash: bool | None = None, resume: str | None = None
) -> tuple[StudySpec, ResumePoint | None]:
    """The study on ``world`` processes and its last committed step (None: a fresh study), judged as `train`
    judges a resume (`judged_resume`: its global batch kept, or refused naming the counts that keep it) and
    refused, before any work, where it holds other students."""
    base, point = judged_resume(
        spec.base,
        world,
        ResumePoint.find(spec.run_dir, resume or spec.base.checkpoint.resume, verify_hash=verify_hash),
        scoring=False,
        command=spec.command,
        what="study",
        config_file=Path(spec.run_dir) / STUDY_YAML,
    )
    if point is not None and point.record("students") != spec.record():
        raise _other_students(spec, f"checkpoint {point.name}", point.record("students"))
    return dataclasses.replace(spec, base=base), point


def refuse_other_students(spec: StudySpec) -> None:
    """A study goes on with the students it started with: ``spec``'s checked against the folder's study.json
    before any lock or work (a convert study's stage 1 writes long before stage 2's checkpoints would tell)."""
    started = recorded_students(spec.run_dir)  # None: no study there yet (or none to read)
    if started is not None and started != json.loads(json.dumps(spec.record())):
        raise _other_students(spec, STUDY_RECORD, started)


def _other_students(spec: StudySpec, where: str, students: list[dict[str, Any]]) -> ConfigError:
    """The refusal names both lists (the same names in another order, or one value spelt otherwise, are
    other students too) and the file that goes on with the students it started with."""
    given = ", ".join(f"{s.name} {dict(s.overrides)}" for s in spec.students)
    return ConfigError(
        f"{spec.run_dir} holds a study ({where}) of other students "
        f"({', '.join(s['name'] + ' ' + str(s['overrides']) for s in students)}; given: {given}): a study goes on "
        f"with the students it started with, in their order (attnxfer study -c {Path(spec.run_dir) / STUDY_YAML} "
        "continues it); to train these, start a new study elsewhere (run_dir=...)"
    )


def write_study_files(
    spec: StudySpec, members: list[Member], stopped: dict[str, str], shared_seconds: float | None = None
) -> None:
    """study.json (the students and how each stands) and study.yaml (``attnxfer study -c`` it to resume)."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    by_name = {m.name: m for m in members}
    students = []
    for entry in spec.record():
        m = by_name.get(entry["name"])
        state = (
            {"step": m.engine.step, "total_steps": m.engine.total_steps, "seconds": round(m.seconds, 3)}
            if m
            else {"step": None, "seconds": None}
        )
        students.append({**entry, **state, "stopped": stopped.get(entry["name"])})
    atomic_write_json(
        run_dir / STUDY_RECORD,
        {"students": students, "shared_seconds": shared_seconds, "base": to_dict(spec.base, spec.command)},
    )
    atomic_write_text(run_dir / STUDY_YAML, str(spec))
