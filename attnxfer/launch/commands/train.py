"""``attnxfer train``: attention copy / distillation (or training from scratch) of the config's run."""

from __future__ import annotations

from ...config import require_teacher
from ...speak import say
from .base import add_config_args, done_line, load, register_command


@register_command(
    "train",
    help="train a student by attention copy/distillation (or from scratch)",
    description="Train (or resume: checkpoint.resume=auto) the run described by the config.",
    arguments=add_config_args,
)
def run(args) -> int:
    cfg = load(args)  # before the app's import (torch): a config error answers at once
    require_teacher(cfg)
    from ...apps.run.training import train

    say(done_line(train(cfg)))
    return 0
