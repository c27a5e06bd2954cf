"""``attnxfer demo``: the animal-mnist demo on CPU (an MAE teacher without labels, then four students)."""

from __future__ import annotations

import argparse

from .base import register_command


def _positive_int(text: str) -> int:
    """argparse type for step counts: 0 or less would silently mean 'the default'."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where runs, table and plot go (default runs/demo)")
    p.add_argument(
        "--budget-steps", type=_positive_int, default=None, help="optimiser steps per student (equal budget)"
    )
    p.add_argument(
        "--teacher-steps", type=_positive_int, default=None, help="optimiser steps for the teacher"
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke version (tiny budgets: about a minute on 2 CPU cores)"
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="students per run kind, one per seed (teacher once): mean ± std and paired McNemar tests",
    )
    p.add_argument(
        "--supervised",
        action="store_true",
        help="add a second table: copy/distillation from a teacher trained with labels (about +6 min)",
    )


@register_command(
    "demo",
    help="MAE teacher (no labels), then scratch, fine-tuned MAE, copy and distill on animal-mnist (CPU)",
    description="The paper's table at toy scale on animal-mnist, on a CPU: pre-train a micro-ViT as a masked "
    "autoencoder without labels, then train students from scratch, by fine-tuning it, by attention copy and "
    "by attention distillation from it. Leaves the teacher's export at OUT/mae/export (runs/demo/mae/export), "
    "where the demo recipes and the documentation's examples look for it.",
    arguments=_arguments,
)
def run(args) -> int:
    from ...apps.demo import run_demo

    run_demo(
        args.out,
        budget_steps=args.budget_steps,
        teacher_steps=args.teacher_steps,
        quick=args.quick,
        seeds=args.seeds,
        supervised=args.supervised,
    )
    return 0
