"""``attnxfer study``: several students (trained or converted) from one teacher pass a step, in one job."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...config.study_spec import COMMANDS
from ...speak import is_main, say
from .base import add_config_args, add_vary, done_line, load_study, register_command


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    add_vary(p)
    p.add_argument(
        "--command",
        dest="study_command",  # not `command`: that names the subcommand in error messages
        choices=COMMANDS,
        default=None,
        help="what each student is: train (default; `attnxfer train`) or convert (`attnxfer convert`: "
        "stage 1 and stage 2 of each efficient attention, and conversion_study.md comparing them); a "
        "study's own study.yaml names it (command: convert)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write the study's report (study.md, study.png; a convert study's conversion_study.md) from its "
        "students' folders and exit, training nothing (a study of one process writes it when it ends)",
    )


def show_config(args) -> int:
    """``--print-config``: the study's base, then each student's config with what it changes."""
    from ...config import describe_changes, dump_config
    from ...config.study_spec import study_base

    spec = load_study(args)
    say("# " + describe_changes(study_base(args.config), spec.base, args.config).replace("\n", "\n# "))
    for student, cfg in spec.configs():
        changes = describe_changes(spec.shared_base(), cfg, "the study's base").replace("\n", "\n# ")
        say(f"---\n# student {student.name}: {changes}")
        say(dump_config(cfg, spec.command).rstrip())
    return 0


@register_command(
    "study",
    help="train (or convert) several students from one teacher in one job: one batch and one teacher forward "
    "per step",
    description="A study: the students listed under students: in the YAML (each a name and the keys it "
    "changes) and/or --vary KEY=V1,V2 (the cartesian product), all reading one stream of batches and one "
    "teacher pass per step, each into RUN_DIR/<name> laid out as a train run (eval, export and inspect take "
    "it); with --command convert, each an `attnxfer convert` of its own convert.* keys (stage 1 and stage 2 "
    "in lock step, RUN_DIR/<name> laid out as a conversion) and RUN_DIR/conversion_study.md comparing them. "
    "What every student must share (data, batch, image size, teacher, schedule length, augmentation; a "
    "convert study's stage-1 batch, probe and speed settings too) is refused in a student's keys before any "
    "work. Each student ends where it would alone.",
    arguments=_arguments,
    show_config=show_config,
)
def run(args) -> int:
    spec = load_study(args)  # before the app's import (torch): a config error answers at once
    if spec.command == "convert":
        return _convert_study(spec, args.report)
    if args.report:
        from ...apps.study.report import write_study_report
        from ...train.runtime import resolve_device

        write_study_report(spec.run_dir, device=resolve_device(spec.base.device))  # says where it is
        return 0
    from ...apps.study.study import study

    result = study(spec)
    for line in end_lines(result, converts=False):
        say(line)
    return _refuse_stopped(spec, result.students)


def _convert_study(spec, report_only: bool) -> int:
    """A convert study: its comparison alone (``--report``), or the study and one line per student."""
    from ...apps.convert.comparison import write_conversion_comparison

    if report_only:
        write_conversion_comparison(spec.run_dir)
        return 0
    from ...apps.convert.conversion_study import convert_study

    result = convert_study(spec)
    if is_main():  # rank 0 holds the reports
        for line in end_lines(result, converts=True):
            say(line)
    # every rank ends as rank 0 does (as train's ranks do): a student's stop is agreed by all ranks
    return _refuse_stopped(spec, result.students)


def end_lines(result, *, converts: bool) -> list[str]:
    """How a study ends (run here, or submitted and waited for): each student's end line, or why it stopped,
    then where the study's files are (and, where several processes trained it, how its report is written)."""
    from ...run_layout import STUDY_YAML

    report = f"; its report, from one process: attnxfer study -c {Path(result.run_dir) / STUDY_YAML} --report"
    report = "" if result.report else report
    if converts:
        from ...apps.convert.report import conversion_summary

        return [
            *(
                f"{s.name}: {f'stopped: {s.stopped}' if s.stopped else conversion_summary(s.report)}"
                for s in result.students
            ),
            f"study -> {result.run_dir} (study.json{f', {result.report.name}' if result.report else ''}){report}",
        ]
    return [
        *(f"{s.name}: {s.stopped if s.stopped else done_line(s.result)}" for s in result.students),
        f"study -> {result.run_dir} (study.json{', study.md' if result.report else ''}){report}",
    ]


def submitted_study(spec):
    """What `attnxfer submit --command study` runs: the study (a train or a convert study), failing as
    `attnxfer study` does where a student stopped, so that its SLURM job does not show COMPLETED."""
    if spec.command == "convert":
        from ...apps.convert.conversion_study import convert_study as run_study
    else:
        from ...apps.study.study import study as run_study
    result = run_study(spec)
    _refuse_stopped(spec, result.students)  # on every rank: a student's stop is agreed by all ranks
    return result


def _refuse_stopped(spec, students) -> int:
    """A study whose student stopped early ends as `train` does on a non-finite loss (exit 2, one line), the
    others trained and reported; run again, the study keeps that student stopped, so the line says what does."""
    from ...train.terms import NonFiniteLossError

    if stopped := [s for s in students if s.stopped]:
        one = Path(stopped[0].run_dir) if len(stopped) == 1 else Path(spec.run_dir) / "<student>"
        raise NonFiniteLossError(
            "; ".join(f"student {s.name!r} stopped: {s.stopped.rstrip('.')}" for s in stopped)
            + f"; a study run again keeps {'it' if len(stopped) == 1 else 'them'} stopped: attnxfer {spec.command}"
            f" -c {one / 'config.yaml'} with that change trains it alone"
        )
    return 0
