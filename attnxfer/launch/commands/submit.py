"""``attnxfer submit``: `train` (or `convert`, `pretrain`, `study`) as a (multi-node) SLURM job through submitit."""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

from ...errors import InputError
from ...speak import say, warn
from ..arguments import add_slurm_arguments
from .base import (
    SUBMITTABLE,
    add_config_args,
    add_vary,
    done_line,
    load,
    load_study,
    print_config,
    register_command,
    submittable,
    with_auto_resume,
)
from .study import end_lines as end_study_lines, show_config as show_study


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--command",
        dest="job_command",  # not `command`: that names the subcommand in error messages
        choices=sorted(SUBMITTABLE),
        default="train",
        help="what the job runs (default train); convert resumes a finished stage 1 and stage 2's "
        "checkpoints after a requeue; pretrain is MAE pre-training (`attnxfer pretrain`); study trains "
        "the students of `attnxfer study` (a students: list in -c, and/or --vary) from one teacher pass, or "
        "converts them where its YAML says command: convert",
    )
    add_vary(p)
    add_slurm_arguments(p)


def _check_sweep(cfg, sweep: list[str], command: str) -> None:
    """Each job of ``--sweep`` checked as its own `attnxfer COMMAND` checks its config as it loads: a value
    misspelt, out of range or read by no job is refused here, not in a job after the queue's wait."""
    from ...config import ConfigError, refuse_unread_sections, validate_config
    from ..arguments import parse_sweep
    from ..slurm.submission import sweep_points
    from ..value_checks import check_values

    for point in sweep_points(cfg, parse_sweep(sweep)):
        study = command == "study"
        runs = [(point.cfg.config_of(s), point.cfg.command) for s in point.cfg.students] if study else []
        try:
            for run, reads in runs or [(point.cfg, command)]:
                refuse_unread_sections(check_values(validate_config(run)), reads, study=study, submit=True)
        except ConfigError as e:
            label = " ".join(f"{k}={v}" for k, v in point.overrides.items())
            raise ConfigError(f"--sweep {label}: {e}") from None


def _paths_missing_here(run) -> tuple[list[str], list[str]]:
    """The paths a job of ``run`` reads (a local teacher or ``model.init``, an image folder's or shards'
    ``data.root``) that this machine lacks, as ``key=value``: said, not refused, since the compute nodes may
    have a path the submitting machine does not, but a misspelt one fails the job after its wait in the queue.
    Second, where the Hub cannot be reached from here (nor, often, from the nodes), the Hub teachers not in its
    cache."""
    from ...errors import MissingPathError, UserError
    from ...hub_reach import offline_reason
    from ...sources.load_errors import TeacherNotAvailable
    from ...sources.resolve import parse_teacher_spec, resolve

    missing, uncached = [], []
    for key, spec in (("teacher.spec", run.teacher.spec), ("model.init", run.model.init)):
        if not spec:
            continue
        try:
            parsed = parse_teacher_spec(spec, role="teacher" if key == "teacher.spec" else key)
        except MissingPathError:  # a path-like spec: refused here, perhaps read on the nodes
            missing.append(f"{key}={spec}")
            continue
        except InputError:  # not a path: the job refuses it as it would here
            continue
        if parsed.source.is_local and not Path(parsed.name).exists():
            missing.append(f"{key}={spec}")
        elif not parsed.source.is_local and offline_reason() is not None:  # its cache is what the job finds
            try:
                resolve(parsed, cache_dir=run.teacher.cache_dir, role=key.split(".")[0])
            except TeacherNotAvailable:
                uncached.append(f"{key}={spec}")
            except UserError:  # refused by the job as it would be here
                pass
    reads_files = run.data.dataset == "folder" or run.data.dataset.startswith("wds/")
    if reads_files and run.data.root and not Path(run.data.root).expanduser().exists():
        missing.append(f"data.root={run.data.root}")
    return missing, uncached


def _refuse_a_finished_run(cfg, found, conversion: Path | None = None) -> None:
    """A run whose checkpoint stands at the last step its run.json recorded, with the schedule it was recorded
    with: its job would wait in the queue to say "nothing to do"; said here instead. ``conversion``: the
    conversion whose stage 2 ``cfg`` runs, finished once its stage 1 ran its steps and its report is written."""
    from ...checkpoints.resume_point import ResumePoint
    from ...checkpoints.run_dir import RunDir
    from ...run_layout import STAGE_DIRS

    run = RunDir(cfg.run_dir)
    if found is None or not run.record_file.is_file():
        return
    total = run.record().get("total_steps")
    recorded = (found.config or {}).get("schedule") or {}
    same = (recorded.get("epochs"), recorded.get("max_steps")) == (
        cfg.schedule.epochs,
        cfg.schedule.max_steps,
    )
    if not (isinstance(total, int) and found.step >= total and same):
        return
    # the key that ends the run, as its job would say: a max_steps past the last epoch's end trains no further
    keys = "schedule.max_steps or schedule.epochs" if cfg.schedule.max_steps == total else "schedule.epochs"
    if conversion is not None:  # as the job's own check: both stages at their ends, and the report written
        steps = cfg.convert.stage1_steps
        stage1 = ResumePoint.find(conversion / STAGE_DIRS[0], cfg.checkpoint.resume, verify_hash=False)
        if (conversion / "report.json").is_file() and (
            steps <= 0 or (stage1 is not None and stage1.step >= steps)
        ):
            raise InputError(
                f"nothing to do: {conversion} has run both stages to their ends (stage 2 at step {found.step} of "
                f"{total}) and its report stands ({conversion / 'report.md'}): its job would wait in the queue only "
                "to say so; nothing was submitted. To measure it again, move report.json aside; to train stage 2 "
                f"longer, raise {keys}"
            )
    else:
        raise InputError(
            f"nothing to do: {cfg.run_dir} is at step {found.step} of the {total} its schedule trains "
            f"({found.name}): its job would wait in the queue only to say so; nothing was submitted. To train "
            f"longer, raise {keys}"
        )


def _judge_resumes(cfg, world: int, *, study: bool, converts: bool) -> None:
    """A study's or a conversion's folders judged as the job's start judges them, by the same functions (the
    checkpoints read without rehashing): a study of other students, a key its or a stage 1's checkpoint fixes,
    or an auto conversion's recorded choice reads, changed, and a stopped stage 1's (or choice's fits')
    processes. A conversion's stage 2 is judged by the job alone (its objective's weights need the teacher),
    and so is a stage 1 under convert.attention=auto (its attentions are chosen in the job)."""
    from ...apps.convert.selection import AUTO, judge_recorded
    from ...apps.convert.stage1 import judged_stage1_keys
    from ...apps.run.training import judged_resume
    from ...apps.study.study import check_study, judged_study_point, refuse_other_students
    from ...checkpoints.resume_point import ResumePoint
    from ...run_layout import STAGE_DIRS

    if study:
        refuse_other_students(cfg)
        if not converts:  # a convert study checks its stage-2 configs, built in the job
            check_study(cfg, read_data=False)  # the data, perhaps on the compute nodes alone, not read here
    runs = [run for _, run in cfg.configs()] if study else [cfg]
    # as the job: each stage 1 first, the study's step at stage 2's start
    for run in runs if converts else ():
        if run.convert.attention != AUTO:
            judged_stage1_keys(run, Path(run.run_dir) / STAGE_DIRS[0], world, verify_hash=False)
        else:
            judge_recorded(run, world)
    if study:  # the students on the job's processes, as the job re-splits their global batch
        cfg, _ = judged_study_point(cfg, world, verify_hash=False)
    for student, run in cfg.configs() if study and not converts else ():  # as the job builds each student
        found = ResumePoint.find(run.run_dir, run.checkpoint.resume, verify_hash=False)
        try:  # on the loaders the study builds for all at data.batch_size
            judged_resume(run, world, found, scoring=False, command=cfg.command, loaders_built=True)
        except InputError as e:
            raise InputError(f"student {student.name!r}: {e}") from None


def _refuse_vary_alone(args) -> None:
    if args.vary and args.job_command != "study":
        raise InputError("--vary names what a study's students differ in: use it with --command study")


def _show_config(args) -> int:
    """``--print-config``: the config the job runs, as `attnxfer COMMAND --print-config` shows it (a study's base
    and each student); under --sweep, the config each job sets its swept keys in (each value checked)."""
    from ..arguments import parse_sweep

    _refuse_vary_alone(args)
    sweep = parse_sweep(args.sweep) or {}
    # a misspelt key or a bad value refused here, as the submit would; not by `_check_sweep`, whose
    # sweep_points import torch (seconds) for what the config's own checks say here
    if sweep:
        cfg = load_study(args) if args.job_command == "study" else load(args)
        for key, values in sweep.items():
            for value in values:
                cfg.with_overrides({key: value})
    code = (show_study if args.job_command == "study" else print_config)(args)
    if sweep:
        jobs = math.prod(len(values) for values in sweep.values())
        each = " x ".join(f"{key}={','.join(values)}" for key, values in sweep.items())
        which = "each combination of" if len(sweep) > 1 else "each of"
        say(f"# --sweep: {jobs} jobs, this config with {which} {each} (--dry-run prints every job's)")
    return code


@register_command(
    "submit",
    help="run `train` (or `convert`, `pretrain`, `study`) as a (multi-node) SLURM job through submitit",
    description="Submit the same training as `attnxfer train` (or, with --command convert, the "
    "same conversion as `attnxfer convert`) to SLURM. The job checkpoints "
    "periodically, requeues itself on preemption/time limit and resumes.",
    arguments=_arguments,
    show_config=_show_config,
)
def run(args) -> int:
    _refuse_vary_alone(args)
    cfg = load_study(args) if args.job_command == "study" else load(args)
    from ... import speak
    from ...checkpoints.run_lock import lock_holder, refuse_file_in_the_way, refuse_other_work
    from ...config import dump_config
    from ...data.registry import dataset_options
    from ...run_layout import LOCK_NAME, STAGE_DIRS
    from ..arguments import parse_sweep
    from ..slurm import JobFailedError, options_from_args, submit_from_args
    from ..slurm.monitor import JobCancelledError, WaitInterrupted
    from ..slurm.submission import sweep_points
    from ..slurm.task import RESUBMIT

    if args.sweep:
        _check_sweep(cfg, args.sweep, args.job_command)
    refuse_file_in_the_way(cfg.run_dir, "run_dir")  # here, not in a job that fails at once
    if args.sweep:  # one folder a point under run_dir: inside another work's folder, they would mix with it
        refuse_other_work(cfg.run_dir, f"{args.job_command} --sweep", writes="sweep")
    else:
        refuse_other_work(cfg.run_dir, args.job_command)
    study = args.job_command == "study"
    converts = args.job_command == "convert" or (study and cfg.command == "convert")
    missing: set[str] = set()  # paths the jobs read that this machine lacks
    uncached: set[str] = set()  # Hub teachers they read that its cache lacks, the Hub out of reach
    for point in sweep_points(cfg, parse_sweep(args.sweep)):  # what each job would refuse at its start
        runs = [run for _, run in point.cfg.configs()] if study else [point.cfg]
        if args.job_command == "pretrain":
            from ...apps.run.pretrain import refuse_unread_keys

            refuse_unread_keys(point.cfg)
        else:  # a task loss or label metric on data a config reads without labels, refused as the job would
            # (with labels, the data, perhaps on the compute nodes alone, is not read here)
            from ...apps.convert.convert import checked_config, require_convert_labels
            from ...apps.run.training import require_task_labels
            from ...config import require_teacher

            for run in runs:  # no teacher where the job needs one, refused as the job would at its start
                require_teacher(run, conversion=converts)
                if converts:  # each conversion as convert checks it (a study's stage-2 configs come later)
                    checked_config(run, skip_stage1=False)
                if not run.data.labels:
                    (require_convert_labels if converts else require_task_labels)(run)
        with speak.quiet():  # the job's log says what changed, as its own start judges it again
            world = options_from_args(args).num_tasks
            from ...checkpoints.resume_point import ResumePoint

            if args.job_command in ("train", "pretrain"):  # a key the run's checkpoint fixes, changed
                from ...apps.run.training import judged_resume

                found = ResumePoint.find(point.cfg.run_dir, point.cfg.checkpoint.resume, verify_hash=False)
                judged, found = judged_resume(
                    point.cfg, world, found, scoring=False, command=args.job_command
                )
                _refuse_a_finished_run(judged, found)
            else:
                _judge_resumes(point.cfg, world, study=study, converts=converts)
                if args.job_command == "convert":
                    stage2 = point.cfg.with_overrides(
                        {"run_dir": str(Path(point.cfg.run_dir) / STAGE_DIRS[1])}
                    )
                    found = ResumePoint.find(stage2.run_dir, stage2.checkpoint.resume, verify_hash=False)
                    _refuse_a_finished_run(stage2, found, conversion=Path(point.cfg.run_dir))
        dataset_options(runs[0].data.dataset)  # an unknown name: refused naming the known ones
        for run in runs:
            paths, teachers = _paths_missing_here(run)
            missing.update(paths)
            uncached.update(teachers)
        dirs = [Path(point.cfg.run_dir), *(Path(run.run_dir) for run in runs)]  # the folders the job locks
        dirs += [d / STAGE_DIRS[-1] for d in dirs[1:] if converts]  # a conversion's stage 2, once it starts
        for lock in (d / LOCK_NAME for d in dirs):  # a live holder's (a stale lock the job takes over)
            holder = lock_holder(lock)
            if holder is not None and holder.why_dead() is None:
                raise holder.in_use(lock)

    # the job's global batch and lr, said here for the processes it will have (its start says them again)
    if not args.sweep and not study:
        from ...apps.run.training import base_lr

        with speak.speaking_for("the job's stage 2" if converts else "the job"):
            base_lr(cfg, options_from_args(args).num_tasks, say_it=True)
    if uncached and args.cluster == "slurm":
        from ...hub_reach import offline_reason

        warn(
            f"warning: {', '.join(sorted(uncached))}: not in this machine's Hub cache, and the Hub is out of reach here "
            f"({offline_reason()}): a job whose nodes cannot reach it either stops at its start, after the queue's "
            "wait; put it in a cache the nodes read first (attnxfer fetch SPEC on a machine with internet; "
            "teacher.cache_dir names the cache)"
        )
    if missing and args.cluster == "slurm":  # a local job reads them here, and says so at once
        them = ("it", "does") if len(missing) == 1 else ("them", "do")
        warn(
            f"warning: {', '.join(sorted(missing))} {them[1]} not exist on this machine: the job reads {them[0]} "
            "where it runs (a path the compute nodes alone have is fine; a misspelt one fails the job after its "
            "wait in the queue)"
        )
    try:
        # a run's config as its command reads it (train's without convert's, mae's and search's sections)
        describe = str if args.job_command == "study" else partial(dump_config, command=args.job_command)
        results = submit_from_args(submittable(args.job_command), cfg, args, describe)
    except JobFailedError as e:  # the job's failure, in one line; the traceback is in the log it names
        # a cancelled job (or one past its requeue bound): the same command resumes it, unless its
        # checkpoint.resume would start over
        again = with_auto_resume(cfg)
        if isinstance(e, JobCancelledError):
            e.reason += again
        e.reason = e.reason.replace(RESUBMIT, f"{RESUBMIT}{again}")
        warn(f"attnxfer submit: error: {e.summary()}")
        return 1
    except WaitInterrupted as e:
        warn(f"attnxfer submit: {e}")
        return 130
    for result in results:  # a job waited for ends as its command run here ends
        for line in _end_lines(args.job_command, result, cfg):
            say(line)
    return 0


def _end_lines(command: str, result, cfg) -> list[str]:
    """What `attnxfer COMMAND` says as it ends, from the job's result (its rank 0's)."""
    if command == "convert":  # the job's result is the conversion's report
        from ...apps.convert.report import conversion_summary

        return [conversion_summary(result)]
    if command == "study":
        return end_study_lines(result, converts=cfg.command == "convert")
    return [done_line(result)]
