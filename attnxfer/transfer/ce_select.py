"""`transfer.ce_path: auto`: the CE path is measured on the run's device and shapes, not assumed.

Which of the five `CEPath`s is fastest depends on device, N, head dims and dtype (an H100 ran the
materialised maps faster than ``sdpa`` at every N; this CPU runs ``rows`` fastest at large N). What is timed
is one distilled layer on the run's real shapes (attention core plus loss, forward and backward): the paths
differ only there, it costs far below 2 % of a 1,000-step run, and it touches no parameter, optimiser
state or RNG stream, so a calibrated run stays bit-identical to one told the chosen path.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..models.attention import AttentionIO, MapKind, attention_with_lse, run_with_ios, sdpa
from ..models.image_input import image_input
from ..speak import say
from .losses import CE_PATHS, CEPath, attention_distillation_loss, ce_path_for, materialised_bytes
from .triton_ce import CEPathUnavailable, check_triton_runs

#: timed rounds per path after one untimed warm-up call (kernels compiled, caches warm); the median counts
CALIBRATION_ROUNDS = 5
#: share of the device's free memory the materialised maps may take when no budget is configured
MEMORY_FRACTION = 0.25


@dataclass(frozen=True)
class LayerShapes:
    """What one distilled softmax layer hands the loss: (batch, heads, tokens, head dim) and dtypes."""

    batch: int
    tokens: int
    student_heads: int
    student_dim: int
    teacher_heads: int
    teacher_dim: int
    layers: int  # distilled softmax layers (the materialised maps of all of them are alive at once)
    student_dtype: str = "float32"
    teacher_dtype: str = "float32"
    #: keys per query row where they are fewer than the tokens (spatial-reduction attention); None: ``tokens``
    key_tokens: int | None = None
    #: distilled layers whose maps are not square, queries x keys (CaiT's class attention: one query row)
    non_square_layers: int = 0

    @property
    def keys(self) -> int:
        return self.tokens if self.key_tokens is None else self.key_tokens

    def describe(self) -> str:
        keys = f" ({self.key_tokens} keys)" if self.key_tokens not in (None, self.tokens) else ""
        return (
            f"batch {self.batch} x {self.tokens} tokens{keys}, student {self.student_heads} heads of "
            f"{self.student_dim}, teacher {self.teacher_heads} of {self.teacher_dim}, {self.layers} layers, "
            f"{self.student_dtype}/{self.teacher_dtype}"
        )


@dataclass
class CEChoice:
    """The path a run uses and how it was decided; ``record()`` goes into run.json and every checkpoint."""

    path: CEPath
    how: str  # "measured", "forced", "device default", "resumed from step-…", "measured on rank 0"
    timings_ms: dict[str, float] = field(default_factory=dict)  # median of the rounds, per path timed
    skipped: dict[str, str] = field(default_factory=dict)  # could not run while timed: the error
    unavailable: dict[str, str] = field(default_factory=dict)  # requirement unmet: why
    shapes: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    seconds: float = 0.0  # the calibration's wall time

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_record(cls, record: dict[str, Any], how: str | None = None) -> CEChoice:
        known = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        return cls(**{**known, "path": CEPath(record["path"]), "how": record["how"] if how is None else how})

    def describe(self) -> str:
        """One log line: the choice, how, and the timings behind it."""
        line = f"ce_path: {self.path} ({self.how}"
        if self.device:
            line += f" on {self.device}"
        if self.shapes:
            line += f", {LayerShapes(**self.shapes).describe()}"
        line += ")"
        if self.timings_ms:
            times = ", ".join(
                f"{p} {t:.3g}" if t < 100 else f"{p} {t:.0f}"
                for p, t in sorted(self.timings_ms.items(), key=lambda kv: kv[1])
            )
            line += f"; one layer's attention + loss, forward + backward, median ms: {times}"
            line += f" [calibration {self.seconds:.2f} s]"
        for what, why in (("not tried", self.unavailable), ("skipped, cannot run here", self.skipped)):
            if why:
                line += f"; {what}: " + "; ".join(f"{p} ({reason})" for p, reason in why.items())
        return line


def layer_shapes(
    pair: torch.nn.Module,
    batch: int,
    device: torch.device | str = "cpu",
    student_dtype: torch.dtype = torch.float32,
) -> LayerShapes | None:
    """The shapes ``pair`` hands its first distilled softmax layer's loss at ``batch`` images per rank (None: no
    softmax maps distilled), read from one probe image so that a family's own layout is what is timed."""
    if pair.teacher is None:
        return None
    softmax = [
        (s, t)
        for c in pair.plan.comparisons
        if c.loss_fn.uses_ce_path
        for s, t in c.pairs
        if pair._student_attn[s].map_kind is MapKind.SOFTMAX
    ]
    if not softmax:
        return None
    s, t = softmax[0]
    teacher_dtype = pair._teacher_dtype(torch.device(device))
    # both models see the student's images, of the size it was built for (`image_input`)
    info = image_input(pair.student)
    image = (int(info.in_chans), int(info.img_size[0]), int(info.img_size[1]))
    student = _probe_qk(pair.student, sorted({layer for layer, _ in softmax}), image)
    q_s, k_s = student[s]
    q_t, _ = _probe_qk(pair.teacher, [t], image)[t]
    return LayerShapes(
        batch=batch * q_s[0],
        tokens=q_s[2],
        student_heads=q_s[1],
        student_dim=q_s[3],
        teacher_heads=q_t[1],
        teacher_dim=q_t[3],
        layers=len(softmax),
        student_dtype=str(student_dtype).removeprefix("torch."),
        teacher_dtype=str(teacher_dtype).removeprefix("torch."),
        key_tokens=k_s[2] if k_s[2] != q_s[2] else None,
        non_square_layers=sum(q[2] != k[2] for q, k in student.values()),
    )


def _probe_qk(
    model: torch.nn.Module, layers: Sequence[int], image_shape: tuple[int, int, int]
) -> dict[int, tuple[torch.Size, torch.Size]]:
    """The (B, H, N, d) shapes of the q and k each layer in ``layers`` hands the loss, per image, read from one
    forward with the RNGs forked: an adapter's q/k need not be one head of ``head_dim`` over the patch tokens
    (talking heads, windows as batch rows, reduced keys, class attention's one query row)."""
    weight = next(model.parameters())
    image = torch.zeros(1, *image_shape, dtype=weight.dtype, device=weight.device)
    ios = {layer: AttentionIO(capture="qk", stop=layer == max(layers)) for layer in layers}
    forked = [weight.device] if weight.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=forked):
        run_with_ios(model, image, ios)
    return {layer: (io.captured["q"].shape, io.captured["k"].shape) for layer, io in ios.items()}


def default_memory_budget(device: torch.device | str) -> int:
    """`MEMORY_FRACTION` of the free memory in bytes (CUDA's; on CPU MemAvailable, else free pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * MEMORY_FRACTION)


def candidate_paths(
    device: torch.device | str,
    shapes: LayerShapes,
    budget_bytes: int,
    paths: Sequence[CEPath | str] | None = None,
) -> tuple[list[CEPath], dict[str, str]]:
    """The paths worth timing and, for the others, why not. A path named in ``paths`` is tried even where its
    device requirement fails (it then raises and is skipped); the materialised maps keep to ``budget_bytes``."""
    device = torch.device(device)
    named = paths is not None
    out, unavailable = [], {}
    for path in CE_PATHS if paths is None else [CEPath(p) for p in paths]:
        if path is CEPath.MATERIALISED:  # N×N maps per distilled layer, kept until backward
            heads = (shapes.student_heads, shapes.teacher_heads)
            need = materialised_bytes(shapes.batch, shapes.tokens, *heads, shapes.layers)
            need = need * shapes.keys // shapes.tokens  # the maps are N_q x N_k
            if need > budget_bytes:
                unavailable[str(path)] = (
                    f"maps need {need / 2**30:.3g} GiB, budget {budget_bytes / 2**30:.3g} GiB"
                )
                continue
        why = _not_square(shapes) if path is CEPath.TRITON else ""
        if not named and path is CEPath.TRITON and shapes.teacher_heads != shapes.student_heads:
            why = "needs one teacher head per student head"
        if not named and path is CEPath.TRITON and device.type != "cuda":
            why = "needs CUDA"
        if why:
            unavailable[str(path)] = why
        else:
            out.append(path)
    return out, unavailable


def _not_square(shapes: LayerShapes) -> str:
    """Why the triton kernels cannot take the layers' maps ("" where every distilled map is square)."""
    if shapes.keys != shapes.tokens:
        return "needs as many keys as queries"
    if shapes.non_square_layers:
        return f"needs square maps, and {shapes.non_square_layers} distilled layer(s) have fewer queries than keys"
    return ""


def check_forced(path: CEPath | str, device: torch.device | str, shapes: LayerShapes) -> None:
    """A `CEPathUnavailable` saying why a forced path cannot run here, before the first step."""
    if CEPath(path) is not CEPath.TRITON:
        return
    try:
        check_triton_runs(device)
        if why := _not_square(shapes):
            raise CEPathUnavailable(f"the triton CE path {why}")
    except CEPathUnavailable as e:
        raise CEPathUnavailable(f"transfer.ce_path=triton cannot run here: {e}") from None


def _cannot_run() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this path cannot run here" (Triton's out of resources among them)."""
    kinds: list[type[BaseException]] = [CEPathUnavailable, torch.OutOfMemoryError]
    errors = sys.modules.get("triton.runtime.errors")  # loaded where the triton path ran at all
    if errors is not None and hasattr(errors, "OutOfResources"):
        kinds.append(errors.OutOfResources)
    return tuple(kinds)


def _layer_step(
    path: CEPath, shapes: LayerShapes, device: torch.device, gen: torch.Generator
) -> Callable[[], None]:
    """One distilled layer's training work on ``path``, the student's attention core and the loss, forward and
    backward, on q/k/v that are strided views of one (B, N, 3, H, d) tensor, as timm's fused qkv hands them out."""
    B, N, M = shapes.batch, shapes.tokens, shapes.keys
    s_dtype, t_dtype = getattr(torch, shapes.student_dtype), getattr(torch, shapes.teacher_dtype)
    qkv = torch.randn(B, N, 3, shapes.student_heads, shapes.student_dim, generator=gen)
    qkv = qkv.to(device=device, dtype=s_dtype).requires_grad_()
    t = torch.randn(B, N, 2, shapes.teacher_heads, shapes.teacher_dim, generator=gen)
    q_t, k_t = t.to(device=device, dtype=t_dtype).permute(2, 0, 3, 1, 4).unbind(0)
    kv = None
    if M != N:  # reduced keys: k/v of M rows (the student's from a separate projection, with a gradient)
        kv = torch.randn(B, M, 2, shapes.student_heads, shapes.student_dim, generator=gen)
        kv = kv.to(device=device, dtype=s_dtype).requires_grad_()
        k_t = torch.randn(B, shapes.teacher_heads, M, shapes.teacher_dim, generator=gen)
        k_t = k_t.to(device=device, dtype=t_dtype)

    def step() -> None:
        q_s, k_s, v_s = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if kv is not None:
            k_s, v_s = kv.permute(2, 0, 3, 1, 4).unbind(0)
            kv.grad = None
        if path.needs_student_lse:
            out, lse = attention_with_lse(q_s, k_s, v_s)
        else:
            out, lse = sdpa(q_s, k_s, v_s), None
        ce = attention_distillation_loss(q_t, k_t, q_s, k_s, path=path, with_kl=False, lse_s=lse).total
        (ce + out.float().mean()).backward()
        qkv.grad = None

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ce_paths(
    shapes: LayerShapes,
    device: torch.device | str,
    paths: Sequence[CEPath],
    *,
    rounds: int = CALIBRATION_ROUNDS,
) -> CEChoice:
    """Time ``paths`` on ``shapes``: one warm-up call each, then ``rounds`` interleaved rounds (order rotated
    every round, so every path sees the same background load); the fastest median wins. A path that cannot
    run here (`_cannot_run`) is dropped with one line said and recorded in ``skipped``; any other exception
    propagates. If no path runs the device's default is kept."""
    device = torch.device(device)
    started = time.perf_counter()
    steps: dict[CEPath, Callable[[], None]] = {}
    times: dict[CEPath, list[float]] = {}
    skipped: dict[str, str] = {}

    def run(path: CEPath, build: bool = False) -> float | None:
        """Seconds of one call of ``path``'s step (built first with ``build``); None: it cannot run here."""
        try:
            if build:
                steps[path] = _layer_step(path, shapes, device, gen)
            _sync(device)
            t0 = time.perf_counter()
            steps[path]()
            _sync(device)
            return time.perf_counter() - t0
        except _cannot_run() as err:
            first = (str(err).strip().splitlines() or [""])[0]
            skipped[str(path)] = f"{type(err).__name__}: {first}"[:300]
            say(f"ce_path auto: skipping {path}, it cannot run here: {skipped[str(path)]}")
            steps.pop(path, None)
            times.pop(path, None)
            _free(device)
            return None

    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        for path in paths:  # the warm-up: kernels compiled, caches warm
            if run(path, build=True) is not None:
                times[path] = []
        order = list(steps)  # fixed: a path that fails later keeps the others' rotation
        for r in range(rounds):
            shift = r % max(len(order), 1)
            for path in order[shift:] + order[:shift]:
                if path in steps and (seconds := run(path)) is not None:
                    times[path].append(seconds)
    steps.clear()  # the timed tensors go before the cache is emptied
    _free(device)
    timings = {str(p): 1e3 * statistics.median(ts) for p, ts in times.items() if ts}
    if timings:
        best, how = CEPath(min(timings, key=timings.__getitem__)), "measured"
    else:
        best, how = ce_path_for(device), "device default: no path ran"
    record = {k: v for k, v in asdict(shapes).items() if v or k not in ("key_tokens", "non_square_layers")}
    return CEChoice(best, how, timings, skipped, {}, record, str(device), time.perf_counter() - started)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def choose_ce_path(
    pair: torch.nn.Module,
    batch: int,
    device: torch.device | str,
    *,
    student_dtype: torch.dtype = torch.float32,
    budget_bytes: int | None = None,
    paths: Sequence[CEPath | str] | None = None,
    rounds: int = CALIBRATION_ROUNDS,
) -> CEChoice | None:
    """The fastest CE path for ``pair`` at ``batch`` images per rank (None: it distils no softmax maps)."""
    shapes = layer_shapes(pair, batch, device, student_dtype)
    if shapes is None:
        return None
    budget = default_memory_budget(device) if budget_bytes is None else budget_bytes
    todo, unavailable = candidate_paths(device, shapes, budget, paths)
    choice = measure_ce_paths(shapes, device, todo, rounds=rounds)
    choice.unavailable = unavailable
    return choice


def budget_from_gib(gib: float | None) -> int | None:
    """``transfer.materialise_budget_gib`` in bytes (None stays None: the default budget)."""
    return None if gib is None else math.floor(gib * 2**30)
