"""Measuring a student against its teacher: per-layer map agreement, top-1, relative speed, operation counts.

All three sum over the ranks of a joined process group, so every rank may call them on its share.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..analysis import layer_agreement
from ..models.attention import TransferAttention, attention_name_of, capture_attention
from ..models.efficient import check_softmax_teacher
from ..transfer.map_losses import default_map_loss, output_mse
from .distributed import sum_over_ranks

__all__ = ["evaluate_top1", "interleaved_median_ms", "map_agreement", "operation_counts", "relative_speed"]

#: ``map_agreement(inputs=...)``: whether each model runs on its own hidden states
_INPUTS = {"teacher": False, "own": True}


@torch.no_grad()
def map_agreement(
    teacher: nn.Module, student: nn.Module, batches: Iterable[torch.Tensor], *, inputs: str = "teacher"
) -> list[dict[str, Any]]:
    """Per-layer agreement of the student's attention with the teacher's, averaged over ``batches``
    (over every rank's batches in a process group).

    ``inputs="teacher"``: each student layer sees the teacher's hidden input for that layer (what stage
    1 optimises). ``inputs="own"``: both models run end to end on the image and each layer sees its own
    model's hidden input (what the deployed student does). Metric by the student layer's map kind:
    KL(P_t ‖ A_s) for row-stochastic maps, mean squared map difference for signed ones, attention-output
    MSE where there is no map; ``output_mse`` (attention outputs) is reported for every layer.
    """
    if inputs not in _INPUTS:
        raise ValueError(f"inputs must be 'teacher' or 'own', got {inputs!r}")
    own_inputs = _INPUTS[inputs]
    check_softmax_teacher(teacher)
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    depth = len(student.blocks)
    sums: dict[int, list[float]] = {i: [0.0, 0.0] for i in range(depth)}
    count = 0
    for x in batches:
        with capture_attention(teacher, fields=("input", "q", "k", "output")) as t:
            teacher.forward_features(x)
        if own_inputs:
            with capture_attention(student, fields=("q", "k", "output")) as s:
                student.forward_features(x)
        for i in range(depth):
            attn = student.blocks[i].attn
            if own_inputs:
                q, k, out = s[i]["q"], s[i]["k"], s[i]["output"]
            else:
                call = {"rope": t[i]["rope"]} if "rope" in t[i] else {}  # a rope teacher's rotary embedding
                own = attn.project(t[i]["input"], "qk", **call)
                q, k = own["q"], own["k"]
                out = attn(t[i]["input"], **call)
            out_mse = float(output_mse(out, t[i]["output"]))
            if attn.map_kind.has_map:  # the metric of the kind's own map loss (KL beside CE, map MSE)
                metric = default_map_loss(attn.map_kind).metric
                value = layer_agreement(teacher.blocks[i].attn, t[i], attn, {"q": q, "k": k}, metric)
            else:
                value = out_mse
            sums[i][0] += value * x.shape[0]
            sums[i][1] += out_mse * x.shape[0]
        count += x.shape[0]
    teacher.train(was[0]), student.train(was[1])
    device = next(student.parameters()).device
    flat = sum_over_ranks([v for i in range(depth) for v in sums[i]] + [count], device)
    sums = {i: flat[2 * i : 2 * i + 2] for i in range(depth)}
    count = flat[-1]
    rows = []
    for i in range(depth):
        attn = student.blocks[i].attn
        kind = attn.map_kind
        rows.append(
            {
                "layer": i,
                "attention": attention_name_of(attn),
                "map_kind": kind,
                "metric": default_map_loss(kind).metric,
                "value": sums[i][0] / max(1, count),
                "output_mse": sums[i][1] / max(1, count),
            }
        )
    return rows


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device: torch.device) -> float | None:
    """Top-1 (%) over ``loader`` (summed over ranks in a process group); None without a classifier head."""
    if not getattr(model, "num_classes", 0):
        return None
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    model.train(was)
    correct, total = sum_over_ranks([correct, total], device)
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def interleaved_median_ms(
    a: nn.Module,
    b: nn.Module,
    x: torch.Tensor,
    repeats: int,
    warmup: int,
    autocast: torch.dtype | None = None,
) -> tuple[float, float]:
    """Median forward times (ms) of ``a`` and ``b`` on ``x``, run alternately (a b, b a, ...) after
    ``warmup`` rounds, so that a machine whose load drifts slows both alike; under ``autocast`` (a dtype)
    when given."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def timed(model: nn.Module) -> float:
        sync()
        start = time.perf_counter()
        with (
            torch.autocast(x.device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        ):
            model(x)
        sync()
        return 1000.0 * (time.perf_counter() - start)

    for _ in range(warmup):
        timed(a), timed(b)
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        for who in (0, 1) if r % 2 == 0 else (1, 0):
            times[who].append(timed((a, b)[who]))
    return statistics.median(times[0]), statistics.median(times[1])


@torch.no_grad()
def relative_speed(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    repeats: int = 20,
    warmup: int = 3,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Forward time of student and teacher on the same input, measured interleaved in one process (under
    ``autocast``, e.g. bf16 on GPU as a run trains, when given).

    Returns both medians (ms), both throughputs (images/s at this batch and resolution) and ``speedup`` =
    teacher / student (> 1: the student is faster).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    t_ms, s_ms = interleaved_median_ms(teacher, student, x, repeats, warmup, autocast)
    teacher.train(was[0]), student.train(was[1])
    batch = int(x.shape[0])
    return {
        "batch": batch,
        "input": list(x.shape[1:]),
        "tokens": _tokens(teacher),
        "repeats": repeats,
        "teacher_ms": t_ms,
        "student_ms": s_ms,
        "teacher_images_per_s": 1000.0 * batch / t_ms,
        "student_images_per_s": 1000.0 * batch / s_ms,
        "speedup": t_ms / s_ms,
        "precision": f"{str(autocast).removeprefix('torch.')} autocast"
        if autocast is not None
        else "no autocast",
        "device": x.device.type,
        "threads": torch.get_num_threads(),
    }


def _layer_counts(attn: nn.Module, tokens: int, batch: int):
    counter = getattr(attn, "operation_counts", None)
    if counter is None:  # timm's plain Attention is softmax attention
        return TransferAttention.operation_counts(attn, tokens, batch)
    return counter(tokens, batch)


def operation_counts(teacher: nn.Module, student: nn.Module, batch: int = 1) -> dict[str, Any]:
    """Per block, multiplications / additions of the student's and the teacher's attention cores at the
    teacher's token count (`attnxfer.models.attention.opcount`), and the totals; a layer whose attention
    does not count its operations gets None (and the totals None)."""
    tokens = _tokens(teacher)
    rows, totals = [], {"teacher": {}, "student": {}}
    for i, (t_blk, s_blk) in enumerate(zip(teacher.blocks, student.blocks, strict=True)):
        row = {"layer": i, "attention": attention_name_of(s_blk.attn)}
        for who, blk in (("teacher", t_blk), ("student", s_blk)):
            counts = _layer_counts(blk.attn, tokens, batch) if tokens else None
            row[who] = counts.to_dict() if counts is not None else None
            for key, value in (row[who] or {}).items():
                if totals[who] is not None:
                    totals[who][key] = totals[who].get(key, 0) + value
            if counts is None:
                totals[who] = None
        rows.append(row)
    return {"tokens": tokens, "batch": batch, "layers": rows, "total": totals}


def _tokens(model: nn.Module) -> int | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return int(math.prod(grid)) + int(getattr(model, "num_prefix_tokens", 0)) if grid else None
