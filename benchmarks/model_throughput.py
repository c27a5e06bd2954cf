"""Images/s of a softmax ViT teacher vs its converted students and their floor, forward and training step.

Every zoo member is built from the teacher the way ``attnxfer convert`` builds it
(`attnxfer.models.efficient.build_efficient_student`: the teacher's weights, the zoo attention in every
block). Beside them runs the **floor** (`attnxfer.models.efficient.floor.floor_model`): the same model whose
attention computes its q/k/v and output projections but mixes no tokens (out = proj(v)), the speed no
converted student that computes those projections can pass. Per resolution, all models are built once and timed in ONE process with
interleaved rounds (`attnxfer.train.timing.interleaved_timings`: each round runs every model and mode once, in a rotated
order), so the ratios to the teacher and to the floor share the machine's state. Two modes per model:

* ``forward``: inference, ``eval()``, ``torch.no_grad()``;
* ``train``: one training step, forward + cross-entropy on random labels + backward + AdamW
  (``fused=True`` on CUDA).

On CUDA both run under bf16 autocast (parameters fp32, as in training); SDPA then runs flash attention
and every zoo core its declared precision policy (`attnxfer.models.attention.numerics`). On the CPU
they run in fp32 with one thread by default (the shared machine's rule: docs/benchmarks.md).

Presets (``--preset``; any option overrides the preset's value):

* ``gpu``: ViT-B/16 (``vit_base_patch16_224``, 1000 classes) at 224 / 448 / 896 px (197 / 785 / 3137
  tokens), batch 64 / 16 / 4 (about 12.6k tokens a step at every resolution), 3 warm-up and 10 timed
  rounds; the GPU table, a few minutes on an H100.
* ``cpu``: ViT-Ti/16 (``vit_tiny_patch16_224``: 192 wide, 3 heads, 12 blocks, 100 classes) at 224 / 448
  px, batch 4 / 1, 1 warm-up and 7 timed rounds, 1 thread: about 4 minutes here.
* ``floor_cpu``: ViT-S/16 (``vit_small_patch16_224``) at 512 / 1024 px (1025 / 4097 tokens), batch 1,
  forward only, 1 thread, 1 warm-up and 5 timed rounds, the linear family (relu_linear, elu_linear,
  hedgehog, performer, cosformer, focused_linear, agent, nystrom, linformer): how close each student comes
  to its floor where efficient attention pays (about 4 minutes a process on the shared 2-core machine: 40 s
  at 512 px, 170 s at 1024 px; use ``--processes 3``, see below).
* ``pvt_cpu``: the hierarchical PVTv2-B0 (``pvt_v2_b0``: 4 stages, 3136 / 784 / 196 / 49 tokens at 224 px,
  spatial reduction 8 / 4 / 2 / 1) at 224 / 448 px, batch 2 / 1, 1 warm-up and 5 timed rounds, 1 thread.
  ``--model swin_tiny_patch4_window7_224`` times Swin the same way (zoo attentions inside its windows).

``--processes K`` runs the whole measurement K times, each in a fresh process, and reports every ratio's median
over them with its range: on the shared CPU one process can favour one model over another by a few per cent
for its whole life (the floor of ViT-S/16 at 1024 px took 1.90 s an image in one process and 2.15 s in
another, 11 %, while the teacher moved 2 %), which more rounds inside that process do not average away.

Each row also gives the attention cores' multiplications, additions and energy per image, summed over the
layers (`attnxfer.train.measure.operation_counts`; hierarchical models: each layer at its own tokens and
windows). ``--attentions`` takes comma-separated lists for one attention per stage or layer
(``none,none,hashing,hashing``: LIT's attention-free early stages, EcoFormer's hashing after).

    python benchmarks/model_throughput.py --preset cpu --json runs/model_throughput_cpu.json
    python benchmarks/model_throughput.py --preset gpu --json runs/model_throughput_gpu.json
    python benchmarks/model_throughput.py --preset pvt_cpu --attentions hashing relu_linear none,none,hashing,hashing
    python benchmarks/model_throughput.py --preset floor_cpu --processes 3 --json runs/model_throughput_floor_cpu.json

``--onnx`` times the same teacher and students as the ONNX graphs ``attnxfer export --format onnx`` writes
(`attnxfer.checkpoints.onnx_export.write_onnx`: torch.export, opset 18, each graph checked against its
PyTorch forward, the largest difference reported per row), run by ONNX Runtime's CPU session (inference
only; ``intra_op_num_threads`` = ``--threads``), interleaved in one process like the rest. Its preset
``onnx_cpu``: ViT-S/16 at 224 / 512 / 1024 px (197 / 1025 / 4097 tokens), batch 4 / 1 / 1, 1 warm-up and
5 timed rounds, 1 thread:

    python benchmarks/model_throughput.py --onnx --attentions relu_linear hedgehog performer --json runs/onnx_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import format_table, machine_info, step_peak_growth, write_json

from attnxfer.checkpoints.onnx_export import write_onnx
from attnxfer.errors import InputError
from attnxfer.models.efficient import build_efficient_student, list_attentions
from attnxfer.models.efficient.floor import floor_model
from attnxfer.train.measure import attention_calls, operation_counts
from attnxfer.train.timing import interleaved_timings

TEACHER = "softmax"
FLOOR = "floor"
MODES = ("forward", "train")
#: The zoo attentions whose cost is linear in the tokens (what the floor preset times).
LINEAR_FAMILY = (
    "relu_linear",
    "elu_linear",
    "hedgehog",
    "performer",
    "cosformer",
    "focused_linear",
    "agent",
    "nystrom",
    "linformer",
)


@dataclass(frozen=True)
class Preset:
    model: str
    num_classes: int
    resolutions: tuple[int, ...]
    batches: tuple[int, ...]
    device: str
    warmup: int
    repeats: int
    threads: int | None
    modes: tuple[str, ...] = MODES
    attentions: tuple[str, ...] | None = None  # None: every registered zoo attention


PRESETS = {
    "gpu": Preset("vit_base_patch16_224", 1000, (224, 448, 896), (64, 16, 4), "cuda", 3, 10, None),
    "cpu": Preset("vit_tiny_patch16_224", 100, (224, 448), (4, 1), "cpu", 1, 7, 1),
    "floor_cpu": Preset(
        "vit_small_patch16_224", 1000, (512, 1024), (1, 1), "cpu", 1, 5, 1, ("forward",), LINEAR_FAMILY
    ),
    "pvt_cpu": Preset("pvt_v2_b0", 100, (224, 448), (2, 1), "cpu", 1, 5, 1),
    "onnx_cpu": Preset("vit_small_patch16_224", 1000, (224, 512, 1024), (4, 1, 1), "cpu", 1, 5, 1),
}


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (parameters stay fp32); the CPU runs fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_models(
    preset: Preset, resolution: int, names: list[str], device: torch.device
) -> dict[str, nn.Module]:
    """The teacher at ``resolution`` (random weights: speed does not depend on them), its floor and one student
    per name."""
    torch.manual_seed(0)
    try:
        teacher = timm.create_model(preset.model, img_size=resolution, num_classes=preset.num_classes)
    except TypeError:  # PVTv2 takes any image size and no img_size argument
        teacher = timm.create_model(preset.model, num_classes=preset.num_classes)
    models = {TEACHER: teacher, FLOOR: floor_model(teacher)}
    for name in names:
        try:
            models[name] = build_efficient_student(teacher, name.split(",") if "," in name else name)
        except InputError as e:  # a mistyped --attentions name: its message, not a traceback
            raise SystemExit(f"--attentions {name}: {e}") from None
    return {name: model.to(device) for name, model in models.items()}


def forward_fn(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    def run():
        model.eval()
        with torch.no_grad(), autocast(device):
            model(x)

    return run


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def run():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return run


def measure_resolution(
    preset: Preset, resolution: int, batch: int, names: list[str], args, device
) -> list[dict]:
    models = build_models(preset, resolution, names, device)
    if args.compile:
        # All models share the block and attention forward code objects: each model, mode and resolution is
        # another graph of them, and past dynamo's default limit of 8 the rest would silently run eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        for model in models.values():
            model.compile(dynamic=False)
    in_chans = models[TEACHER].pretrained_cfg.get("input_size", (3,))[0]  # the demo's PVTv2 is grey-scale
    x = torch.randn(batch, in_chans, resolution, resolution, device=device)
    y = torch.randint(0, preset.num_classes, (batch,), device=device)
    fns = {}
    for name, model in models.items():
        if "forward" in preset.modes:
            fns[(name, "forward")] = forward_fn(model, x, device)
        if "train" in preset.modes:
            fns[(name, "train")] = train_fn(model, x, y, device)
    started = time.perf_counter()
    timings = interleaved_timings(fns, device=device, warmup=preset.warmup, repeats=preset.repeats)
    seconds = time.perf_counter() - started
    peaks = {key: step_peak_growth(fn, device) for key, fn in fns.items()} if device.type == "cuda" else {}
    teacher = models[TEACHER]
    tokens = attention_calls(teacher, resolution)[0][0]  # the first attention layer's sequence length
    counts = {
        name: operation_counts(teacher, model, img_size=resolution)["total"] for name, model in models.items()
    }
    rows = []
    for name in models:
        row = {"resolution": resolution, "tokens": tokens, "batch": batch, "model": name}
        total = counts[name]["teacher" if name == TEACHER else "student"]
        if total:
            row.update(mul_m=total["mul"] / 1e6, add_m=total["add"] / 1e6, energy_uj=total["energy_pj"] / 1e6)
        for mode in preset.modes:
            t = timings[(name, mode)]
            teacher, floor = timings[(TEACHER, mode)], timings[(FLOOR, mode)]
            row[f"{mode}_ms"] = 1e3 * t.median
            row[f"{mode}_cpu_ms"] = 1e3 * t.cpu_median
            row[f"{mode}_spread"] = t.spread
            row[f"{mode}_images_per_s"] = batch / t.median
            row[f"{mode}_vs_teacher"] = teacher.median / t.median
            row[f"{mode}_cpu_vs_teacher"] = teacher.cpu_median / t.cpu_median
            row[f"{mode}_vs_floor"] = floor.median / t.median
            row[f"{mode}_cpu_vs_floor"] = floor.cpu_median / t.cpu_median
            row[f"{mode}_peak_mib"] = peaks[(name, mode)] / 2**20 if peaks else None
            row[f"{mode}_times_s"] = t.times
            row[f"{mode}_cpu_times_s"] = t.cpu_times
        rows.append(row)
    print(f"# {resolution} px ({tokens} tokens), batch {batch}: {seconds:.0f} s", file=sys.stderr)
    del models, fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEAD_COLUMNS = [
    ("resolution", "px", ""),
    ("tokens", "N", ""),
    ("batch", "batch", ""),
    ("model", "attention", ""),
]
MODE_COLUMNS = {
    "forward": [
        ("forward_images_per_s", "fwd img/s", ".2f"),
        ("forward_vs_teacher", "fwd × teacher", ".2f"),
        ("forward_vs_floor", "fwd × floor", ".2f"),
        ("forward_cpu_vs_teacher", "fwd × teacher (CPU time)", ".2f"),
        ("forward_cpu_vs_floor", "fwd × floor (CPU time)", ".2f"),
        ("forward_spread", "fwd ±", ".0%"),
    ],
    "train": [
        ("train_images_per_s", "train img/s", ".2f"),
        ("train_vs_teacher", "train × teacher", ".2f"),
        ("train_vs_floor", "train × floor", ".2f"),
        ("train_cpu_vs_teacher", "train × teacher (CPU time)", ".2f"),
        ("train_cpu_vs_floor", "train × floor (CPU time)", ".2f"),
        ("train_spread", "train ±", ".0%"),
    ],
}


def range_columns(mode: str) -> list[tuple[str, str, str]]:
    """A ``--processes`` table's columns for ``mode``: the CPU-time ratios' medians and the floor ratio's range."""
    short = "fwd" if mode == "forward" else mode
    return [
        (f"{mode}_cpu_vs_teacher", f"{short} × teacher (CPU time, median)", ".2f"),
        (f"{mode}_cpu_vs_floor", f"{short} × floor (CPU time, median)", ".2f"),
        (f"{mode}_cpu_vs_floor_min", "min", ".2f"),
        (f"{mode}_cpu_vs_floor_max", "max", ".2f"),
    ]


COUNT_COLUMNS = [
    ("mul_m", "#mul (M)", ".1f"),
    ("add_m", "#add (M)", ".1f"),
    ("energy_uj", "energy (µJ)", ".1f"),
]
PEAK_COLUMNS = {
    "forward": ("forward_peak_mib", "fwd peak MiB", ".0f"),
    "train": ("train_peak_mib", "train peak MiB", ".0f"),
}


def columns(modes: tuple[str, ...], cuda: bool) -> list[tuple[str, str, str]]:
    """The table's columns for the timed modes (peak memory on CUDA only)."""
    cols = HEAD_COLUMNS + [c for mode in modes for c in MODE_COLUMNS[mode]] + COUNT_COLUMNS
    return cols + ([PEAK_COLUMNS[mode] for mode in modes] if cuda else [])


# -- ONNX Runtime (--onnx) ---------------------------------------------------------------------------

ONNX_COLUMNS = [
    ("resolution", "px", ""),
    ("tokens", "N", ""),
    ("batch", "batch", ""),
    ("model", "attention", ""),
    ("onnx_images_per_s", "ORT img/s", ".2f"),
    ("onnx_vs_teacher", "ORT × teacher", ".2f"),
    ("onnx_cpu_vs_teacher", "ORT × (CPU time)", ".2f"),
    ("onnx_spread", "ORT ±", ".0%"),
    ("onnx_max_abs_diff", "max |ORT - torch|", ".1e"),
]


def onnx_session(model: nn.Module, resolution: int, folder: Path, threads: int | None):
    """``model`` exported as `attnxfer export --format onnx` exports it (checked against its PyTorch forward),
    and an ONNX Runtime CPU session on the graph: (session, the export's report)."""
    import onnxruntime as ort  # the onnx extra: only --onnx needs it

    folder.mkdir(parents=True)
    in_chans = model.pretrained_cfg.get("input_size", (3,))[0]
    report = write_onnx(model, folder, input_size=(in_chans, resolution, resolution))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / report.file), options, providers=["CPUExecutionProvider"])
    return session, report


def measure_onnx_resolution(
    preset: Preset, resolution: int, batch: int, names: list[str], args
) -> list[dict]:
    """Images/s of every model's ONNX graph in ONNX Runtime at ``resolution``, interleaved in one process."""
    device = torch.device("cpu")
    models = build_models(preset, resolution, names, device)
    in_chans = models[TEACHER].pretrained_cfg.get("input_size", (3,))[0]
    x = np.random.default_rng(0).standard_normal((batch, in_chans, resolution, resolution), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, fns = {}, {}
        for name, model in models.items():
            session, report = onnx_session(
                model, resolution, Path(tmp) / name.replace(",", "+"), preset.threads
            )
            sessions[name] = report
            fns[name] = functools.partial(session.run, None, {report.input_name: x})
        started = time.perf_counter()
        timings = interleaved_timings(fns, device=device, warmup=preset.warmup, repeats=preset.repeats)
        seconds = time.perf_counter() - started
    tokens = attention_calls(models[TEACHER], resolution)[0][0]
    rows = []
    for name in models:
        t, teacher = timings[name], timings[TEACHER]
        rows.append(
            {
                "resolution": resolution,
                "tokens": tokens,
                "batch": batch,
                "model": name,
                "onnx_ms": 1e3 * t.median,
                "onnx_images_per_s": batch / t.median,
                "onnx_vs_teacher": teacher.median / t.median,
                "onnx_cpu_vs_teacher": teacher.cpu_median / t.cpu_median,
                "onnx_spread": t.spread,
                "onnx_times_s": t.times,
                "onnx_max_abs_diff": sessions[name].max_abs_diff,
                "onnx_report": sessions[name].to_dict(),
            }
        )
    print(
        f"# ONNX Runtime {resolution} px ({tokens} tokens), batch {batch}: {seconds:.0f} s", file=sys.stderr
    )
    del models, fns
    gc.collect()
    return rows


def _ratio_keys(rows: list[dict]) -> list[str]:
    """The per-row ratios (``*_vs_teacher``, ``*_vs_floor``) whose medians a multi-process run reports."""
    return sorted({key for row in rows for key in row if key.endswith(("_vs_teacher", "_vs_floor"))})


def across_processes(runs: list[list[dict]]) -> list[dict]:
    """One row per (resolution, model) from K runs' rows: each ratio's median over the runs, its ``_min`` /
    ``_max`` and ``_runs`` (the K values in run order); other fields (sizes, counts) from the first run."""
    merged = []
    for i, first in enumerate(runs[0]):
        same = [rows[i] for rows in runs]
        if any((r["resolution"], r["model"]) != (first["resolution"], first["model"]) for r in same):
            raise RuntimeError("the processes measured different rows; cannot combine them")
        row = {k: v for k, v in first.items() if not k.endswith(("_times_s", "_spread"))}
        for key in _ratio_keys(same):
            values = [r[key] for r in same]
            row.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
            row[f"{key}_runs"] = values
        merged.append(row)
    return merged


def run_processes(argv: list[str], count: int) -> tuple[list[dict], list[dict]]:
    """This benchmark with ``argv`` run ``count`` times, one fresh process after the other (never two at once:
    they would share the cores): (the merged rows, each process's JSON)."""
    payloads = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            out = Path(tmp) / f"process_{i}.json"
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--json", str(out)]
            print(f"# process {i + 1} of {count}", file=sys.stderr)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            payloads.append(json.loads(out.read_text()))
    return across_processes([p["rows"] for p in payloads]), payloads


def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--processes`` and ``--json`` (with their values): what each process is given."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--processes", "--json"):
            skip = "=" not in item
            continue
        out.append(item)
    return out


def resolve(args) -> Preset:
    preset = PRESETS[args.preset or ("onnx_cpu" if args.onnx else "cpu")]
    overrides = {
        "model": args.model,
        "device": args.device,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "resolutions": tuple(args.resolutions) if args.resolutions else None,
        "batches": tuple(args.batch) if args.batch else None,
        "modes": tuple(args.modes) if args.modes else None,
    }
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if len(preset.batches) != len(preset.resolutions):
        raise SystemExit(
            f"--batch needs one value per resolution: {len(preset.resolutions)} resolutions "
            f"{preset.resolutions}, {len(preset.batches)} batch sizes {preset.batches}"
        )
    return preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: cpu (onnx_cpu with --onnx)"
    )
    parser.add_argument(
        "--model", default=None, help="timm model name of the teacher (default: the preset's)"
    )
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="image sizes in px")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="one batch size per resolution")
    parser.add_argument(
        "--attentions", nargs="+", default=None, help="students to build (default: every zoo attention)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=None, help="what to time (default: the preset's)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (Module.compile)")
    parser.add_argument("--json", type=Path, default=None, help="write rows, settings and machine facts here")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the measurement this many times in fresh processes, one after the other, and report each "
        "ratio's median and range over them",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="time the models' ONNX graphs (attnxfer export --format onnx) in ONNX Runtime on the CPU instead",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")

    preset = resolve(args)
    if args.processes > 1:
        if args.onnx:
            parser.error("--processes times PyTorch models; run --onnx in one process")
        return main_processes(args, preset, sys.argv[1:] if argv is None else argv)
    device = torch.device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if args.device:  # the preset's device only where --device is not given
            raise SystemExit(
                f"--device {args.device} needs a CUDA GPU and this machine has none: use --device cpu"
            )
        raise SystemExit("--preset gpu needs CUDA; on this machine use --preset cpu (or --device cpu)")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    names = [n for n in (args.attentions or preset.attentions or list_attentions()) if n != TEACHER]
    info = machine_info(device)
    rows = []
    started = time.perf_counter()
    for resolution, batch in zip(preset.resolutions, preset.batches):
        if args.onnx:
            rows += measure_onnx_resolution(preset, resolution, batch, names, args)
        else:
            rows += measure_resolution(preset, resolution, batch, names, args, device)
    total = time.perf_counter() - started
    print(
        format_table(
            rows, ONNX_COLUMNS if args.onnx else columns(preset.modes, device.type == "cuda"), markdown=True
        )
    )
    precision = "ONNX Runtime fp32" if args.onnx else "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"\n{preset.model}, {precision}, {info['torch_threads']} threads, {total:.0f} s", file=sys.stderr)
    if args.json:
        write_results(args, preset, info, total, rows)
    return 0


def write_results(args, preset: Preset, machine: dict, seconds: float, rows: list[dict], **extra) -> None:
    """The run's JSON at ``--json``: preset, settings, machine facts, seconds, rows (and ``extra`` fields)."""
    payload = {
        "preset": asdict(preset),
        "settings": vars(args) | {"json": str(args.json)},
        "machine": machine,
        "seconds": seconds,
        "rows": rows,
    }
    write_json(str(args.json), payload | extra)


def main_processes(args, preset: Preset, argv: list[str]) -> int:
    """``--processes K``: the measurement in K fresh processes, each ratio's median and range over them."""
    started = time.perf_counter()
    rows, payloads = run_processes(_child_argv(argv), args.processes)
    total = time.perf_counter() - started
    cols = HEAD_COLUMNS + [c for mode in preset.modes for c in range_columns(mode)]
    print(format_table(rows, cols, markdown=True))
    print(f"\n{preset.model}, {args.processes} processes, {total:.0f} s", file=sys.stderr)
    if args.json:
        write_results(args, preset, payloads[0]["machine"], total, rows, processes=payloads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
