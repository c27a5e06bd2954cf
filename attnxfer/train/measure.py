"""Measuring a student against its teacher: per-layer map agreement, top-1, operation counts.

All three sum over the ranks of a joined process group, so every rank may call them on its share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..analysis import layer_agreement
from ..analysis.knn import evaluating
from ..models.attention import (
    MapKind,
    TransferAttention,
    attention_name_of,
    capture_attention,
    transferable_attentions,
)
from ..models.attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..models.efficient import check_softmax_teacher
from ..models.efficient.swap import flat_blocks
from ..models.image_input import find_patch_embedding, image_input
from ..transfer.map_losses import LayerLogits, agreement, default_map_loss, map_distillation_loss, output_mse
from .distributed import gather_objects, sum_over_ranks
from .evaluation import classification_sums, per_image_top1


def layer_map_metric(
    t_attn: nn.Module, t_signals: Mapping[str, Any], s_attn: nn.Module, s_qk: Mapping[str, torch.Tensor]
) -> float:
    """The metric of the student layer's default map loss between its map on ``s_qk`` and the teacher's on
    ``t_signals``, averaged over (batch, head, query); conversion reports and the search both score with it.
    A teacher with reduced keys (PVTv2) and a student over every token: the student's rows are pooled onto
    the teacher's keys, as stage 1's loss pools them."""
    q, k = s_qk["q"], s_qk["k"]
    pooling = t_signals.get("key_pooling")
    if pooling is not None and k.shape[-2] == pooling.num_tokens:
        teacher = LayerLogits(t_signals["q"], t_signals["k"], key_pooling=pooling)
        return float(agreement(map_distillation_loss(s_attn, LayerLogits(q, k), teacher)))
    return layer_agreement(t_attn, t_signals, s_attn, s_qk, default_map_loss(s_attn.map_kind).metric)


@torch.no_grad()
def map_agreement(
    teacher: nn.Module, student: nn.Module, batches: Iterable[torch.Tensor], *, inputs: str = "teacher"
) -> list[dict[str, Any]]:
    """Per-layer agreement of the student's attention with the teacher's over every rank's ``batches``: each
    student layer on the teacher's hidden input (``inputs="teacher"``, what stage 1 optimises) or on its own
    model's (``"own"``, what the deployed student does). The metric is the layer's default map loss's
    (attention-output MSE where there is no map); ``output_mse`` is reported for every layer, and beside a KL
    ``kl_floor``, the least KL a map with the student's zeros can reach (None elsewhere, and where the teacher
    pools its keys)."""
    if inputs not in ("teacher", "own"):
        raise ValueError(f"inputs must be 'teacher' or 'own', got {inputs!r}")
    own_inputs = inputs == "own"
    check_softmax_teacher(teacher)
    t_attns, s_attns = transferable_attentions(teacher), transferable_attentions(student)
    sums = [[0.0, 0.0, 0.0] for _ in s_attns]  # per layer: metric, output MSE, KL floor, summed over images
    count = 0
    with evaluating(teacher, student):
        for x in batches:
            _add_batch(teacher, student, t_attns, s_attns, x, own_inputs, sums)
            count += x.shape[0]
    *flat, count = sum_over_ranks(
        [v for layer in sums for v in layer] + [count], next(student.parameters()).device
    )
    return [  # one row per layer: its attention, map kind, metric and the means over the images
        {
            "layer": i,
            "attention": attention_name_of(attn),
            "map_kind": attn.map_kind,
            "metric": default_map_loss(attn.map_kind).metric,
            "value": flat[3 * i] / max(1, count),
            "output_mse": flat[3 * i + 1] / max(1, count),
            "kl_floor": None if math.isnan(floor := flat[3 * i + 2] / max(1, count)) else floor,
        }
        for i, attn in enumerate(s_attns)
    ]


def _add_batch(teacher, student, t_attns, s_attns, x: torch.Tensor, own_inputs: bool, sums) -> None:
    """Add one batch's per-layer (metric, output MSE) sums, each weighted by the batch's images."""
    with capture_attention(teacher, fields=("input", "q", "k", "output")) as t:
        teacher.forward_features(x)
    if own_inputs:
        with capture_attention(student, fields=("q", "k", "output")) as s:
            student.forward_features(x)
    for i, attn in enumerate(s_attns):
        if own_inputs:
            q, k, out = s[i].get("q"), s[i].get("k"), s[i]["output"]  # `none` layers project nothing
        else:
            call = {"rope": t[i]["rope"]} if "rope" in t[i] else {}  # a rope teacher's rotary embedding
            own = attn.project(t[i]["input"], "qk", **call)
            q, k = own["q"], own["k"]
            out = attn(t[i]["input"], **call)
        out_mse = float(output_mse(out, t[i]["output"]))
        if attn.map_kind.has_map:
            value = layer_map_metric(t_attns[i], t[i], attn, {"q": q, "k": k})
        else:
            value = out_mse
        sums[i][0] += value * x.shape[0]
        sums[i][1] += out_mse * x.shape[0]
        # a KL's floor where the student's map may hold zeros (a softmax one's never does); pooled keys: other rows
        if attn.map_kind is not MapKind.ROW_STOCHASTIC or t[i].get("key_pooling") is not None:
            sums[i][2] = math.nan
        else:
            floor = layer_agreement(t_attns[i], t[i], attn, {"q": q, "k": k}, "kl_floor")
            sums[i][2] += floor * x.shape[0]


def evaluate_top1(
    model: nn.Module, loader: Iterable, device: torch.device, classes: int | None = None
) -> float | None:
    """Top-1 (%) over ``loader`` (summed over ranks in a process group); None without a classifier head, or
    with one of other than the data's ``classes`` outputs (CLIP's projection, another label set)."""
    if not getattr(model, "num_classes", 0) or classes not in (None, model.num_classes):
        return None
    totals = classification_sums(model, loader, device, loss=False)
    correct, total = sum_over_ranks([totals[0].item(), totals[3].item()], device)
    return 100.0 * correct / max(1, total)


def top1_and_hits(
    model: nn.Module, loader: Iterable, device: torch.device, classes: int | None = None
) -> tuple[float | None, str | None]:
    """`evaluate_top1` and which images it got right, a ``0``/``1`` string over every rank's images in the val
    set's order: two models scored on the same images are paired image by image (McNemar), also where they
    were scored on other numbers of processes."""
    if not getattr(model, "num_classes", 0) or classes not in (None, model.num_classes):
        return None, None
    own = "".join("1" if h else "0" for h in per_image_top1(model, loader, device).tolist())
    hits = _in_image_order(gather_objects(own))
    return 100.0 * hits.count("1") / max(1, len(hits)), hits


def _in_image_order(per_rank: list[str]) -> str:
    """Every rank's hits interleaved back into the val set's order: its exact sampler gives rank r the images
    r, r + world, r + 2 world, ... (joined rank after rank, a string would depend on the world size). Shares
    of other lengths (a stream, which has no order to restore) stay joined in rank order."""
    world, total = len(per_rank), sum(len(h) for h in per_rank)
    if [len(h) for h in per_rank] != [len(range(r, total, world)) for r in range(world)]:
        return "".join(per_rank)
    hits = [""] * total
    for rank, own in enumerate(per_rank):
        hits[rank::world] = own
    return "".join(hits)


def _layer_counts(attn: nn.Module, tokens: int, batch: int):
    counter = getattr(attn, "operation_counts", None)
    if counter is None:  # timm's plain Attention is softmax attention
        return TransferAttention.operation_counts(attn, tokens, batch)
    return counter(tokens, batch)


def operation_counts(
    teacher: nn.Module, student: nn.Module, batch: int = 1, img_size: int | None = None
) -> dict[str, Any]:
    """Per block and in total, multiplications / additions of the student's and the teacher's attention cores
    at the teacher's token count (None for a layer that does not count its operations, and then the totals).
    A hierarchical model (PVTv2, Swin) is counted layer by layer at the tokens and calls (windows) each layer
    sees on one image of ``img_size``; ``tokens`` is then the per-layer list."""
    if flat_blocks(teacher) is None:
        return _hierarchical_counts(teacher, student, batch, img_size)
    tokens = _tokens(teacher)
    rows, totals = [], {"teacher": {}, "student": {}}
    for i, (t_blk, s_blk) in enumerate(zip(flat_blocks(teacher), flat_blocks(student), strict=True)):
        row = {"layer": i, "attention": attention_name_of(s_blk.attn)}
        for who, blk in (("teacher", t_blk), ("student", s_blk)):
            counts = _layer_counts(blk.attn, tokens, batch) if tokens else None
            _add_counts(row, totals, who, counts)
        rows.append(row)
    return {"tokens": tokens, "batch": batch, "layers": rows, "total": totals}


@torch.no_grad()
def attention_calls(model: nn.Module, img_size: int | None = None) -> list[tuple[int, int, int]]:
    """(tokens, calls, keys) of each attention layer on one image of ``img_size``: its sequence length, how many
    sequences (Swin: windows) one image makes, how many keys a query meets (PVTv2's spatial reduction)."""
    chans, *size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    size = (img_size, img_size) if img_size else tuple(size)
    seen: list[tuple[int, int, int]] = []

    def record(module, args, kwargs):
        tokens = args[0].shape[1]
        keys = module.key_count(tokens, module.call_grid(args, kwargs))  # the adapter's answer
        seen.append((tokens, args[0].shape[0], keys))

    hooks = [
        attn.register_forward_pre_hook(record, with_kwargs=True) for attn in transferable_attentions(model)
    ]
    try:
        with evaluating(model):
            model.forward_features(torch.zeros(1, chans, *size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _hierarchical_counts(teacher, student, batch: int, img_size: int | None) -> dict[str, Any]:
    rows, totals = [], {"teacher": {}, "student": {}}
    calls = {"teacher": attention_calls(teacher, img_size), "student": attention_calls(student, img_size)}
    attns = {"teacher": transferable_attentions(teacher), "student": transferable_attentions(student)}
    for i, s_attn in enumerate(attns["student"]):
        row = {"layer": i, "attention": attention_name_of(s_attn), "tokens": calls["student"][i][0]}
        for who in ("teacher", "student"):
            tokens, n, keys = calls[who][i]
            if keys != tokens and attns[who][i].map_kind is MapKind.SOFTMAX:
                # softmax over the reduced keys, per head (the sub-sampling conv is a projection and left out
                # like qkv and proj): q / sqrt(d), q k^T, the softmax, P v
                d = attns[who][i].head_dim
                per_head = (
                    OpCounts(mul=tokens * d)
                    + matmul_ops(tokens, d, keys)
                    + softmax_ops(tokens, keys)
                    + matmul_ops(tokens, keys, d)
                )
                counts = per_head * (batch * n * attns[who][i].num_heads)
            else:
                counts = _layer_counts(attns[who][i], tokens, batch * n)
            _add_counts(row, totals, who, counts)
        rows.append(row)
    return {"tokens": [r["tokens"] for r in rows], "batch": batch, "layers": rows, "total": totals}


def _add_counts(row: dict[str, Any], totals: dict[str, Any], who: str, counts: OpCounts | None) -> None:
    """``counts`` as the layer row's ``who`` entry, added to ``who``'s totals (None makes them None)."""
    row[who] = counts.to_dict() if counts is not None else None
    for key, value in (row[who] or {}).items():
        if totals[who] is not None:
            totals[who][key] = totals[who].get(key, 0) + value
    if counts is None:
        totals[who] = None


def _tokens(model: nn.Module) -> int | None:
    grid = image_input(model).grid if find_patch_embedding(model) is not None else ()
    return int(math.prod(grid)) + int(getattr(model, "num_prefix_tokens", 0) or 0) if grid else None
