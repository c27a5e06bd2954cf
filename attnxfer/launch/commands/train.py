"""``attnxfer train``: attention copy / distillation (or training from scratch) of the config's run."""

from __future__ import annotations

from .base import add_config_args, load, register_command


@register_command(
    "train",
    help="train a student by attention copy/distillation (or from scratch)",
    description="Train (or resume: checkpoint.resume=auto) the run described by the config.",
    arguments=add_config_args,
)
def run(args) -> int:
    cfg = load(args)  # before the app's import (torch): a config error answers at once
    from ...apps.training import train

    result = train(cfg)
    if result.best_top1 is not None:
        best = f"best val top1 {result.best_top1:.2f}"
    else:  # a run without a task loss: its final-feature cosine with the teacher
        best = f"best {result.metric.removeprefix('val_')} {result.best:.4g}"
    print(f"done: {result.steps} steps, {best} -> {result.run_dir}")
    return 0
