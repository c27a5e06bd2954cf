"""Speed of a softmax ViT, its attention floor, every zoo attention and a few hybrids at given token counts.

What `attnxfer convert ... convert.attention=auto` decides from, measured the way it measures it, in ONE process
per run: per token count, the teacher (a timm ViT with random weights: speed does not depend on them), its
floor (`attnxfer.models.efficient.floor.floor_model`: attention that projects but mixes no tokens, the ceiling
of every converted student), each zoo attention in every block, and hybrids (one attention per block, softmax
kept where named), all built as `attnxfer convert` builds them (`build_efficient_student`). Beside them one
attention block of softmax and of each zoo member is timed alone, and each hybrid's speed is also *predicted*,
from those block times (teacher time minus what its swapped blocks save: the selector's time model before
2026-11-26) and from whole models (each block of c saves (teacher - all-c student) / depth: the selector's
time model since), so the table says how far each prediction stands from the measured speed. Every model and
block runs once per round in a rotated order (`attnxfer.train.timing.interleaved_timings`), medians of the rounds; ratios are to
the teacher of the same call.

Defaults: a 4-block ViT of width 192 (3 heads, 16 px patches) at 1,025 and 4,097 tokens (512 and 1024 px),
batch 1, forward only, fp32 on one CPU thread (bf16 autocast on CUDA), 1 warm-up and 5 timed rounds; the
hybrids keep softmax in the first 1, 2 and 3 blocks and put relu_linear in the others (and the reverse).

    python benchmarks/hybrid_speed.py
    python benchmarks/hybrid_speed.py --tokens 1025 --attentions relu_linear performer --hybrids softmax,relu_linear,relu_linear,softmax
    python benchmarks/hybrid_speed.py --width 384 --heads 6 --depth 12 --json runs/hybrid_speed.json
    python benchmarks/hybrid_speed.py --tokens 4097 --width 64 --heads 2 --patch 4 --mlp-ratio 2 --batch 2 \
        --attentions hedgehog --hybrids softmax,hedgehog,softmax,hedgehog     # recall/teacher_deep's shape
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from functools import partial
from pathlib import Path

import timm
import torch
from _measure import bench_device, format_table, machine_info, write_json
from torch import nn

from attnxfer.models.attention.registry import list_attentions
from attnxfer.models.efficient import build_efficient_student
from attnxfer.models.efficient.floor import floor_model
from attnxfer.train.timing import interleaved_timings

#: registered names that are no student of their own (the teacher's, the attention-free block, a template)
NOT_STUDENTS = ("softmax", "none", "formula")


def default_hybrids(depth: int, name: str = "relu_linear") -> list[str]:
    """Softmax in the first k blocks and ``name`` in the rest, and the reverse, for k = 1 .. depth - 1."""
    out = []
    for k in range(1, depth):
        out.append(",".join(["softmax"] * k + [name] * (depth - k)))
        out.append(",".join([name] * (depth - k) + ["softmax"] * k))
    return out


def build(
    args, tokens: int, device: torch.device, log
) -> tuple[nn.Module, dict[str, nn.Module], dict[str, nn.Module]]:
    """The teacher at ``tokens`` tokens, {model name: model} (floor, zoo, hybrids) and {name: one attention block}."""
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise SystemExit(
            f"--tokens {tokens}: a class token + a square grid, e.g. {1 + grid * grid} or {1 + (grid + 1) ** 2}"
        )
    torch.manual_seed(0)
    teacher = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=grid * args.patch,
        patch_size=args.patch,
        embed_dim=args.width,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        num_classes=10,
    ).eval()
    models: dict[str, nn.Module] = {"floor": floor_model(teacher)}
    blocks: dict[str, nn.Module] = {"softmax": teacher.blocks[0].attn}
    for name in args.attentions:
        try:
            student = build_efficient_student(teacher, name)
        except (TypeError, ValueError) as e:
            log(f"{tokens} tokens: {name} skipped ({str(e).splitlines()[0]})")
            continue
        models[name] = student
        blocks[name] = student.blocks[0].attn
    for hybrid in args.hybrids:
        names = hybrid.split(",")
        if len(names) != args.depth or not set(names) <= {"softmax", *blocks}:
            log(
                f"{tokens} tokens: hybrid {hybrid} skipped (one name per block, softmax or a timed attention)"
            )
            continue
        models[hybrid] = build_efficient_student(teacher, names)
    to = lambda m: m.to(device).eval()
    return to(teacher), {k: to(m) for k, m in models.items()}, {k: to(m) for k, m in blocks.items()}


def measure(args, tokens: int, device: torch.device, log) -> list[dict]:
    """One row per model at ``tokens`` tokens: ms, images/s, × the teacher, × the floor, and for a hybrid the
    speed its block times predict (and the speed the all-c students predict, ``predicted_whole_x_teacher``)."""
    teacher, models, blocks = build(args, tokens, device, log)
    side = math.isqrt(tokens - 1) * args.patch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, side, side, generator=g).to(device)
    seq = torch.randn(args.batch, tokens, args.width, generator=g).to(device)
    calls = {"teacher": partial(teacher, x), **{k: partial(m, x) for k, m in models.items()}}
    calls |= {f"block:{k}": partial(b, seq) for k, b in blocks.items()}
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), cast:
        times = interleaved_timings(calls, device=device, warmup=args.warmup, repeats=args.repeats)
    ms = {k: 1000.0 * t.median for k, t in times.items()}
    soft = ms["block:softmax"]
    rows = []
    for name in ["teacher", *models]:
        kind = "hybrid" if "," in name else ("reference" if name in ("teacher", "floor") else "zoo")
        row = {
            "tokens": tokens,
            "model": name,
            "kind": kind,
            "ms": ms[name],
            "images_per_s": args.batch * 1000.0 / ms[name],
            "x_teacher": ms["teacher"] / ms[name],
            "of_floor": ms["floor"] / ms[name],
            "spread": times[name].spread,
        }
        if f"block:{name}" in ms:
            row["block_ms"] = ms[f"block:{name}"]
            row["block_x_softmax"] = soft / ms[f"block:{name}"]
        if kind != "reference":
            names = name.split(",") if kind == "hybrid" else [name] * args.depth
            saved = sum(soft - ms[f"block:{n}"] for n in names if n != "softmax")
            row["predicted_x_teacher"] = ms["teacher"] / (ms["teacher"] - saved)
        rows.append(row)
    # the same prediction from whole models: each block of c saves (teacher - all-c student) / depth, which
    # counts what a block costs inside the model (caches, the MLPs' traffic) rather than alone
    for row in rows:
        if row["kind"] == "hybrid" and all(n == "softmax" or n in ms for n in row["model"].split(",")):
            saved = sum(
                (ms["teacher"] - ms[n]) / args.depth for n in row["model"].split(",") if n != "softmax"
            )
            row["predicted_whole_x_teacher"] = ms["teacher"] / (ms["teacher"] - saved)
    return rows


COLUMNS = [
    ("tokens", "tokens", ",d"),
    ("model", "model", ""),
    ("ms", "ms", ".2f"),
    ("images_per_s", "images/s", ".2f"),
    ("x_teacher", "× teacher", ".2f"),
    ("predicted_x_teacher", "predicted × teacher", ".2f"),
    ("predicted_whole_x_teacher", "predicted from whole models", ".2f"),
    ("of_floor", "of the floor", ".2f"),
    ("block_x_softmax", "one block × softmax", ".2f"),
    ("spread", "± (IQR/2)", ".1%"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1025, 4097], help="class token + a square grid"
    )
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument(
        "--mlp-ratio", type=float, default=4.0, help="MLP width / model width (timm's mlp_ratio)"
    )
    parser.add_argument("--attentions", nargs="+", default=None, help="zoo attentions (default: every one)")
    parser.add_argument("--hybrids", nargs="+", default=None, help="one comma-separated name per block, each")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", type=Path, default=None, help="write rows, settings and machine facts here")
    args = parser.parse_args(argv)
    device = bench_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.attentions = args.attentions or [n for n in list_attentions() if n not in NOT_STUDENTS]
    args.hybrids = args.hybrids if args.hybrids is not None else default_hybrids(args.depth)
    info = machine_info(device)
    log = partial(print, file=sys.stderr)
    started = time.perf_counter()
    rows = []
    for tokens in args.tokens:
        rows += measure(args, tokens, device, log)
        print(
            format_table([r for r in rows if r["tokens"] == tokens], COLUMNS, markdown=args.markdown),
            flush=True,
        )
        print()
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    total = time.perf_counter() - started
    log(
        f"ViT width {args.width}, {args.depth} blocks, {args.heads} heads, batch {args.batch}, {precision}, "
        f"{info['torch_threads']} threads, {total:.0f} s"
    )
    if args.json:
        write_json(
            str(args.json),
            {
                "settings": vars(args) | {"json": str(args.json)},
                "machine": info,
                "seconds": total,
                "rows": rows,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
