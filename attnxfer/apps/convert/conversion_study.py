"""`attnxfer study --command convert`: K efficient attentions converted from one teacher in one job.

Each student is an `attnxfer convert` of its own config around ONE teacher and ONE pair of loaders, through
`convert_runs` as a conversion alone; only the stages are driven together, so each batch is read once and the
teacher runs once for all: stage 1 in lock step (`_stage1_lockstep`, each fit opened and resumed as alone), stage 2
as a training study (`lockstep_study`). Each student's folder is laid out as its solo conversion's, so `attnxfer
convert -c RUN_DIR/<name>/config.yaml` finds it done. A student whose loss turns non-finite stops alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...checkpoints.run_lock import run_lock
from ...config.study_spec import StudySpec
from ...errors import UserError
from ...models.handover import Signal
from ...run_layout import STUDY_RECORD
from ...speak import quiet, say, speaking_for
from ...train.distributed import DistributedInfo, backend_for, barrier, joined_process_group
from ...train.drive import StudentStreams
from ...train.stage1 import Stage1Fit, Stage1Result, teacher_signals
from ...train.stop import StopRequested, stop_on_signals, stop_signal
from ...train.terms import NonFiniteLossError
from ..run.training import prepare_trackers_from_config
from ..study.study import (
    check_study,
    check_study_trackers,
    lockstep_study,
    refuse_other_students,
    write_study_files,
)
from .comparison import write_conversion_comparison
from .convert import (
    Conversion,
    build_conversion,
    checked_config,
    conversion_parts,
    convert_runs,
    require_convert_labels,
    stage1_done,
    stage2_config,
    stage2_done,
)
from .selection import AUTO, check_candidates
from .stage1 import Stage1Job, stage1_batches


@dataclass
class ConvertedStudent:
    """How one student of a convert study ended: its report.json's content, and why it stopped early."""

    name: str
    run_dir: str
    report: dict[str, Any]
    stopped: str | None = None


@dataclass
class ConvertStudyResult:
    run_dir: str
    students: list[ConvertedStudent] = field(default_factory=list)
    report: Path | None = None  # conversion_study.md (rank 0)


def convert_study(spec: StudySpec) -> ConvertStudyResult:
    """Convert (or resume converting) every student of ``spec`` in one job (`attnxfer study --command convert`).
    Under torchrun every rank runs this; rank 0 holds the locks and writes the comparison."""
    main = DistributedInfo.from_environment().is_main_process
    refuse_other_students(spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_lock(spec.run_dir, "study", enabled=main))
        for _, cfg in spec.configs():
            stack.enter_context(run_lock(cfg.run_dir, "convert", enabled=main))
            stack.enter_context(run_lock(Path(cfg.run_dir) / "stage2", "train", enabled=main))
        info = stack.enter_context(
            joined_process_group(backend_for(spec.base.device), spec.base.dist.timeout)
        )
        study = _ConvertStudy.build(spec, info)
        reports = convert_runs(study.runs, study.start, stage1=study.stage1, stage2=study.stage2)
        result = ConvertStudyResult(spec.run_dir)
        for name, run, report in zip(study.names, study.runs, reports, strict=True):
            result.students.append(ConvertedStudent(name, str(run.run_dir), report, study.stopped.get(name)))
        if main:
            result.report = write_conversion_comparison(spec.run_dir)
        barrier()
        return result


@dataclass
class _ConvertStudy:
    """The study's students, and how its two stages are driven (`stage1`, `stage2`: what `convert_runs` calls)."""

    spec: StudySpec
    runs: list[Conversion]
    streams: list[StudentStreams]  # each student's random streams since it was built
    main: bool
    start: float
    stopped: dict[str, str] = field(default_factory=dict)  # who stopped early, and why

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.spec.students]

    @classmethod
    def build(cls, spec: StudySpec, info) -> _ConvertStudy:
        """Each student built as `attnxfer convert` builds it alone, around one teacher and one pair of loaders;
        the study's checks and files."""
        start = time.monotonic()
        configs = [(s, checked_config(cfg, skip_stage1=False)) for s, cfg in spec.configs()]
        for _, cfg in configs:
            require_convert_labels(cfg)
        check_study_trackers(configs)
        if info.is_main_process:  # stage 2's trackers, decided before the teacher loads
            for _, cfg in configs:
                prepare_trackers_from_config(cfg, Path(cfg.run_dir) / "stage2")
        # the shared parts (teacher and loaders, around the teacher's copy) draw nothing from the students'
        # streams and say nothing: each student's own build below speaks, convert.attention=auto's choice included;
        # their refusal (a missing teacher, a data option) is the study's, not the first student's
        with torch.random.fork_rng(devices=[]), quiet():
            shared = conversion_parts(configs[0][1], info, stand_in=True)
        # an auto student's candidate that cannot be built at the run's size stops the study before any student's
        # candidates are timed
        for student, cfg in configs:
            with _naming(student.name):
                check_candidates(cfg, shared.teacher, shared.img_size)
        # the choice's keys, set for the study's auto students, are not said to be unread by the others
        chooses = any(c.convert.attention == AUTO for _, c in configs)
        runs, streams = [], []
        for student, cfg in configs:
            torch.manual_seed(cfg.seed)
            with _naming(student.name), speaking_for(student.name):
                runs.append(
                    build_conversion(cfg, info, None, name=student.name, shared=shared, study_chooses=chooses)
                )
            streams.append(StudentStreams.current())
        # what one batch and one teacher pass for all needs, on stage 2's configs, before any work
        check_study(spec, [(s, stage2_config(run)) for (s, _), run in zip(configs, runs, strict=True)])
        if info.is_main_process and not (Path(spec.run_dir) / STUDY_RECORD).is_file():
            write_study_files(spec, [], {})  # study.yaml resumes the study from now on
        barrier()
        return cls(spec, runs, streams, info.is_main_process, start)

    def stage1(self, runs: list[Conversion]) -> list[Stage1Result]:
        """Each student's stage 1, opened as alone, the unfinished ones fitted in lock step; then each measured."""
        jobs = {i: run.stage1_job() for i, run in enumerate(runs) if run.plan.stage1_steps > 0}
        results = {i: jobs[i].done if i in jobs else None for i in range(len(runs))}
        for i, job in jobs.items():
            if job.done is None and not runs[i].plan.active:  # nothing to fit: complete at once, as alone
                results[i] = job.finish(Stage1Result())
        pending = {i: job for i, job in jobs.items() if results[i] is None}
        if pending:
            results |= self._stage1_lockstep(pending)
        return [stage1_done(run, results[i]) for i, run in enumerate(runs)]

    def stage2(self, runs: list[Conversion]) -> list[dict[str, Any]]:
        """Stage 2 of every student that did not stop, as a training study; then each measured."""
        configs = [(s, stage2_config(run)) for s, run in zip(self.spec.students, runs, strict=True)]
        parts = {
            name: run.parts for name, run in zip(self.names, runs, strict=True) if name not in self.stopped
        }
        outcomes = {}
        if parts:
            studied = lockstep_study(
                self.spec, self.main, configs=configs, parts=parts, stopped_before=self.stopped
            )
            outcomes = {o.name: o for o in studied.students}
        sections = []
        for name, run in zip(self.names, runs, strict=True):
            outcome = outcomes.get(name)
            stopped = self.stopped.get(name) or (outcome.stopped if outcome else None)
            if stopped:
                self.stopped[name] = run.stopped = stopped
            sections.append(stage2_done(run, None if stopped or outcome is None else outcome.result, stopped))
        return sections

    def _stage1_lockstep(self, jobs: dict[int, Stage1Job]) -> dict[int, Stage1Result | None]:
        """The unfinished stage-1 fits to their end (None: the student stopped), one step each per batch of one
        stream (from the batch the furthest-behind student reads next; one resumed further waits for the
        stream to reach its batch): the teacher's signals computed once a batch for the union of what the
        stepping students need, each stepping under its own random streams; a non-finite loss stops a student
        alone. A stop signal is read once a round: every fit saves its step, then `StopRequested`."""
        first = self.runs[next(iter(jobs))]
        start = min(job.first_batch for job in jobs.values())
        batches = stage1_batches(
            first.cfg, first.parts, first.plan.stage1_batch_size, first.device, start=start
        )
        results: dict[int, Stage1Result | None] = {}
        with contextlib.ExitStack() as stack:
            fits = {
                i: stack.enter_context(
                    Stage1Fit(job.saved.parts.teacher, job.saved.parts.student, job.saved.plan, **job.options)
                )
                for i, job in jobs.items()
            }
            stack.enter_context(stop_on_signals())
            index = start
            while active := [i for i, fit in fits.items() if not fit.finished and i not in results]:
                x = next(batches)
                stepping = [i for i in active if fits[i].done + jobs[i].batch_offset == index]
                if stepping:
                    layers = sorted({layer.layer for i in stepping for layer in fits[i].plan.active})
                    fields: list[Signal] = list(
                        dict.fromkeys(f for i in stepping for f in fits[i].objective.fields)
                    )
                    signals = teacher_signals(first.teacher, x, layers, fields)
                    for i in stepping:
                        try:
                            with self.streams[i].active(), speaking_for(self.names[i]):
                                fits[i].step(signals)
                                if fits[i].finished:  # saved complete now: a kill before the end keeps it
                                    results[i] = jobs[i].finish(fits[i].finish())
                        except NonFiniteLossError as e:
                            name = self.names[i]
                            self.stopped[name] = self.runs[i].stopped = str(e)
                            say(f"{name}: stopped: {str(e).rstrip('.')}; the others go on")
                            results[i] = None
                index += 1
                signum = stop_signal()
                if signum:
                    # every fit still running saves its step and says where; the study's stop names its folder
                    stops = []
                    for i in (i for i in active if i not in results):
                        stops.append(fits[i].stopped(signum))
                        with speaking_for(self.names[i]):
                            say(f"stage 1: {stops[-1]}")
                    raise StopRequested(
                        signum, min(s.step for s in stops), f"every student's, in {self.spec.run_dir}"
                    )
            for i, fit in fits.items():
                if i not in results:
                    with speaking_for(self.names[i]):
                        results[i] = jobs[i].finish(fit.finish())
        return results


@contextlib.contextmanager
def _naming(name: str) -> Iterator[None]:
    """A refusal while building a student names the student (its keys come from the base and its own)."""
    try:
        yield
    except UserError as e:
        e.args = (f"student {name!r}: {e.args[0] if e.args else e}", *e.args[1:])
        raise
