"""Train-step time and peak memory of attention transfer, as ratios to the plain student.

For each token count N (N - 1 must be a square: 16-px patches on a square image,
plus the class token; 65, 197, 785 are 128, 224 and 448 px), one run times a
full training step (forward, backward, AdamW step) of four configurations
built from the same student initialisation:

  none         the plain student (TeacherStudent mode=none): the baseline of every ratio
  copy         attention copy: the teacher's forward plus SDPA(q_t, k_t, v_s) in every block
  distill      attention distillation, the O(N) loss (TeacherStudent mode=distill)
  distill_ref  the same step with each layer's loss built from materialised N×N maps
               (attnxfer.transfer.losses.attention_ce_reference on the captured q/k)

With ``--ce-paths auto,rows,sdpa,attention_lse,triton,materialised`` each named CE evaluation
(transfer.ce_path) also runs as ``distill:PATH`` in the same interleaved rounds; ``distill`` itself is the
device's default (attnxfer.transfer.losses.ce_path_for). ``distill:auto`` first calibrates as a training
run does (attnxfer.transfer.ce_select) and then trains on the path it chose: the table's ``path`` column
says which, and two targets check it (within 5 % of the fastest single path; calibration under 2 % of a
1,000-step run).

Times are medians of interleaved rounds after warm-up (every round runs each
configuration once, order rotated), so all four share the machine's background
load. Memory: see benchmarks/_measure.py and docs/benchmarks.md for exactly what
is counted (tensor bytes at the step's peak; on CPU also a fresh-process RSS
cross-check).

    python benchmarks/transfer_step.py                      # the table in docs/benchmarks.md
    python benchmarks/transfer_step.py --quick              # smoke run, seconds
    python benchmarks/transfer_step.py --pair small-tiny --json out.json
    python benchmarks/transfer_step.py --device cuda --pair small --tokens 197,785,3137 --batch 64,16,4 \
        --ce-paths auto,rows,sdpa,attention_lse,triton,materialised  # the GPU table, every CE path
    python benchmarks/transfer_step.py --arch eva02 --tokens 197,785   # an EVA-02-shaped pair (rope)
    python benchmarks/transfer_step.py --arch beit --tokens 197,785    # BEiT (relative-position bias)

``--arch`` picks the family of both models (timm's own module classes, made transfer-aware by their
adapters): ``vit`` (default), ``eva02`` (EVA-02: rope, SwiGLU, scale norm), ``beit`` (per-layer
relative-position tables: distillation takes the chunked biased CE).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
# Measure this checkout's attnxfer, installed or not.
sys.path[:0] = [p for p in (os.path.dirname(_HERE), _HERE) if p not in sys.path]

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _measure import (  # noqa: E402
    FIXED_MMAP_THRESHOLD,
    bench_device,
    format_table,
    isolated_rss_growth,
    load_average,
    machine_info,
    mib,
    refuse_triton_off_cuda,
    static_bytes,
    step_peak_growth,
    write_json,
)

from attnxfer.models import create_vit  # noqa: E402
from attnxfer.models.attention.bias_rows import full_bias  # noqa: E402
from attnxfer.train import student_param_groups  # noqa: E402
from attnxfer.train.devices import Precision, teacher_dtype as resolve_teacher_dtype  # noqa: E402
from attnxfer.train.optim import build_adamw  # noqa: E402
from attnxfer.train.timing import interleaved_timings  # noqa: E402
from attnxfer.transfer import ComparisonLoss, Loss, Signal, TeacherStudent, build_plan, comparison_loss  # noqa: E402
from attnxfer.transfer.ce_select import choose_ce_path  # noqa: E402
from attnxfer.transfer.losses import CE_PATHS, attention_ce_reference, ce_path_for  # noqa: E402

MODES = ("none", "copy", "distill", "distill_ref")  # the base modes; --ce-paths adds distill:PATH
PATCH = 16
NUM_CLASSES = 100
TOKENS_PER_STEP = 1570  # default batch: about this many tokens a step at every N

# The CPU targets: copy step and copy memory against the plain student at
# every N; the fast distillation path against the materialised one at N = 785.
COPY_TIME_MAX = 1.5
COPY_MEMORY_MAX = 1.3
DISTILL_MEMORY_GAIN_MIN = 3.0
DISTILL_TARGET_TOKENS = 785
# Targets for the distillation step (time over the plain step, by token count; memory).
CPU_DISTILL_TIME_MAX = {197: 1.45}
GPU_DISTILL_TIME_MAX = {197: 1.5, 785: 2.0, 3137: 3.0}
GPU_DISTILL_MEMORY_MAX = 1.7
# Targets for transfer.ce_path=auto: its step within 5 % of the fastest single path's, and its
# calibration under 2 % of a 1,000-step run.
AUTO_TIME_MAX = 1.05
AUTO_CALIBRATION_MAX = 0.02
AUTO_RUN_STEPS = 1000
CE_CHOICES = ("auto", *CE_PATHS)


def ce_path_of(mode: str) -> str | None:
    """``distill:sdpa`` -> ``sdpa``; None for the base modes (``distill`` takes the device's default)."""
    return mode.split(":", 1)[1] if mode.startswith("distill:") else None


def is_distill(mode: str) -> bool:
    return mode == "distill" or mode.startswith("distill:")


@dataclass(frozen=True)
class ViTShape:
    embed_dim: int
    num_heads: int
    depth: int = 12

    def describe(self) -> str:
        head_dim = self.embed_dim // self.num_heads
        return f"{self.embed_dim} wide, {self.num_heads} heads (dim {head_dim}), {self.depth} blocks"


# teacher, student. Copy needs equal head counts, so every pair has them.
PAIRS: dict[str, tuple] = {
    # Same architecture on both sides (the paper's setting), ViT-Ti sized: the default.
    "tiny": (ViTShape(192, 3), ViTShape(192, 3)),
    # Same architecture, ViT-S sized (4x the work of "tiny").
    "small": (ViTShape(384, 6), ViTShape(384, 6)),
    # ViT-S teacher, ViT-Ti-wide student with ViT-S's 6 heads (head dims 64 vs 32).
    "small-tiny": (ViTShape(384, 6), ViTShape(192, 6)),
}


@comparison_loss("materialised_ce")
class MaterialisedCE(ComparisonLoss):
    """A layer's attention CE built from both N×N maps: the reference ("slow") path of ``distill_ref``."""

    signals = (Signal.MAPS,)

    def compare_layer(self, comparison, pair, step) -> Loss:
        res = _materialised_ce(pair.teacher, pair.student)
        layer = pair.student_layer
        return Loss(res.total, {f"attn_ce/{layer}": res.total}, {f"attn_kl/{layer}": res.logs["kl"]})


#: --arch -> the timm architecture both models are built from (shapes from the pair)
ARCHS = {"vit": "vit_tiny_patch16_224", "eva02": "eva02_tiny_patch14_224", "beit": "beit_base_patch16_224"}


def _materialised_ce(teacher_sig: dict[str, torch.Tensor], student_sig: dict[str, torch.Tensor]):
    """The CE from both N×N maps, with the layers' logit biases when they have them (BEiT)."""
    if "bias" not in teacher_sig and "bias" not in student_sig:
        return attention_ce_reference(teacher_sig["q"], teacher_sig["k"], student_sig["q"], student_sig["k"])

    def log_map(sig):
        q, k = sig["q"].float(), sig["k"].float()
        z = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return torch.log_softmax(z + full_bias(sig["bias"]).float() if "bias" in sig else z, dim=-1)

    with torch.autocast(student_sig["q"].device.type, enabled=False):
        log_t = log_map(
            {k: v.detach() if k != "bias" else full_bias(v).detach() for k, v in teacher_sig.items()}
        )
        ce = -(log_t.exp() * log_map(student_sig)).sum(-1).mean()
        kl = ce.detach() + (log_t.exp() * log_t).sum(-1).mean()
    return Loss(ce, {}, {"kl": kl})


def image_geometry(tokens: int, patch: int = PATCH) -> tuple:
    """(img_size, patch_size) whose square patch grid plus one class token gives ``tokens``."""
    side = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or side * side != tokens - 1:
        raise SystemExit(
            f"--tokens: {tokens} is not a square patch grid plus a class token "
            "(use 1 + g*g, e.g. 65, 197, 785)"
        )
    return side * patch, patch


def build_vit(shape: ViTShape, tokens: int, seed: int, arch: str = "vit") -> nn.Module:
    img, patch = image_geometry(tokens)
    torch.manual_seed(seed)
    build = create_vit if arch == "vit" else partial(timm.create_model, pretrained=False)
    return build(
        ARCHS[arch],
        img_size=img,
        patch_size=patch,
        embed_dim=shape.embed_dim,
        num_heads=shape.num_heads,
        depth=shape.depth,
        num_classes=NUM_CLASSES,
    )


class TrainStep:
    """One configuration (mode, models, optimiser, a fixed batch); calling it runs one training step."""

    def __init__(
        self,
        mode: str,
        teacher: nn.Module | None,
        student_shape: ViTShape,
        tokens: int,
        batch: int,
        device: torch.device,
        teacher_dtype: torch.dtype | None = None,
        arch: str = "vit",
    ):
        base, checkpointed = mode.removesuffix("+ckpt"), mode.endswith("+ckpt")
        if base not in MODES and ce_path_of(base) not in CE_CHOICES:
            raise ValueError(
                f"unknown benchmark mode {mode!r}; choose from {MODES} or distill:<{CE_CHOICES}>"
            )
        self.mode, mode = mode, base
        path = ce_path_of(mode)
        student = build_vit(student_shape, tokens, seed=0, arch=arch)
        student.set_grad_checkpointing(checkpointed)
        if mode == "none":
            teacher = None
        transfer = "distill" if is_distill(mode) else mode
        # distill_ref: each layer's map compared by the materialised CE (MaterialisedCE), nothing borrowed
        reference = [{"name": "materialised_ce"}] if mode == "distill_ref" else []
        plan = build_plan(teacher, student, "none" if reference else transfer, losses=reference)
        self.model = TeacherStudent(
            teacher,
            student,
            plan,
            ce_path=None if path == "auto" else path,
            teacher_dtype=teacher_dtype,
        ).to(device)
        self.calibration_s = None
        if path == "auto":  # as a training run with transfer.ce_path=auto: measure, then use the choice
            choice = choose_ce_path(
                self.model,
                batch,
                device,
                student_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            )
            print(f"  N={tokens}: {choice.describe()}", flush=True)
            self.model.ce_path, self.calibration_s = choice.path, choice.seconds
        self.ce_path = (
            ("" if not is_distill(mode) else str(self.model.ce_path or ce_path_for(device)))
            if mode != "distill_ref"
            else "reference"
        )
        self.model.train()
        self.model.log_kl = False  # as on training steps that are not logged (the engine logs every 20th)
        self.teacher = teacher
        # the engine's optimiser (fused AdamW on CPU and CUDA): the baseline is the step users run
        self.optimizer = build_adamw(
            student_param_groups(self.model, weight_decay=0.05), lr=1e-4, device=device
        )
        img, _ = image_geometry(tokens)
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(batch, 3, img, img, generator=g).to(device)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
        self.device = device

    def _autocast(self):
        # GPU: bf16 autocast for the student (the teacher runs in bf16, TeacherStudent's default there). CPU: fp32.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self) -> None:
        with self.model.kept_for_backward():  # what a checkpointing student's recomputed blocks borrow again
            with self._autocast():
                out = self.model(self.x)
                loss = F.cross_entropy(out.logits.float(), self.y)
                if out.loss is not None:
                    loss = loss + out.loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def static_bytes(self) -> int:
        """Weights (student and teacher), optimiser state and the batch: what lives between steps."""
        return static_bytes(self.model, self.teacher, self.optimizer, self.x, self.y)


def _isolated_config(
    pair: str,
    mode: str,
    tokens: int,
    batch: int,
    steps: int,
    depth: int | None,
    threads: int,
    teacher_dtype_name: str = "auto",
    arch: str = "vit",
) -> None:
    """Body of the fresh-process RSS cross-check: build one configuration on CPU and run ``steps`` steps."""
    torch.set_num_threads(threads)
    t_shape, s_shape = _shapes(pair, depth)
    teacher = build_vit(t_shape, tokens, seed=1, arch=arch) if mode != "none" else None
    step = TrainStep(
        mode,
        teacher,
        s_shape,
        tokens,
        batch,
        torch.device("cpu"),
        resolve_teacher_dtype(teacher_dtype_name),
        arch,
    )
    for _ in range(steps):
        step()


def _shapes(pair: str, depth: int | None) -> tuple:
    t, s = PAIRS[pair]
    if depth is not None:
        t, s = ViTShape(t.embed_dim, t.num_heads, depth), ViTShape(s.embed_dim, s.num_heads, depth)
    return t, s


def _per_token(values: Sequence[int], tokens: Sequence[int], what: str) -> dict[int, int]:
    if len(values) == 1:
        return {n: values[0] for n in tokens}
    if len(values) != len(tokens):
        raise SystemExit(f"{what}: give one value or one per token count ({len(tokens)})")
    return dict(zip(tokens, values))


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tokens",
        type=_int_list,
        default=[65, 197, 785],
        help="token counts (1 + g*g; 16-px patches): default 65,197,785",
    )
    p.add_argument(
        "--batch",
        type=_int_list,
        default=None,
        help="batch size, one for all token counts or one per token count (default: about "
        f"{TOKENS_PER_STEP} tokens a step, i.e. 24,8,2 at 65,197,785; quick 2)",
    )
    p.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="tiny",
        help="teacher/student shapes: "
        + "; ".join(f"{k}: teacher {t.describe()} / student {s.describe()}" for k, (t, s) in PAIRS.items()),
    )
    p.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        default="vit",
        help="model family of teacher and student: " + ", ".join(f"{k} ({v})" for k, v in ARCHS.items()),
    )
    p.add_argument("--depth", type=int, default=None, help="override both depths (default 12; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before timing (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    p.add_argument(
        "--rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU: also measure each configuration's RSS growth in a fresh process (default on; quick off)",
    )
    p.add_argument(
        "--rss-fixed-mmap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the RSS processes with glibc's mmap threshold fixed at 64 KiB, so freed large "
        "blocks leave the resident set (default on; off shows glibc's default caching)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: on a shared, oversubscribed machine a multi-threaded "
        "step's wall time is dominated by waiting for descheduled threads)",
    )
    p.add_argument(
        "--ce-paths",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=[],
        help=f"also time distillation with each of these CE evaluations ({','.join(CE_CHOICES)}) as "
        "distill:PATH (default: only the device's default path, as 'distill'); auto calibrates first, as "
        "transfer.ce_path=auto does, and the table says what it chose",
    )
    p.add_argument(
        "--teacher-dtype",
        choices=[p.value for p in Precision],
        default="auto",
        help="the teacher's dtype (teacher.dtype): auto = bf16 on CUDA, fp32 elsewhere; bf16 on a "
        "CPU with bf16 matrix units (AMX) shows what teacher.dtype=bf16 buys there",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--json", metavar="PATH", default=None, help="also write the table and machine facts as JSON"
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="also copy+ckpt and distill+ckpt: the student's blocks recompute their activations in the backward",
    )
    p.add_argument("--quick", action="store_true", help="smoke mode: depth 2, batch 2, 2 rounds, no RSS")
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(depth=2 if q else None, warmup=1, repeats=2 if q else 5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch is None:
        args.batch = (
            [2] * len(args.tokens) if q else [max(1, round(TOKENS_PER_STEP / n)) for n in args.tokens]
        )
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    unknown = [c for c in args.ce_paths if c not in CE_CHOICES]
    if unknown:
        raise SystemExit(f"--ce-paths: unknown {', '.join(unknown)}; choose from {', '.join(CE_CHOICES)}")
    args.modes = (*MODES, *(f"distill:{c}" for c in args.ce_paths))
    args.modes += ("copy+ckpt", "distill+ckpt") if args.grad_checkpointing else ()
    args.device = bench_device(args.device)
    refuse_triton_off_cuda(args.ce_paths, args.device)
    if args.rss is None:
        args.rss = args.device.type == "cpu" and not q
    if args.rss and args.device.type != "cpu":
        raise SystemExit("--rss measures CPU processes; drop it on cuda (max_memory_allocated is used there)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    t_shape, s_shape = _shapes(args.pair, args.depth)
    batches = _per_token(args.batch, args.tokens, "--batch")
    info = machine_info(args.device)
    memory_kind = (
        "torch.cuda.max_memory_allocated"
        if args.device.type == "cuda"
        else "tensor bytes via torch.profiler allocator events"
    )
    print(
        f"transfer_step: {args.arch}; teacher {t_shape.describe()}; student {s_shape.describe()}; "
        f"device {args.device}; torch {info['torch']}, {info['torch_threads']} threads, "
        f"{info['cpu_count']} CPUs, load {info.get('loadavg_start')}",
        flush=True,
    )
    print(
        f"peak memory = static (weights, teacher, AdamW state, batch) + step peak ({memory_kind})"
        + ("; RSS = fresh-process VmHWM growth" if args.rss else ""),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for tokens in args.tokens:
        img, patch = image_geometry(tokens)
        batch = batches[tokens]
        t0 = time.perf_counter()
        teacher = build_vit(t_shape, tokens, seed=1, arch=args.arch)
        steps = {
            m: TrainStep(
                m,
                teacher,
                s_shape,
                tokens,
                batch,
                args.device,
                resolve_teacher_dtype(args.teacher_dtype),
                args.arch,
            )
            for m in args.modes
        }
        timings = interleaved_timings(steps, device=args.device, warmup=args.warmup, repeats=args.repeats)
        memory = {m: (steps[m].static_bytes(), step_peak_growth(steps[m], args.device)) for m in args.modes}
        used = {m: (steps[m].ce_path, steps[m].calibration_s) for m in args.modes}
        del steps, teacher
        gc.collect()
        rss = {m: None for m in args.modes}
        if args.rss:
            for m in args.modes:
                rss[m], _ = isolated_rss_growth(
                    _isolated_config,
                    args.pair,
                    m,
                    tokens,
                    batch,
                    args.warmup + 1,
                    args.depth,
                    torch.get_num_threads(),
                    args.teacher_dtype,
                    args.arch,
                    env=FIXED_MMAP_THRESHOLD if args.rss_fixed_mmap else None,
                )
        base_time = timings["none"].median
        base_peak = sum(memory["none"])
        for m in args.modes:
            static, growth = memory[m]
            peak = static + growth
            rows.append(
                dict(
                    tokens=tokens,
                    img_size=img,
                    patch_size=patch,
                    batch=batch,
                    mode=m,
                    ce_path=used[m][0],
                    calibration_s=used[m][1],
                    step_ms=1e3 * timings[m].median,
                    spread=timings[m].spread,
                    rounds=len(timings[m].times),
                    time_ratio=timings[m].median / base_time,
                    cpu_time_ratio=timings[m].cpu_median / timings["none"].cpu_median,
                    static_mib=mib(static),
                    step_peak_mib=mib(growth),
                    peak_mib=mib(peak),
                    memory_ratio=peak / base_peak,
                    over_plain_mib=mib(peak - base_peak),
                    rss_mib=mib(rss[m]),
                    rss_ratio=None if rss[m] is None else rss[m] / rss["none"],
                    times_ms=[1e3 * t for t in timings[m].times],
                    cpu_times_ms=[1e3 * t for t in timings[m].cpu_times],
                )
            )
        print(
            f"  N={tokens} ({img}px/{patch}, batch {batch}): {len(timings['none'].times)} rounds, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    info["loadavg_end"] = load_average()
    info["wall_s"] = round(time.perf_counter() - started, 1)
    return dict(
        benchmark="transfer_step",
        arch=args.arch,
        pair=args.pair,
        teacher=vars(t_shape),
        student=vars(s_shape),
        device=str(args.device),
        memory_measure=memory_kind,
        rss_measured=bool(args.rss),
        settings=dict(
            batch=batches,
            warmup=args.warmup,
            repeats=args.repeats,
            threads=torch.get_num_threads(),
            rss_fixed_mmap=bool(args.rss and args.rss_fixed_mmap),
            quick=args.quick,
            ce_paths=list(args.ce_paths),
            teacher_dtype=args.teacher_dtype,
            optimizer="build_adamw (the engine's)",
        ),
        machine=info,
        rows=rows,
        targets=check_targets(rows, args.device.type),
    )


def _target(target: str, tokens: int, value: float, holds: bool) -> dict[str, Any]:
    return dict(target=target, tokens=tokens, value=value, holds=holds)


def distill_targets(rows: Sequence[dict[str, Any]], device_type: str) -> list[dict[str, Any]]:
    """The targets for every distillation mode timed (the default path and each distill:PATH):
    faster than the materialised step at every N and within the time (and, on GPU, memory) budget."""
    by = {(r["tokens"], r["mode"]): r for r in rows}
    out = []
    budget = GPU_DISTILL_TIME_MAX if device_type == "cuda" else CPU_DISTILL_TIME_MAX
    for mode in dict.fromkeys(r["mode"] for r in rows if is_distill(r["mode"])):
        for n in sorted({r["tokens"] for r in rows}):
            d, ref = by[(n, mode)], by[(n, "distill_ref")]
            faster = "faster than" if device_type == "cuda" else "<="
            out.append(
                _target(
                    f"{mode} step {faster} the materialised one",
                    n,
                    d["time_ratio"] / ref["time_ratio"],
                    d["time_ratio"] < ref["time_ratio"]
                    if device_type == "cuda"
                    else d["time_ratio"] <= ref["time_ratio"],
                )
            )
            if n in budget:
                out.append(
                    _target(
                        f"{mode} step <= {budget[n]}x plain", n, d["time_ratio"], d["time_ratio"] <= budget[n]
                    )
                )
            if device_type == "cuda":
                out.append(
                    _target(
                        f"{mode} peak memory <= {GPU_DISTILL_MEMORY_MAX}x plain",
                        n,
                        d["memory_ratio"],
                        d["memory_ratio"] <= GPU_DISTILL_MEMORY_MAX,
                    )
                )
    return out


def auto_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets where ``distill:auto`` ran: its step within `AUTO_TIME_MAX` of the fastest single
    path timed beside it (the default ``distill`` and every ``distill:PATH``), and its calibration under
    `AUTO_CALIBRATION_MAX` of `AUTO_RUN_STEPS` of its own steps."""
    out = []
    for a in (r for r in rows if r["mode"] == "distill:auto"):
        singles = [
            r
            for r in rows
            if r["tokens"] == a["tokens"] and is_distill(r["mode"]) and r["mode"] != "distill:auto"
        ]
        # wall time, and process CPU time (on a shared CPU the less noisy of the two: descheduled time is
        # not counted); both over the plain step's of the same rounds
        for key, what in (("time_ratio", "step"), ("cpu_time_ratio", "step CPU time")):
            if not singles:
                break
            best = min(singles, key=lambda r: r[key])
            ratio = a[key] / best[key]
            out.append(
                _target(
                    f"auto ({a['ce_path']}) {what} <= {AUTO_TIME_MAX}x the fastest single path's ({best['mode']})",
                    a["tokens"],
                    ratio,
                    ratio <= AUTO_TIME_MAX,
                )
            )
        share = a["calibration_s"] / (AUTO_RUN_STEPS * a["step_ms"] / 1e3)
        out.append(
            _target(
                f"auto calibration ({a['calibration_s']:.2f} s) <= {AUTO_CALIBRATION_MAX:.0%} of "
                f"{AUTO_RUN_STEPS} steps",
                a["tokens"],
                share,
                share <= AUTO_CALIBRATION_MAX,
            )
        )
    return out


def check_targets(rows: Sequence[dict[str, Any]], device_type: str = "cpu") -> list[dict[str, Any]]:
    """The copy, distillation and auto targets, each with the measured figure and whether it holds."""
    by = {(r["tokens"], r["mode"]): r for r in rows}
    tokens = sorted({r["tokens"] for r in rows})
    out = distill_targets(rows, device_type) + auto_targets(rows)
    for n in tokens:
        c = by[(n, "copy")]
        out.append(
            dict(
                target=f"copy step <= {COPY_TIME_MAX}x plain",
                tokens=n,
                value=c["time_ratio"],
                holds=c["time_ratio"] <= COPY_TIME_MAX,
            )
        )
        out.append(
            dict(
                target=f"copy peak memory <= {COPY_MEMORY_MAX}x plain",
                tokens=n,
                value=c["memory_ratio"],
                holds=c["memory_ratio"] <= COPY_MEMORY_MAX,
            )
        )
        if c["rss_ratio"] is not None:
            out.append(
                dict(
                    target=f"copy RSS growth <= {COPY_MEMORY_MAX}x plain (cross-check)",
                    tokens=n,
                    value=c["rss_ratio"],
                    holds=c["rss_ratio"] <= COPY_MEMORY_MAX,
                )
            )
    n = DISTILL_TARGET_TOKENS if DISTILL_TARGET_TOKENS in tokens else tokens[-1]
    fast, ref = by[(n, "distill")], by[(n, "distill_ref")]
    gain = ref["peak_mib"] / fast["peak_mib"]
    out.append(
        dict(
            target=f"materialised / fast distill peak memory >= {DISTILL_MEMORY_GAIN_MIN}",
            tokens=n,
            value=gain,
            holds=gain >= DISTILL_MEMORY_GAIN_MIN,
        )
    )
    if fast["over_plain_mib"] > 0:
        gain_extra = ref["over_plain_mib"] / fast["over_plain_mib"]
        out.append(
            dict(
                target=f"same, memory above the plain student's (what the transfer adds) >= "
                f"{DISTILL_MEMORY_GAIN_MIN}",
                tokens=n,
                value=gain_extra,
                holds=gain_extra >= DISTILL_MEMORY_GAIN_MIN,
            )
        )
    if fast["rss_mib"] is not None:
        gain_rss = ref["rss_mib"] / fast["rss_mib"]
        out.append(
            dict(
                target=f"materialised / fast distill RSS growth >= {DISTILL_MEMORY_GAIN_MIN} (cross-check)",
                tokens=n,
                value=gain_rss,
                holds=gain_rss >= DISTILL_MEMORY_GAIN_MIN,
            )
        )
    return out


COLUMNS = (
    ("tokens", "N", ""),
    ("batch", "batch", ""),
    ("mode", "mode", ""),
    ("ce_path", "path", ""),
    ("step_ms", "step ms", ".0f"),
    ("spread", "±", ".0%"),
    ("time_ratio", "time x", ".2f"),
    ("cpu_time_ratio", "cpu x", ".2f"),
    ("peak_mib", "peak MiB", ".0f"),
    ("memory_ratio", "mem x", ".2f"),
    ("over_plain_mib", "+MiB", ".0f"),
    ("rss_mib", "RSS MiB", ".0f"),
    ("rss_ratio", "RSS x", ".2f"),
)


LEGEND = """\
path: the CE path a distillation step used (distill:auto: the one its calibration chose);
step ms: median wall time of a training step (forward, backward, AdamW); ±: half the interquartile range;
time x / cpu x: wall / process-CPU time over the plain student's at the same N;
peak MiB: static (weights incl. teacher, AdamW state, batch) + the step's peak of live tensor bytes;
mem x: over the plain student's; +MiB: above the plain student's;
RSS MiB / RSS x: fresh-process resident-set growth (VmHWM over RSS before building), CPU cross-check."""


def report(result: dict[str, Any], markdown: bool = False) -> str:
    cols = [c for c in COLUMNS if result["rss_measured"] or not c[0].startswith("rss")]
    legend = [ln for ln in LEGEND.splitlines() if result["rss_measured"] or not ln.startswith("RSS")]
    lines = [format_table(result["rows"], cols, markdown=markdown), "", *legend, ""]
    for t in result["targets"]:
        lines.append(
            f"{'HOLDS' if t['holds'] else 'FAILS'}  {t['target']} at N={t['tokens']}: {t['value']:.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    print()
    print(report(result))
    print(f"\n{result['machine']['wall_s']} s; load average at end {result['machine']['loadavg_end']}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
