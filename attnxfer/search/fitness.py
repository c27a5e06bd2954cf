"""A candidate attention's fitness: its held-out map KL to the teacher after a short stage 1 in the searched
layers, and its speed (one layer against softmax: wall time or counted FLOPs). The teacher's hidden inputs
and q/k are computed once (`TeacherCache`) and shared by every candidate: that makes hundreds affordable."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InputError
from ..models.attention import MapKind, transferable_attentions
from ..models.attention.registry import get_attention_class
from ..models.efficient import build_efficient_student
from ..models.efficient.swap import teacher_token_layout
from ..speak import quiet
from ..train.engine import NonFiniteLossError
from ..train.measure import layer_map_metric
from ..train.speed import interleaved_forward_seconds
from ..train.stage1 import stage1_transfer, teacher_signals
from ..transfer.conversion import build_conversion_plan

#: How a candidate's speed is scored against softmax: interleaved wall-clock medians (what users feel, noisy
#: on a shared machine) or counted FLOPs (deterministic).
SPEED_MODES = ("time", "flops")

Signals = dict[int, dict[str, torch.Tensor]]


@dataclass
class TeacherCache:
    """The teacher's per-layer attention input and (q, k) on the fit batches and on held-out batches."""

    layers: list[int]
    fit: list[Signals]
    held_out: list[Signals]

    @property
    def held_out_images(self) -> int:
        return sum(next(iter(s.values()))["input"].shape[0] for s in self.held_out)


@torch.no_grad()
def cache_teacher(
    teacher: nn.Module,
    fit_images: Sequence[torch.Tensor],
    held_out: Sequence[torch.Tensor],
    layers: Sequence[int],
) -> TeacherCache:
    """Run the teacher once over every batch and keep what stage 1 and the KL need (detached)."""
    teacher.eval()
    layers = sorted(set(layers))

    def signals(x: torch.Tensor) -> Signals:
        store = teacher_signals(teacher, x, layers, ("input", "q", "k"))
        return {i: {k: v.detach() for k, v in store[i].items()} for i in layers}

    return TeacherCache(layers, [signals(x) for x in fit_images], [signals(x) for x in held_out])


@dataclass
class FitSettings:
    """Stage 1 of one candidate: the same for every candidate of a search (a fair comparison)."""

    steps: int
    lr: float = 1e-2
    train: str = "new+qk"  # what stage 1 trains (Stage1Train): new+qk gives every formula something to fit
    warmup_steps: int = 0
    clip_grad: float | None = 1.0
    seed: int = 0  # the candidate's new parameters start from this seed, whichever process fits it


def fit_candidate(
    teacher: nn.Module, attention: str, cache: TeacherCache, fit: FitSettings
) -> dict[str, Any]:
    """Fit ``attention`` in the cached layers of a copy of ``teacher``: ``{"kl", "kl_per_layer", "fit_seconds"}``.
    ValueError (cannot be built, no row-stochastic map) or `NonFiniteLossError` (diverged): the caller rejects."""
    start = time.monotonic()
    student = fit_student(teacher, attention, cache, fit)
    per_layer = held_out_kl(teacher, student, cache)
    kl = sum(per_layer) / len(per_layer)
    if not math.isfinite(kl):
        raise NonFiniteLossError(f"non-finite held-out KL after stage 1 (per layer {per_layer})")
    return {"kl": kl, "kl_per_layer": per_layer, "fit_seconds": time.monotonic() - start}


def fit_student(
    teacher: nn.Module,
    attention: str,
    cache: TeacherCache,
    fit: FitSettings,
    *,
    check_map: bool = True,
    **options: Any,
) -> nn.Module:
    """A copy of ``teacher`` with ``attention`` in the cached layers after ``fit.steps`` of stage 1 (eval mode).
    ``check_map=False`` fits one without a row-stochastic map too (`benchmarks/zoo_proxy.py` compares outputs)."""
    torch.manual_seed(fit.seed)
    depth = len(transferable_attentions(teacher))  # blocks.* of a ViT; every stage's layers of PVTv2 / Swin
    names = [attention if i in cache.layers else "softmax" for i in range(depth)]
    student = build_efficient_student(teacher, names, **options)
    kind = transferable_attentions(student)[cache.layers[0]].map_kind
    if check_map and kind is not MapKind.ROW_STOCHASTIC:
        raise ValueError(
            f"its map is {kind}, not row-stochastic: KL to the teacher's maps is undefined (a formula "
            "normalised by len(...) is signed)"
        )
    plan = build_conversion_plan(
        teacher,
        student,
        stage1_steps=fit.steps,
        stage1_lr=fit.lr,
        stage1_batch_size=next(iter(cache.fit[0].values()))["input"].shape[0],
        stage1_train=fit.train,
    )
    # an attention without a map fits on the teacher's outputs: the cache keeps its input, q and k only
    if missing := [f for f in plan.teacher_signals if f not in cache.fit[0][cache.layers[0]]]:
        raise ValueError(
            f"its fit needs the teacher's {', '.join(missing)}, which the search's cache does not hold"
        )
    try:
        with quiet():  # a search says one line per generation, not one per fit
            stage1_transfer(
                teacher,
                student,
                plan,
                itertools.cycle(cache.fit),
                warmup_steps=fit.warmup_steps,
                clip_grad=fit.clip_grad,
                log_every=fit.steps,
            )
    except NonFiniteLossError as e:  # keep what happened, drop conversion's advice on its own settings
        raise NonFiniteLossError(f"{str(e).split(';')[0]} (stage 1 diverged at lr {fit.lr:g})") from None
    return student.eval()


@torch.no_grad()
def held_out_kl(teacher: nn.Module, student: nn.Module, cache: TeacherCache) -> list[float]:
    """Per cached layer, KL(P_teacher ‖ A_student) per row on the held-out batches (`layer_map_metric`)."""
    t_attns, s_attns = transferable_attentions(teacher), transferable_attentions(student)
    per_layer = []
    for i in cache.layers:
        t_attn, s_attn = t_attns[i], s_attns[i]
        total = 0.0
        for batch in cache.held_out:
            own = s_attn.project(batch[i]["input"], "qk")
            n = batch[i]["input"].shape[0]
            total += n * layer_map_metric(t_attn, batch[i], s_attn, own)  # KL: row-stochastic maps
        per_layer.append(total / cache.held_out_images)
    return per_layer


@dataclass
class SpeedSettings:
    """One attention layer at ``tokens`` tokens (class token + a square grid, like ViT-B/4 at 224 px)."""

    tokens: int = 3137
    mode: str = "time"
    repeats: int = 5
    batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in SPEED_MODES:
            raise ValueError(f"speed mode must be one of {', '.join(SPEED_MODES)}, got {self.mode!r}")

    def token_layout(self, teacher: nn.Module) -> tuple[int, int]:
        """(prefix tokens, grid side) of ``tokens`` for ``teacher``: its prefix tokens + a square grid, or an
        `InputError` (checked before the teacher's signals are cached)."""
        prefix = teacher_token_layout(teacher)[0] if hasattr(teacher, "blocks") else 0  # PVTv2/Swin: none
        side = math.isqrt(max(self.tokens - prefix, 0))
        if side * side != self.tokens - prefix or side == 0:
            near = sorted({prefix + g * g for g in (max(side, 1), side + 1)})
            raise InputError(
                f"{self.tokens} tokens is not the teacher's {prefix} prefix token(s) + a square grid; "
                f"choose e.g. {' or '.join(map(str, near))}"
            )
        return prefix, side


def _layer(name: str, teacher: nn.Module, tokens: int) -> nn.Module:
    """One attention ``name`` of the teacher's width, heads and token layout at ``tokens`` tokens, on the
    teacher's device (where search.speed=time times it)."""
    attn = transferable_attentions(teacher)[0]
    prefix, side = SpeedSettings(tokens).token_layout(teacher)
    cls = get_attention_class(name)
    config: dict[str, Any] = dict(
        dim=attn.proj.out_features,
        num_heads=attn.num_heads,
        attn_head_dim=attn.head_dim,
        qkv_bias=(attn.qkv if hasattr(attn, "qkv") else attn.q).bias is not None,  # PVTv2: q + kv
        num_prefix_tokens=prefix,
        grid_size=(side, side),
    )
    if cls.accepts_option("seq_len"):
        config["seq_len"] = tokens
    return cls(**config).to(next(teacher.parameters()).device).eval()


@torch.no_grad()
def layer_speed(
    name: str, teacher: nn.Module, speed: SpeedSettings, softmax_flops: float | None = None
) -> dict[str, Any]:
    """Speed of one ``name`` layer relative to one softmax layer (> 1: faster), by ``speed.mode``."""
    candidate = _layer(name, teacher, speed.tokens)
    softmax = _layer("softmax", teacher, speed.tokens)
    x = torch.randn(
        speed.batch, speed.tokens, candidate.qkv.in_features, generator=torch.Generator().manual_seed(0)
    ).to(candidate.qkv.weight.device)
    if speed.mode == "flops":
        base = softmax_flops if softmax_flops is not None else _flops(softmax, x)
        own = _flops(candidate, x)
        return {"speed": base / max(own, 1.0), "flops": own, "softmax_flops": base}
    times = interleaved_forward_seconds({"own": candidate, "softmax": softmax}, x, repeats=speed.repeats)
    own_ms, base_ms = 1000.0 * times["own"].median, 1000.0 * times["softmax"].median
    return {"speed": base_ms / own_ms, "ms": own_ms, "softmax_ms": base_ms}


def _flops(layer: nn.Module, x: torch.Tensor) -> float:
    # SDPA's math path: FlopCounterMode counts nothing for the fused CPU kernel, which would leave softmax
    # only its qkv and proj projections (its N x N maps uncounted) and every candidate slower than it
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        layer(x)
    return float(counter.get_total_flops())


class CandidateEvaluator:
    """Score attentions by name against one teacher; one that cannot be built, diverges or gives a
    non-finite KL is returned ``status: "rejected"`` with the reason (never dropped)."""

    def __init__(
        self, teacher: nn.Module, cache: TeacherCache, fit: FitSettings, speed: SpeedSettings
    ) -> None:
        self.teacher, self.cache, self.fit, self.speed = teacher, cache, fit, speed
        self._softmax_flops: dict[int, float] = {}  # tokens -> FLOPs of one softmax layer

    def __call__(self, attention: str) -> dict[str, Any]:
        try:
            fitted = fit_candidate(self.teacher, attention, self.cache, self.fit)
        except (ValueError, NonFiniteLossError) as e:
            return {"status": "rejected", "reason": f"at fit time: {e}"}
        measured = layer_speed(
            attention, self.teacher, self.speed, self._softmax_flops.get(self.speed.tokens)
        )
        if self.speed.mode == "flops":
            self._softmax_flops[self.speed.tokens] = measured["softmax_flops"]
        return {
            "status": "ok",
            **fitted,
            **measured,
            "speed_mode": self.speed.mode,
            "tokens": self.speed.tokens,
        }
