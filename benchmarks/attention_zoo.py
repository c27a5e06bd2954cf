"""Forward time, peak memory and FLOPs of every zoo attention relative to softmax SDPA.

ViT-S shaped layers (dim 384, 6 heads) at N = 1 + 14^2, 1 + 28^2, 1 + 56^2 tokens. For each N,
all attentions are built once and timed in ONE process with interleaved repeats (round r runs
every attention once), so the ratios to softmax share the machine's state; the median is
reported, both as wall-clock time and as this process's CPU time (``time.process_time``, all
threads): on a shared machine other tenants inflate wall time, CPU time measures the work.
Two calls per attention:

* module: the whole attention layer (qkv projection, core, output projection): what a ViT pays;
* core:   ``attend(q, k, v)`` alone, the part that differs between families.

Peak memory (CPU): the largest total of live torch CPU-allocator bytes during one call, above
what was live before it, read from the profiler's raw allocation/free events
(``profile_memory=True``). It counts every tensor the call allocates, kernel workspaces
included, and nothing else (no Python objects, no allocator caching). On CUDA it is
``torch.cuda.max_memory_allocated`` above the memory allocated before the call.

Operations: #mul / #add of the core per forward (``operation_counts``, counted from each attention's
algorithm, as EcoFormer reports energy; a product with ±1 codes is additions only), in millions, beside
its time; "—" for an attention that does not count them.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, SDPA, convolutions; element-wise
work such as exp, softmax and normalisation is not counted), forward calls only.

'softmax' is the registered attention (SDPA: flash/fused kernel, O(N) memory);
'softmax_unfused' is the explicit softmax(q k^T) v path (timm with fused_attn off), shown for
reference: it is what an O(N^2)-memory softmax costs.

Precision: ``--dtype bfloat16`` casts every layer to bf16. SDPA then runs flash attention in bf16; each zoo
core runs its declared `PrecisionPolicy` (bf16 operands with fp32 sums where declared safe, fp32
otherwise) on CUDA, and in fp32 on the CPU unless ``--cpu-bf16`` enables the bf16 path there too.

Compilation: ``--compile`` adds, beside every attention, ``NAME+compiled``: the same module through
``torch.compile`` (inductor, static shapes), timed in the same interleaved rounds (compilation happens in
the warm-up round and is not timed; its wall time is reported per attention). FLOPs are not counted
for compiled calls (the counter does not see into compiled graphs).

    python benchmarks/attention_zoo.py --json runs/attention_zoo.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import bench_device, step_peak_growth

from attnxfer.models.attention import TransferAttention
from attnxfer.models.attention.numerics import bf16_devices
from attnxfer.models.efficient import create_attention, get_attention_class, list_attentions
from attnxfer.train.timing import interleaved_timings

LINEAR_FAMILY = ("relu_linear", "elu_linear", "performer", "hedgehog", "cosformer", "focused_linear")
REFERENCE = "softmax"
COMPILED = "+compiled"


class UnfusedSoftmaxAttention(TransferAttention):
    """softmax(q k^T s) v with the map materialised (reference only, not registered)."""

    def attend(self, q, k, v, *, attn_mask=None, is_causal=False):
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


@dataclass
class Row:
    attention: str
    tokens: int
    batch: int
    measures: dict[str, dict[str, float]]  # call -> {wall_ms, cpu_ms, peak_mib, gflops}
    ratios: dict[str, dict[str, float]] = None  # call -> same keys, relative to softmax
    operations: dict[str, float] | None = None  # the core's operation_counts (mul, add, other, energy_pj)
    compile_s: float | None = None  # compiled rows: wall time of the warm-up round (compilation included)


def parse_entry(entry: str) -> tuple[str, dict[str, object]]:
    """'performer' or a variant 'performer:num_features=128,feature_seed=0' -> (name, options).
    A formula ('formula:sum(relu.cos)') is a whole attention name."""
    if entry.startswith("formula:"):
        return entry, {}
    name, _, spec = entry.partition(":")
    options = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad attention variant {entry!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
        options[key] = yaml.safe_load(value)
    return name, options


def build(entry: str, dim: int, heads: int, grid: int, device: torch.device) -> nn.Module:
    layout = dict(num_prefix_tokens=1, grid_size=(grid, grid))
    name, options = parse_entry(entry)
    if name == "softmax_unfused":
        module = UnfusedSoftmaxAttention(dim, num_heads=heads, qkv_bias=True, **layout)
    else:
        extra = {"seq_len": 1 + grid * grid} if name == "linformer" else {}
        module = create_attention(name, dim=dim, num_heads=heads, qkv_bias=True, **layout, **extra, **options)
    return module.to(device).eval()


def with_grad(fn: Callable[[], object], enabled: bool) -> Callable[[], object]:
    """``fn`` called with autograd on (a training step) or off (a forward)."""

    def call():
        with torch.set_grad_enabled(enabled):
            return fn()

    return call


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak live allocator bytes during fn() above those live before it (see module docstring)."""
    return step_peak_growth(fn, device)


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel (torch 2.14):
    count it with the same formula (2 matmuls of N x N x d per head)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


def flops(fn: Callable[[], object]) -> float:
    """The call's FLOPs, or nan where torch cannot count them: torch 2.11's counter fails on
    ``bmm(..., out_dtype=float32)`` (the bf16 zoo's fp32 sums on CUDA; 2.14 counts it)."""
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    except TypeError:
        return math.nan
    return counter.get_total_flops()


def compiled_calls(module: nn.Module, x, q, k, v, train: bool) -> dict[str, Callable[[], object]]:
    """The module, its core and (with ``train``) its training step through ``torch.compile`` (inductor)."""
    layer = torch.compile(module, dynamic=False)
    core = torch.compile(lambda q, k, v: module.attend(q, k, v), dynamic=False)
    calls = {"module": lambda: layer(x), "core": lambda: core(q, k, v)}
    if train:
        calls["train"] = train_step(layer, x)
    return calls


def train_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        module.zero_grad(set_to_none=True)
        module(x).float().square().mean().backward()

    return step


def measure(names: list[str], tokens: int, batch: int, args, device: torch.device) -> list[Row]:
    grid = math.isqrt(tokens - 1)
    assert 1 + grid * grid == tokens, f"{tokens} is not 1 + a square grid"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    modules = {n: build(n, args.dim, args.heads, grid, device).to(dtype) for n in names}
    x = torch.randn(batch, tokens, args.dim, device=device, dtype=dtype)
    with torch.no_grad():
        q, k, v = (modules[REFERENCE].project(x)[c] for c in "qkv")
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    for n, m in modules.items():
        calls[n] = {"module": lambda m=m: m(x), "core": lambda m=m: m.attend(q, k, v)}
        if args.train:
            calls[n]["train"] = train_step(m, x)
        if args.compile:
            calls[n + COMPILED] = compiled_calls(m, x, q, k, v, args.train)
    fns = {
        (n, kind): with_grad(fn, kind == "train") for n, kinds in calls.items() for kind, fn in kinds.items()
    }
    # the first warm-up round on its own: the compiled calls compile in it, and its wall time is reported
    first = interleaved_timings(fns, device=device, warmup=0, repeats=1) if args.warmup else {}
    times = interleaved_timings(fns, device=device, warmup=max(0, args.warmup - 1), repeats=args.repeats)
    first_round = {n: sum(first[n, kind].times[0] for kind in calls[n]) if first else 0.0 for n in calls}
    rows = []
    for n in calls:
        compiled = n.endswith(COMPILED)
        measures = {}
        for kind, fn in calls[n].items():
            with torch.set_grad_enabled(kind == "train"):
                measures[kind] = dict(
                    wall_ms=1e3 * times[n, kind].median,
                    cpu_ms=1e3 * times[n, kind].cpu_median,
                    peak_mib=peak_bytes(fn, device) / 2**20,
                    gflops=math.nan if compiled else flops(fn) / 1e9,
                )
        counts = modules[n.removesuffix(COMPILED)].operation_counts(tokens, batch)
        rows.append(
            Row(
                attention=n,
                tokens=tokens,
                batch=batch,
                measures=measures,
                operations=counts.to_dict() if counts is not None else None,
                compile_s=first_round[n] if compiled else None,
            )
        )
    ref = next(r for r in rows if r.attention == REFERENCE)
    for r in rows:
        r.ratios = {
            kind: {
                key: value / ref.measures[kind][key] if ref.measures[kind][key] else math.nan
                for key, value in m.items()
            }
            for kind, m in r.measures.items()
        }
    return rows


def table(rows: list[Row]) -> str:
    """Markdown: each cell 'value (ratio to softmax SDPA)'."""
    kinds = list(rows[0].measures)
    columns = [("wall_ms", "wall ms"), ("cpu_ms", "CPU ms"), ("peak_mib", "peak MiB")]
    head = ["N", "batch", "attention"] + [f"{kind} {label}" for kind in kinds for _, label in columns]
    head += [f"{kind} GFLOP" for kind in kinds if kind != "train"]
    head += ["core M mul", "core M add"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.tokens), str(r.batch), r.attention]
        for kind in kinds:
            for key, _ in columns:
                value, ratio = r.measures[kind][key], r.ratios[kind][key]
                cells.append(f"{value:.1f} ({ratio:.2f}×)")
        cells += [f"{r.measures[kind]['gflops']:.2f}" for kind in kinds if kind != "train"]
        ops = r.operations
        cells += [f"{ops[key] / 1e6:.1f}" if ops else "—" for key in ("mul", "add")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_table(rows: list[Row]) -> str:
    """Markdown: compiled / eager speed-up per attention and call (> 1: compiled is faster), and the
    compiled calls' speed-up over eager SDPA softmax."""
    eager = {(r.tokens, r.attention): r for r in rows}
    kinds = list(rows[0].measures)
    head = ["N", "attention"] + [f"{kind} compiled / eager" for kind in kinds]
    head += [f"{kind} compiled vs SDPA" for kind in kinds] + ["compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.attention.endswith(COMPILED):
            continue
        base = eager[(r.tokens, r.attention.removesuffix(COMPILED))]
        speedup = [base.measures[k]["wall_ms"] / r.measures[k]["wall_ms"] for k in kinds]
        vs_sdpa = [1 / r.ratios[k]["wall_ms"] for k in kinds]
        cells = [str(r.tokens), base.attention] + [f"{v:.2f}×" for v in speedup + vs_sdpa]
        lines.append("| " + " | ".join(cells + [f"{r.compile_s:.0f}"]) + " |")
    return "\n".join(lines)


def linear_family_verdict(rows: list[Row], tokens: int) -> str:
    """The linear family's target at the largest N: module forward >= 3x faster and <= 1/4 of softmax SDPA's peak memory."""
    lines = []
    for r in rows:
        if r.tokens != tokens or parse_entry(r.attention)[0] not in LINEAR_FAMILY:
            continue
        module, core = r.ratios["module"], r.ratios["core"]
        fast = 1 / module["wall_ms"] >= 3 and 1 / module["cpu_ms"] >= 3
        ok = fast and module["peak_mib"] <= 0.25
        lines.append(
            f"{r.attention}: module {1 / module['wall_ms']:.2f}x faster (wall), {1 / module['cpu_ms']:.2f}x (CPU), "
            f"{module['peak_mib']:.2f}x peak memory; core {1 / core['wall_ms']:.2f}x faster (wall), "
            f"{core['peak_mib']:.2f}x peak memory -> target {'met' if ok else 'NOT met'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 785, 3137], help="1 + grid^2 each")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch per --tokens entry (default 16, 4, 1: about equal qkv work per N)",
    )
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument(
        "--attentions",
        nargs="+",
        default=None,
        help="default: every registered attention; NAME:KEY=VALUE[,...] adds a variant with options, "
        "e.g. performer:num_features=128",
    )
    parser.add_argument("--no-unfused", action="store_true", help="leave out the unfused softmax reference")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--train", action="store_true", help="also time forward+backward (conversion stage 1)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time every attention through torch.compile (NAME+compiled)",
    )
    parser.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="with --dtype bfloat16 on the CPU, run the zoo's bf16 path (as on CUDA) instead of its fp32 cores",
    )
    parser.add_argument("--json", type=Path, default=None, help="write rows and settings here")
    args = parser.parse_args(argv)

    device = bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [REFERENCE] + ([] if args.no_unfused else ["softmax_unfused"])
    # `none` returns zeros without computing anything: nothing to time, and no gradient to step on
    names += [n for n in (args.attentions or [a for a in list_attentions() if a != "none"]) if n not in names]
    for entry in names[1:]:
        if (name := parse_entry(entry)[0]) != "softmax_unfused":
            try:
                get_attention_class(name)
            except KeyError as e:  # a mistyped name: the registry's message, not a traceback from measure()
                parser.error(f"--attentions: {e.args[0]}")
    if odd := [n for n in args.tokens if n < 2 or 1 + math.isqrt(n - 1) ** 2 != n]:
        parser.error(f"--tokens {odd[0]}: a class token + a square grid, e.g. 197, 785 or 3137")
    batches = args.batch or [{197: 16, 785: 4}.get(n, 1) for n in args.tokens]
    if len(batches) != len(args.tokens):
        parser.error("--batch needs one entry per --tokens entry")

    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1 (the first round compiles)")
    if args.compile:
        # Every attention's forward is one code object (TransferableAttention.forward): each class, grad mode
        # and shape is another graph of it, and past dynamo's default limit of 8 it silently runs eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)

    rows: list[Row] = []
    devices = ("cuda", "cpu") if args.cpu_bf16 else ("cuda",)
    with bf16_devices(*devices):
        for tokens, batch in zip(args.tokens, batches):
            started = time.perf_counter()
            rows += measure(names, tokens, batch, args, device)
            print(f"# N={tokens} measured in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    print(table(rows))
    print()
    if args.compile:
        print(compile_table(rows))
        print()
    print(linear_family_verdict(rows, max(args.tokens)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        meta = dict(
            settings=settings,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            machine=platform.machine(),
            processor=platform.processor(),
            device=str(device),
        )
        args.json.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
