"""``attnxfer convert``: a softmax teacher into an efficient-attention student (stage 1, stage 2, report)."""

from __future__ import annotations

import argparse

from ...config import require_teacher
from ...speak import is_main, say
from ..rope_help import ROPE_EPILOG, RopeHelpFormatter
from .base import add_config_args, load, register_command


def _arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--skip-stage1",
        action="store_true",
        help="no layer-parallel transfer (the ablation); same as convert.stage1_steps=0",
    )


@register_command(
    "convert",
    help="turn a softmax teacher into an efficient-attention student (stage 1 + stage 2 + report)",
    description="Copy the teacher into a student with efficient attention (convert.attention), fit each "
    "attention layer to the teacher's on the teacher's hidden inputs (stage 1), fine-tune end to end "
    "(stage 2: on the labels, or without them by feature distillation from the teacher; logit distillation "
    "with transfer.logit_distill; the schedule/optim/transfer sections), and write RUN_DIR/report.json and "
    "report.md.",
    epilog=ROPE_EPILOG,
    formatter_class=RopeHelpFormatter,
    arguments=_arguments,
)
def run(args) -> int:
    cfg = load(args)
    require_teacher(cfg, conversion=True)  # before the app's import (torch), as a config error
    from ...apps.convert.convert import convert

    result = convert(cfg, skip_stage1=args.skip_stage1)
    if not is_main():  # rank 0 holds the report
        return 0
    from ...apps.convert.report import conversion_summary

    say(conversion_summary(result.report))
    return 0
