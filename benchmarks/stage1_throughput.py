"""Steps/s of stage 1 of conversion (`attnxfer.train.stage1.stage1_transfer`), optionally against its loop
at another git revision, measured in one run.

A random teacher of the preset's shape and a Hedgehog student (by default; ``--attention``) built from it
with `build_efficient_student`, as `attnxfer convert` builds them; stage 1 is run on images (the teacher's
signals computed each step, as in `attnxfer convert`) a round of ``--steps-per-round`` steps at a time,
logging at the first and last step of each round. With ``--baseline REV`` the file
``attnxfer/train/stage1.py`` of git revision REV is loaded beside this checkout's (same package, same
imports) and both fit copies of the same student in interleaved rounds (`attnxfer.train.timing`), so
the ratio holds under the machine's background load. On CUDA it also counts the synchronising calls torch
makes in one round of each (its sync debug mode; a round has two logged steps, which read on purpose).

    python benchmarks/stage1_throughput.py --preset cpu --baseline main     # the CPU line, 1 thread
    python benchmarks/stage1_throughput.py --preset gpu --baseline stage1_before.py --json stage1_gpu.json

(``--baseline`` also takes a file: a copy without git history, e.g. on a lent GPU machine, gets the old loop
from ``git show REV:attnxfer/train/stage1.py > stage1_before.py`` made beforehand.)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# Measure this checkout's attnxfer, installed or not.
sys.path[:0] = [p for p in (_ROOT, _HERE) if p not in sys.path]

import torch  # noqa: E402
from _measure import format_table, load_average, machine_info, write_json  # noqa: E402

from attnxfer.models import create_vit  # noqa: E402
from attnxfer.models.efficient import build_efficient_student  # noqa: E402
from attnxfer.speak import LOGGER_NAME  # noqa: E402
from attnxfer.train.stage1 import stage1_transfer  # noqa: E402
from attnxfer.train.timing import interleaved_timings  # noqa: E402
from attnxfer.transfer.conversion import build_conversion_plan  # noqa: E402


@dataclass(frozen=True)
class Preset:
    device: str
    teacher: dict[str, Any]  # create_vit arguments of the (random) teacher
    batch: int
    steps_per_round: int
    warmup: int
    repeats: int
    threads: int | None


PRESETS = {
    # train_throughput.py's CPU shape: ViT-B's 12 blocks at 1/8 width (96, 3 heads), 65 tokens
    "cpu": Preset(
        "cpu",
        dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=12, embed_dim=96, num_heads=3),
        batch=32,
        steps_per_round=10,
        warmup=1,
        repeats=8,
        threads=1,
    ),
    # ViT-B/16 at 224 px (197 tokens), stage 1's fp32 (as `attnxfer convert` runs it)
    "gpu": Preset(
        "cuda",
        dict(name="vit_base_patch16_224"),
        batch=64,
        steps_per_round=20,
        warmup=2,
        repeats=5,
        threads=None,
    ),
}


def load_stage1_at(rev: str) -> Callable[..., Any]:
    """``stage1_transfer`` from ``attnxfer/train/stage1.py`` at git revision ``rev`` (or from the file
    ``rev``, for a checkout without git history), imported as a sibling module of this checkout's (its
    relative imports resolve to this checkout's package)."""
    if os.path.isfile(rev):
        with open(rev) as f:
            text = f.read()
    else:
        source = subprocess.run(
            ["git", "show", f"{rev}:attnxfer/train/stage1.py"], cwd=_ROOT, capture_output=True, text=True
        )
        if source.returncode:
            raise SystemExit(f"--baseline {rev}: not a file, and git show failed: {source.stderr.strip()}")
        text = source.stdout
    name = "attnxfer.train._stage1_baseline"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "attnxfer.train"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(text, f"{rev}:attnxfer/train/stage1.py", "exec"), module.__dict__)
    return module.stage1_transfer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--attention", default="hedgehog", help="the student's attention (a zoo name)")
    p.add_argument("--train", default="new", help="convert.stage1_train: new, qk or new+qk")
    p.add_argument(
        "--baseline",
        default=None,
        help="git revision (or a copy of its stage1.py) whose stage-1 loop to time beside this one",
    )
    p.add_argument("--steps-per-round", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps a round, 1 + 2 rounds")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _not_a_cpu_memory_line(record: logging.LogRecord) -> bool:
    """Drops stage 1's own ``stage 1 memory: peak ...`` line. On CPU that figure is the process's RSS growth
    (`attnxfer.train.peak_memory`), which after the first round reads 0: the rounds reuse pages the process
    already holds. Peak memory is not measured on CPU here (as in model_throughput.py); the header says so."""
    return not record.getMessage().startswith("stage 1 memory:")


def cuda_syncs_per_round(fns: dict[str, Callable[[], None]]) -> dict[str, int]:
    found = {}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found[name] = sum("synchroniz" in str(w.message) for w in caught)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    changes = dict(steps_per_round=args.steps_per_round, warmup=args.warmup, repeats=args.repeats)
    if args.quick:
        changes = dict(
            dict(steps_per_round=2, warmup=1, repeats=2), **{k: v for k, v in changes.items() if v}
        )
    preset = replace(preset, **{k: v for k, v in changes.items() if v is not None})
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device; use --preset cpu on this machine")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    device = torch.device(preset.device)
    machine = machine_info(device)
    loops = {"this checkout": stage1_transfer}
    if args.baseline:
        loops[args.baseline] = load_stage1_at(args.baseline)
    torch.manual_seed(0)
    spec = dict(preset.teacher)
    teacher = create_vit(spec.pop("name"), num_classes=0, **spec).to(device).eval().requires_grad_(False)
    student = build_efficient_student(teacher, args.attention).to(device)
    k = preset.steps_per_round
    plan = build_conversion_plan(
        teacher,
        student,
        stage1_steps=k,
        stage1_lr=1e-2,
        stage1_batch_size=preset.batch,
        stage1_train=args.train,
    )
    size = teacher.patch_embed.img_size
    g = torch.Generator(device=device).manual_seed(1)
    images = [torch.randn(preset.batch, 3, *size, device=device, generator=g) for _ in range(4)]

    def batches():
        while True:
            yield from images

    def round_of(loop, model):
        def f() -> None:
            loop(
                teacher,
                model,
                plan,
                batches(),
                warmup_steps=0,
                clip_grad=1.0,
                log_every=k,
            )

        return f

    fns = {name: round_of(loop, copy.deepcopy(student)) for name, loop in loops.items()}
    started = time.perf_counter()
    logger = logging.getLogger(LOGGER_NAME)
    if device.type == "cpu":
        logger.addFilter(_not_a_cpu_memory_line)
    try:
        timings = interleaved_timings(fns, device=device, warmup=preset.warmup, repeats=preset.repeats)
    finally:
        logger.removeFilter(_not_a_cpu_memory_line)
    syncs = cuda_syncs_per_round(fns) if device.type == "cuda" else None
    base = timings[args.baseline] if args.baseline else None
    rows = [
        {
            "loop": name,
            "step_ms": 1e3 * t.median / k,
            "spread": t.spread,
            "steps_per_s": k / t.median,
            "speedup": base.median / t.median if base else None,
            "cpu_speedup": base.cpu_median / t.cpu_median if base else None,
            "syncs_per_round": syncs[name] if syncs else None,
            "times": t.times,
        }
        for name, t in timings.items()
    ]
    return {
        "preset": args.preset,
        "settings": asdict(preset)
        | {"attention": args.attention, "train": args.train, "baseline": args.baseline},
        "machine": machine,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "loadavg_end": load_average(),
    }


COLUMNS = [
    ("loop", "stage-1 loop", ""),
    ("step_ms", "step ms", ".1f"),
    ("spread", "±", ".0%"),
    ("steps_per_s", "steps/s", ".2f"),
    ("speedup", "× baseline", ".3f"),
    ("cpu_speedup", "cpu ×", ".3f"),
    ("syncs_per_round", "CUDA syncs / round", ""),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    m = result["machine"]
    s = result["settings"]
    print(
        f"preset {result['preset']}: {m['device']} ({m.get('gpu', m['processor'])}), torch {m['torch']}, "
        f"{m['torch_threads']} thread(s), load {m.get('loadavg_start')} -> {result['loadavg_end']}, "
        f"{result['seconds']:.0f} s; {s['attention']} student, stage1_train={s['train']}, batch {s['batch']}, "
        f"{s['steps_per_round']} steps a round (2 logged)"
        + ("; peak memory: n/a on CPU" if m["device"] == "cpu" else "")
    )
    print(format_table(result["rows"], COLUMNS, markdown=True))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
