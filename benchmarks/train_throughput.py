"""Images/s of `attnxfer train` for plain fine-tuning, attention copy and attention distillation.

The real training path: each configuration is an `Engine` built by `attnxfer.apps.run.training.build_engine`
from the paper's ViT recipes (`paper/vit_base_copy`, `paper/vit_base_distill`) with synthetic data; its
loop (`Engine.steps`: the loader, the step, EMA, logging) is advanced a round of ``--steps-per-round``
optimiser steps at a time. Every round runs each configuration once, in an order rotated each round
(`attnxfer.train.timing`), so all share the machine's background load; images/s = steps × batch / the
median round time.

  none     plain fine-tuning: the student initialised from the teacher's weights, ``transfer.mode=none``
  copy     attention copy (`paper/vit_base_copy`: all blocks take the teacher's q/k)
  distill  attention distillation (`paper/vit_base_distill`: blocks 0-8 of 12, atd_weight 3)

each eager and with ``model.compile=true teacher.compile=true``. The targets: copy ≥ 0.8× and
distill ≥ 0.65× the plain fine-tune's images/s (same compile setting). The teacher is a randomly
initialised ViT of the preset's shape exported to a temporary ``local-dir:`` (speed does not depend on its
weights); the students mirror it. Also measured in the same run: the loader alone (same dataset, batch,
workers, pinning: it must outrun the fastest configuration, or the table measures data loading), the
dynamo graphs compiled while timing (must be 0: no recompiles from step to step), one AdamW step in each of
torch's implementations, the patch embedding (a ViT's only convolution) in channels-last vs the default
layout with its share of a plain step, and on CUDA the synchronising calls torch makes on unlogged steps
(its sync debug mode; must be 0).

    python benchmarks/train_throughput.py --preset cpu             # tiny ViT, 1 thread: the CPU table
    python benchmarks/train_throughput.py --preset gpu --json out.json   # ViT-B/16, 224 px, bf16, batch 64
    python benchmarks/train_throughput.py --preset cpu --quick     # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
# Measure this checkout's attnxfer, installed or not.
sys.path[:0] = [p for p in (os.path.dirname(_HERE), _HERE) if p not in sys.path]

import torch  # noqa: E402
from _measure import (  # noqa: E402
    format_table,
    load_average,
    machine_info,
    mib,
    step_peak_growth,
    write_json,
)

from attnxfer.apps.run.training import build_engine  # noqa: E402
from attnxfer.checkpoints.export import ModelCardInfo, export_student  # noqa: E402
from attnxfer.config import load_config  # noqa: E402
from attnxfer.data.loader import build_loader  # noqa: E402
from attnxfer.models import create_vit  # noqa: E402
from attnxfer.train.optim import optimizer_implementation, student_param_groups  # noqa: E402
from attnxfer.train.timing import interleaved_timings  # noqa: E402

MODES = ("none", "copy", "distill")
RECIPES = {"none": "paper/vit_base_copy", "copy": "paper/vit_base_copy", "distill": "paper/vit_base_distill"}
TARGETS = {"copy": 0.8, "distill": 0.65}  # images/s over the plain fine-tune's


@dataclass(frozen=True)
class Preset:
    device: str
    precision: str
    teacher: dict[str, Any]  # create_vit arguments of the (random) teacher; the students mirror it
    batch: int
    num_classes: int
    steps_per_round: int
    warmup: int  # untimed rounds (compilation happens here)
    repeats: int
    num_workers: int
    pin_memory: bool
    threads: int | None  # torch threads (None: torch's default)
    extra: tuple[str, ...] = field(default_factory=tuple)  # config overrides for every run


PRESETS = {
    # ViT-B's 12 blocks at 1/8 of its width (96, 3 heads of 32) on 32-px images in 4-px patches (65 tokens),
    # so the recipes' layer choices mean what they mean for ViT-B: a few minutes on 2 cores, 1 thread.
    "cpu": Preset(
        device="cpu",
        precision="fp32",
        teacher=dict(
            name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=12, embed_dim=96, num_heads=3
        ),
        batch=32,
        num_classes=100,
        steps_per_round=5,
        warmup=2,
        repeats=10,  # the shared 2-core machine is noisy: more rounds for the medians
        num_workers=0,
        pin_memory=False,
        threads=1,
    ),
    # ViT-B/16 at 224 px (197 tokens) in bf16, the paper recipes' shape; < 8 minutes on one H100.
    "gpu": Preset(
        device="cuda",
        precision="bf16",
        teacher=dict(name="vit_base_patch16_224"),
        batch=64,
        num_classes=1000,
        steps_per_round=20,
        warmup=2,
        repeats=5,
        num_workers=6,
        pin_memory=True,
        threads=None,
    ),
}


def export_teacher(preset: Preset, folder: str) -> str:
    """A randomly initialised teacher of the preset's shape (as an MAE encoder: no head) in timm's format."""
    torch.manual_seed(0)
    args = dict(preset.teacher)
    teacher = create_vit(args.pop("name"), num_classes=0, **args)
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    out = os.path.join(folder, "teacher")
    export_student(teacher, out, card=ModelCardInfo(model_name="random teacher", license="apache-2.0"))
    return out


def run_config(mode: str, compiled: bool, preset: Preset, teacher: str, folder: str, steps: int):
    """The `TrainConfig` of one benchmark configuration (a paper recipe on synthetic data)."""
    name = f"{mode}{'+compile' if compiled else ''}"
    if mode == "none":
        source = ["transfer.mode=none", "teacher.spec=null", f"model.init=local-dir:{teacher}"]
    else:
        source = [f"teacher.spec=local-dir:{teacher}"]
    k = preset.steps_per_round
    overrides = [
        f"run_dir={os.path.join(folder, name)}",
        f"device={preset.device}",
        f"precision={preset.precision}",
        *source,
        "data.dataset=synthetic",
        f"data.batch_size={preset.batch}",
        f"data.kwargs.length={(steps + k) * preset.batch}",  # one epoch covers every timed step
        f"data.num_workers={preset.num_workers}",
        f"data.pin_memory={str(preset.pin_memory).lower()}",
        f"model.num_classes={preset.num_classes}",
        "model.drop_path_rate=0.1",  # one rate for all three (the recipes say 0.0 for copy, 0.2 for distill)
        f"schedule.max_steps={steps + 1}",  # never reached: no final evaluation inside the timing
        "schedule.epochs=1",
        f"log.every_steps={k}",  # one logged step a round, as a real run logs one step in 20
        "log.progress=false",
        "checkpoint.every_epoch=false",
        "checkpoint.every_minutes=null",
        *preset.extra,
    ]
    if compiled:
        overrides += ["model.compile=true"] + (["teacher.compile=true"] if mode != "none" else [])
    return name, load_config(RECIPES[mode], overrides)


def loader_images_per_second(engine, preset: Preset, batches: int) -> float:
    """The training loader's dataset, batch, workers and pinning alone: images/s over ``batches`` batches."""
    loader = build_loader(
        engine.train_loader.dataset,
        batch_size=preset.batch,
        sampler=torch.utils.data.RandomSampler(engine.train_loader.dataset),
        num_workers=preset.num_workers,
        pin_memory=preset.pin_memory and torch.cuda.is_available(),
        drop_last=True,
    )
    it = iter(loader)
    next(it)  # workers started
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * preset.batch / (time.perf_counter() - t0)


def patch_embed_timings(engine, preset: Preset, device: torch.device, repeats: int) -> dict[str, Any]:
    """The only convolution of a ViT, its patch embedding, forward + backward on a training batch: in the
    default layout and channels-last (weights and input), interleaved, under the run's autocast. Its
    share of the plain step says what channels-last could win at most."""
    import copy

    x = torch.stack([engine.train_loader.dataset[i][0] for i in range(preset.batch)]).to(device)
    layouts = {}
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        pe = copy.deepcopy(engine.student.patch_embed).to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)

        def f(pe=pe, xi=xi) -> None:
            with engine.accelerator.autocast():
                y = pe(xi)
            y.float().square().mean().backward()
            pe.zero_grad(set_to_none=True)

        layouts[name] = f
    t = interleaved_timings(layouts, device=device, warmup=2, repeats=repeats)
    return {
        "contiguous_ms": 1e3 * t["contiguous"].median,
        "channels_last_ms": 1e3 * t["channels_last"].median,
        "channels_last_speedup": t["contiguous"].median / t["channels_last"].median,
    }


def adamw_timings(engine, device: torch.device, repeats: int) -> dict[str, float]:
    """One AdamW step over the plain run's parameter groups (random gradients) in each of torch's
    implementations, interleaved, in ms: what `attnxfer.train.optim.build_adamw`'s choice rests on."""
    import copy

    student = copy.deepcopy(engine.student)
    for p in student.parameters():
        p.grad = torch.randn_like(p)
    groups = student_param_groups(student, weight_decay=0.05)
    kinds = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}
    fns = {}
    for name, kwargs in kinds.items():
        params = [dict(g, params=[p.detach().clone().requires_grad_() for p in g["params"]]) for g in groups]
        for g, src in zip(params, groups):
            for p, q in zip(g["params"], src["params"]):
                p.grad = q.grad
        fns[name] = torch.optim.AdamW(params, lr=1e-4, **kwargs).step
    t = interleaved_timings(fns, device=device, warmup=2, repeats=repeats)
    return {name: 1e3 * t[name].median for name in fns}


def cuda_syncs_on_unlogged_steps(gens: dict, k: int) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Synchronising CUDA calls torch makes during ``k - 1`` unlogged steps of each run (its sync debug mode,
    warnings counted): the GPU check of what tests/training/test_throughput.py counts on CPU. Each run must stand just
    after a logged step (the timing rounds end there). Also where each came from (the Python line that made
    the call, in whichever thread, and which of the steps: a one-off, or one every step)."""
    import warnings

    found, places = {}, {}
    for name, gen in gens.items():
        torch.cuda.synchronize()
        places[name] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for i in range(k - 1):
                    seen = len(caught)
                    next(gen)
                    places[name] += [
                        f"step {i + 1}/{k - 1}: {w.filename}:{w.lineno}"
                        for w in caught[seen:]
                        if "synchroniz" in str(w.message)
                    ]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found[name] = sum("synchroniz" in str(w.message) for w in caught)
        next(gen)  # the logged step: the next check starts after one again
    return found, places


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of none,copy,distill")
    p.add_argument(
        "--compile",
        choices=("both", "eager", "compiled"),
        default="both",
        help="eager, compiled (model.compile + teacher.compile) or both (default)",
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps-per-round", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (compilation happens in them)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (cpu preset default: 1)")
    p.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="one extra step's peak memory"
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the patch embedding in channels-last vs the default layout, and its share of a step",
    )
    p.add_argument(
        "--optimizers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time one AdamW step in torch's fused, foreach and for-loop implementations",
    )
    p.add_argument("--json", default=None, help="write rows, settings, machine facts and target checks here")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 steps a round, 1 warm-up and 2 timed rounds"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    changes = {
        k: v
        for k, v in dict(
            batch=args.batch,
            steps_per_round=args.steps_per_round,
            warmup=args.warmup,
            repeats=args.repeats,
            num_workers=args.workers,
            threads=args.threads,
        ).items()
        if v is not None
    }
    if args.quick:
        changes = dict(dict(steps_per_round=2, warmup=1, repeats=2), **changes)
    preset = replace(preset, **changes)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)}, got {args.modes!r}")
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device; use --preset cpu on this machine")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    # Several runs in one process share dynamo's per-function cache (one entry per graph kind): let it hold
    # all of them (a single `attnxfer train` run needs 3-5).
    torch._dynamo.config.recompile_limit = 64
    device = torch.device(preset.device)
    machine = machine_info(device)  # load average at the start
    compile_settings = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.compile]
    k = preset.steps_per_round
    steps = k * (preset.warmup + preset.repeats + 1) + 1  # warm-up, timed, GPU sync check, memory
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as folder:
        teacher = export_teacher(preset, folder)
        engines, gens = {}, {}
        for compiled in compile_settings:
            for mode in modes:
                name, cfg = run_config(mode, compiled, preset, teacher, folder, steps)
                engines[name] = build_engine(cfg)
                gens[name] = engines[name].steps()
        first = next(iter(engines.values()))
        loader_ips = loader_images_per_second(first, preset, batches=max(8, 2 * k))

        def advance(name: str):
            def f() -> None:
                for _ in range(k):
                    next(gens[name])

            return f

        fns = {name: advance(name) for name in engines}
        # warm-up rounds by hand (compilation), then count graphs: timing must compile nothing new
        for _ in range(preset.warmup):
            for f in fns.values():
                f()
        graphs_before = _dynamo_graphs()
        timings = interleaved_timings(fns, device=device, warmup=0, repeats=preset.repeats)
        graphs_during = _dynamo_graphs() - graphs_before
        syncs, sync_places = cuda_syncs_on_unlogged_steps(gens, k) if device.type == "cuda" else (None, None)
        peaks = {}
        if args.memory:
            for name in engines:
                peaks[name] = step_peak_growth(lambda name=name: next(gens[name]), device)
        adamw = adamw_timings(first, device, repeats=max(5, 3 * preset.repeats)) if args.optimizers else None
        layout = None
        if args.channels_last:
            layout = patch_embed_timings(first, preset, device, repeats=max(5, 3 * preset.repeats))
        for g in gens.values():
            g.close()
        facts = {name: optimizer_implementation(e.optimizer) for name, e in engines.items()}
        gens.clear()
        engines.clear()  # free the runs (and their loaders' workers) before the folder goes
    rows = []
    for compiled in compile_settings:
        base_name = "none+compile" if compiled else "none"
        base = timings.get(base_name)
        for mode in modes:
            name = f"{mode}{'+compile' if compiled else ''}"
            t = timings[name]
            ips = k * preset.batch / t.median
            row = {
                "config": name,
                "mode": mode,
                "compiled": compiled,
                "step_ms": 1e3 * t.median / k,
                "spread": t.spread,
                "images_per_s": ips,
                "ratio": (base.median / t.median) if base else None,
                "cpu_ratio": (base.cpu_median / t.cpu_median) if base else None,
                "target": TARGETS.get(mode),
                "peak_mib": mib(peaks.get(name)),
                "optimizer": facts[name],
                "times": t.times,
                "cpu_times": t.cpu_times,
            }
            if row["target"] is not None and row["ratio"] is not None:
                row["holds"] = row["ratio"] >= row["target"]
            if compiled and f"{mode}" in timings:
                row["compile_speedup"] = timings[mode].median / t.median
            rows.append(row)
    fastest = max(r["images_per_s"] for r in rows)
    if layout is not None and "none" in timings:
        layout["share_of_plain_step"] = layout["contiguous_ms"] / (1e3 * timings["none"].median / k)
    return {
        "preset": args.preset,
        "settings": asdict(preset) | {"modes": modes, "compile": args.compile},
        "machine": machine,
        "loader_images_per_s": loader_ips,
        "loader_over_fastest": loader_ips / fastest,
        "graphs_compiled_while_timing": graphs_during,
        "cuda_syncs_on_unlogged_steps": syncs,
        "cuda_sync_places": sync_places,
        "patch_embed": layout,
        "adamw_step_ms": adamw,
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "loadavg_end": load_average(),
    }


COLUMNS = [
    ("config", "config", ""),
    ("step_ms", "step ms", ".1f"),
    ("spread", "±", ".0%"),
    ("images_per_s", "images/s", ".1f"),
    ("ratio", "× plain", ".2f"),
    ("cpu_ratio", "cpu ×", ".2f"),
    ("target", "target", ""),
    ("holds", "holds", ""),
    ("compile_speedup", "compile ×", ".2f"),
    ("peak_mib", "step peak MiB", ".0f"),
]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    m = result["machine"]
    print(
        f"preset {result['preset']}: {m['device']} ({m.get('gpu', m['processor'])}), torch {m['torch']}, "
        f"{m['torch_threads']} thread(s), load {m.get('loadavg_start')} -> {result['loadavg_end']}, "
        f"{result['seconds']:.0f} s"
    )
    print(format_table(result["rows"], COLUMNS, markdown=True))
    print(
        f"loader alone: {result['loader_images_per_s']:.0f} images/s "
        f"({result['loader_over_fastest']:.1f}x the fastest configuration"
        f"{'' if result['loader_over_fastest'] >= 2 else ': DATA LOADING MAY LIMIT THESE FIGURES'}); "
        f"graphs compiled while timing: {result['graphs_compiled_while_timing']}"
    )
    if result["cuda_syncs_on_unlogged_steps"] is not None:
        print(f"synchronising CUDA calls on unlogged steps: {result['cuda_syncs_on_unlogged_steps']}")
        for name, where in result["cuda_sync_places"].items():
            print("".join(f"  {name}: {w}\n" for w in where), end="")
    pe = result["patch_embed"]
    if pe:
        share = pe.get("share_of_plain_step")
        print(
            f"patch embedding fwd+bwd: {pe['contiguous_ms']:.2f} ms"
            + (f" ({100 * share:.1f}% of a plain step)" if share is not None else "")
            + f"; channels-last: {pe['channels_last_speedup']:.2f}x its speed"
        )
    if result["adamw_step_ms"]:
        print("AdamW step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in result["adamw_step_ms"].items()))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
