"""``attnxfer fetch``: a teacher into the Hugging Face cache, on a machine with internet."""

from __future__ import annotations

import argparse

from ...speak import say
from .base import register_command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="timm name (vit_large_patch16_224.mae) or hf-hub:ORG/NAME[@rev]")
    p.add_argument("--revision", default=None)
    p.add_argument("--cache-dir", default=None, help="cache folder (default: HF_HUB_CACHE / HF_HOME)")


@register_command(
    "fetch",
    help="download a teacher into the Hugging Face cache (on a machine with internet)",
    description="Download a teacher's files into the Hugging Face cache on a machine with internet, so that "
    "runs where there is none (HF_HUB_OFFLINE=1) find them there; prints the folder they are in.",
    arguments=_arguments,
)
def run(args) -> int:
    from ...sources.teacher import fetch_teacher

    path = fetch_teacher(args.spec, cache_dir=args.cache_dir, revision=args.revision)
    say(f"{args.spec} -> {path}")
    return 0
