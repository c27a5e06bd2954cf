"""Compare a teacher's attention with students' (and with itself on noisy inputs), layer by layer, head
by head, over batches of images.

Each batch runs every model once, keeping only each layer's (q, k) (O(N·d) per layer, never a map);
then, one teacher layer at a time, rows of the maps are built a chunk at a time through each layer's
``attention_map(q, k, rows)`` (exact softmax rows, or a zoo attention's implicit map) and reduced to
per-head sums at once. Peak extra memory is one layer's row chunk.

The result is plain data (`Inspection`, dataclasses of lists and floats): ``dataclasses.asdict`` is
the JSON that `attnxfer inspect` writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..models.attention import AttentionIO, MapKind, attention_io, attention_name_of, transfer_attentions
from ..models.attention.numerics import row_chunk, row_slices
from ..transfer.plan import map_layers
from .metrics import (
    attention_distance,
    attention_rollout,
    head_assignment,
    patch_distances,
    pearson,
    renormalise,
    row_entropy,
    row_js,
    row_kl,
    row_squared_error,
    spearman_rows,
    topk_overlap,
)

__all__ = [
    "PAIR_METRICS",
    "Inspection",
    "LayerComparison",
    "Subject",
    "TeacherLayer",
    "class_token_maps",
    "compare_attention",
    "iter_layer_qk",
    "layer_agreement",
    "layer_qk",
    "rollout_class_maps",
    "token_layout",
]

#: Per-head metrics of a (teacher, other) pair of maps: divergences, agreement of rows and of class-token maps.
PAIR_METRICS = ("kl", "js", "topk", "spearman", "cls_js", "cls_pearson")
#: Per-head properties of one model's maps.
SIDE_METRICS = ("entropy", "distance")


@dataclass
class Subject:
    """A student to inspect: the model and the teacher chunks its layers borrow at run time (attention copy:
    ``borrow[student layer] = (teacher layer, "qk")``); a borrowed q/k is what the layer attends with."""

    model: nn.Module
    borrow: dict[int, tuple[int, str]] = field(default_factory=dict)


@dataclass
class TeacherLayer:
    """One teacher layer: its own maps, and how far they move when the input gets a little noise (the floor)."""

    layer: int
    heads: int
    entropy: list[float]
    distance: list[float]
    floor: dict[str, list[float]]
    mean: dict[str, float]


@dataclass
class LayerComparison:
    """One student layer against its teacher layer: per-head metrics (lists over the student's heads),
    layer means, and the optimal head assignment by JS cost."""

    layer: int
    teacher_layer: int
    attention: str
    map_kind: str
    heads: int
    borrowed: str = ""
    note: str = ""
    metrics: dict[str, list[float]] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    js_cost: list[list[float]] = field(default_factory=list)
    assignment: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inspection:
    """Everything `compare_attention` measured, as plain data."""

    images: int
    floor_images: int
    settings: dict[str, Any]
    tokens: dict[str, Any]
    teacher: list[TeacherLayer]
    students: dict[str, list[LayerComparison]]


# ------------------------------------------------------------------------------------------- models
def token_layout(model: nn.Module) -> dict[str, Any]:
    """Prefix tokens, patch grid and patch size (pixels) of a timm ViT; a clear error for anything else."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "blocks"):
        raise TypeError(
            f"{type(model).__name__} is not a Vision Transformer (no patch_embed/blocks): attnxfer inspects "
            "timm VisionTransformer-style models"
        )
    transfer_attentions(model)
    grid = tuple(int(g) for g in pe.grid_size)
    patch = tuple(int(p) for p in pe.patch_size)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    return {"prefix": prefix, "grid": list(grid), "patch": list(patch), "tokens": prefix + math.prod(grid)}


@torch.no_grad()
def iter_layer_qk(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Block by block, the (q, k) each attention attends with on ``x``: its own, or the tensors
    ``borrow(layer)`` hands it (attention copy), which the layer uses in place of its own.

    A generator, so that a caller can walk several models in lockstep and hold one layer of each at a time
    (the stem and blocks of timm's ``forward_features``, without the final norm nobody reads here)."""
    attns = transfer_attentions(model)
    dtype = next(model.parameters()).dtype
    h = model.patch_embed(x.to(dtype))
    h = model.norm_pre(model.patch_drop(model._pos_embed(h)))
    for i, (block, attn) in enumerate(zip(model.blocks, attns)):
        io = AttentionIO(capture="qk", **dict(borrow(i) if borrow else {}))
        with attention_io(attn, io):
            h = block(h)
        yield {c: (io.override(c) if io.override(c) is not None else io.captured[c]) for c in "qk"}


def layer_qk(
    model: nn.Module, x: torch.Tensor, borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Per layer the (q, k) each attention attends with on ``x``: its own, or the borrowed tensors in
    ``borrow[layer]`` (attention copy), which the layer uses in place of its own. Holds every layer's q/k:
    walks that need one layer at a time use `iter_layer_qk`."""
    borrow = borrow or {}
    return list(iter_layer_qk(model, x, lambda i: borrow.get(i, {})))


class _TeacherLayers:
    """The teacher's per-layer q/k on one batch, produced on demand: a layer is kept only while it is being
    compared, or for the whole batch if a copy-mode student borrows it."""

    def __init__(self, layers: Iterator[dict[str, torch.Tensor]], borrowed: set[int]) -> None:
        self._layers, self._borrowed = layers, borrowed
        self._made: dict[int, dict[str, torch.Tensor]] = {}
        self._next = 0

    def get(self, j: int) -> dict[str, torch.Tensor]:
        while self._next <= j:
            self._made[self._next] = next(self._layers)
            self._next += 1
        return self._made[j]

    def done_with(self, j: int) -> None:
        if j not in self._borrowed:
            self._made.pop(j, None)

    def borrow_for(self, subject: Subject) -> Callable[[int], dict[str, torch.Tensor]]:
        """What ``subject``'s layer i attends with in place of its own q/k (its borrowed teacher chunks)."""

        def borrowed(i: int) -> dict[str, torch.Tensor]:
            if i not in subject.borrow:
                return {}
            t, chunks = subject.borrow[i]
            qk = self.get(t)
            return {c: qk[c] for c in chunks if c in "qk"}

        return borrowed


def _layer(layers: Iterator[tuple[int, dict[str, torch.Tensor]]], i: int) -> dict[str, torch.Tensor]:
    """The next layer of a model walked in depth order, which must be layer ``i``."""
    k, qk = next(layers)
    if k != i:
        raise RuntimeError(
            f"student layers must pair with teacher layers in depth order (got {k}, expected {i})"
        )
    return qk


def _check_pair(name: str, teacher: nn.Module, student: nn.Module, t_layout: dict) -> None:
    s_layout = token_layout(student)
    if s_layout != t_layout:
        raise ValueError(
            f"{name}: its tokens ({s_layout['prefix']} prefix + {'x'.join(map(str, s_layout['grid']))} grid of "
            f"{'x'.join(map(str, s_layout['patch']))} px patches) differ from the teacher's ({t_layout['prefix']} "
            f"prefix + {'x'.join(map(str, t_layout['grid']))} grid of {'x'.join(map(str, t_layout['patch']))} px "
            "patches): maps can only be compared token for token; build both for the same input size and patch size"
        )
    ht, hs = teacher.blocks[0].attn.num_heads, student.blocks[0].attn.num_heads
    if ht % hs:
        raise ValueError(
            f"{name}: {hs} heads against the teacher's {ht}: the teacher's heads must be the student's or a "
            "whole multiple of them (its maps are then averaged in groups, as the distillation loss does)"
        )


# ------------------------------------------------------------------------------------------- sums
class _Sums:
    """Per-head sums and counts of per-row values (NaN rows, e.g. constant rows in a rank correlation, skipped)."""

    def __init__(self) -> None:
        self.sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        """``values``: (B, H, ...) per-row values."""
        v = values.detach().double().flatten(2)
        ok = torch.isfinite(v)
        s = torch.where(ok, v, torch.zeros_like(v)).sum((0, 2)).cpu()
        n = ok.sum((0, 2)).double().cpu()
        self.sum[name] = self.sum.get(name, 0) + s
        self.count[name] = self.count.get(name, 0) + n

    def means(self) -> dict[str, list[float]]:
        return {
            k: [float(s / n) if n > 0 else math.nan for s, n in zip(self.sum[k], self.count[k])]
            for k in self.sum
        }


def _mean(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else math.nan


def _grouped(p: torch.Tensor, heads: int) -> torch.Tensor:
    """Teacher rows (B, H_t, R, N) averaged in contiguous groups down to ``heads`` (the loss's convention)."""
    b, ht, r, n = p.shape
    return p if ht == heads else p.reshape(b, heads, ht // heads, r, n).mean(2)


class _Layout:
    """Which rows are class-token, patch and probe rows, and the patch distances in pixels."""

    def __init__(self, layout: dict[str, Any], probe_rows: int, device) -> None:
        self.prefix, n = layout["prefix"], layout["tokens"]
        self.distances = patch_distances(layout["grid"], layout["patch"], device=device)
        count = max(1, min(probe_rows, n))
        probe = {0} | {round(v) for v in torch.linspace(self.prefix, n - 1, max(1, count - 1)).tolist()}
        self.probe = torch.tensor(sorted(probe), device=device)

    def probe_in(self, rows: slice) -> torch.Tensor:
        inside = self.probe[(self.probe >= rows.start) & (self.probe < rows.stop)]
        return inside - rows.start

    def patch_part(self, rows: slice) -> tuple[slice, slice]:
        """(local rows of patch queries within the chunk, their rows in the distance matrix)."""
        lo = max(rows.start, self.prefix)
        return slice(lo - rows.start, rows.stop - rows.start), slice(
            lo - self.prefix, rows.stop - self.prefix
        )


def _compare_rows(
    sums: _Sums,
    p: torch.Tensor,
    q: torch.Tensor,
    h_p: torch.Tensor,
    h_q: torch.Tensor,
    rows: slice,
    lay: _Layout,
    topk: int,
) -> torch.Tensor:
    """Add the pair metrics of teacher rows ``p`` and other rows ``q`` (B, H, R, N), whose row entropies
    are ``h_p``/``h_q``, to ``sums``; returns the probe rows of ``q`` (for head costs). Top-k overlap and
    rank correlation (sorts, the costly part) use the probe rows."""
    sums.add("kl", row_kl(p, q, h_p))
    sums.add("js", row_js(p, q, h_p, h_q))
    probe = lay.probe_in(rows)
    pp, qp = p[:, :, probe], q[:, :, probe]
    sums.add("topk", topk_overlap(pp, qp, topk))
    sums.add("spearman", spearman_rows(pp, qp))
    if rows.start == 0 and lay.prefix > 0:
        cp, cq = renormalise(p[:, :, 0, lay.prefix :]), renormalise(q[:, :, 0, lay.prefix :])
        sums.add("cls_js", row_js(cp, cq)[..., None])
        sums.add("cls_pearson", pearson(cp, cq)[..., None])
    return qp


def _side(sums: _Sums, p: torch.Tensor, rows: slice, lay: _Layout) -> torch.Tensor:
    """Add one model's row entropy and attention distance to ``sums``; returns the row entropies."""
    h = row_entropy(p)
    sums.add("entropy", h)
    local, dist_rows = lay.patch_part(rows)
    if local.stop > local.start:
        sums.add("distance", attention_distance(p[:, :, local, lay.prefix :], lay.distances[dist_rows]))
    return h


def _signed_note(kind: MapKind) -> str:
    if kind is MapKind.SIGNED:
        return "signed map: rows clipped at 0 and renormalised before comparing"
    if kind is MapKind.NONE:
        return "no attention map (map kind none): nothing to compare"
    return ""


# ------------------------------------------------------------------------------------------- the walk
@torch.no_grad()
def compare_attention(
    teacher: nn.Module,
    students: Mapping[str, Subject | nn.Module],
    batches: Iterable[torch.Tensor],
    *,
    topk: int = 5,
    noise: float = 0.1,
    floor_images: int | None = 16,
    probe_rows: int = 16,
    chunk: int | None = None,
    progress: bool = False,
) -> Inspection:
    """Per layer and head: each student's maps against the teacher's, and the teacher against itself on
    inputs with Gaussian noise of std ``noise`` (in normalised units; on the first ``floor_images`` images,
    None: all) as a floor that says what "close" means.

    Student layer i is paired with teacher layer i (different depths: uniformly, as transfer plans do);
    a teacher with g× the student's heads is averaged in contiguous groups of g heads (as the
    distillation loss does). Metrics: KL(P_t ‖ P_s), JS, top-``topk`` overlap, Spearman correlation
    (on ``probe_rows`` query rows per image: the class token and evenly spaced others), row entropy,
    mean attention distance in pixels (patch queries over patch keys), class-token map JS and Pearson
    correlation (over patches), and a Hungarian teacher↔student head assignment by JS on the probe rows.
    """
    subjects = {n: s if isinstance(s, Subject) else Subject(s) for n, s in students.items()}
    if not subjects:
        raise ValueError("compare_attention needs at least one student")
    t_layout = token_layout(teacher)
    for name, s in subjects.items():
        _check_pair(name, teacher, s.model, t_layout)
    t_attns = transfer_attentions(teacher)
    depth_t = len(t_attns)
    pairs = {
        n: map_layers(range(len(s.model.blocks)), len(s.model.blocks), depth_t) for n, s in subjects.items()
    }
    device = next(teacher.parameters()).device
    lay = _Layout(t_layout, probe_rows, device)
    t_sums = [_Sums() for _ in range(depth_t)]
    f_sums = [_Sums() for _ in range(depth_t)]
    s_sums = {n: [_Sums() for _ in s.model.blocks] for n, s in subjects.items()}
    costs: dict[str, list[torch.Tensor | None]] = {
        n: [None] * len(s.model.blocks) for n, s in subjects.items()
    }
    cost_rows: dict[str, list[int]] = {n: [0] * len(s.model.blocks) for n, s in subjects.items()}
    was = {id(m): m.training for m in [teacher, *(s.model for s in subjects.values())]}
    teacher.eval()
    for s in subjects.values():
        s.model.eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    borrowed = {t for s in subjects.values() for t, _ in s.borrow.values()}
    images = floor_seen = 0
    bar = tqdm(desc="inspect", unit="img", disable=not progress, leave=False)
    try:
        for x in batches:
            x = x.to(device)
            if x.shape[0] == 0:
                continue
            t_layers = _TeacherLayers(iter_layer_qk(teacher, x), borrowed)
            n_floor = (
                x.shape[0] if floor_images is None else max(0, min(x.shape[0], floor_images - floor_seen))
            )
            f_layers = None
            if n_floor:
                xn = x[:n_floor] + noise * torch.randn(x[:n_floor].shape, generator=gen).to(x)
                f_layers = iter_layer_qk(teacher, xn)
            s_layers = {
                n: enumerate(iter_layer_qk(s.model, x, t_layers.borrow_for(s))) for n, s in subjects.items()
            }
            for j, t_attn in enumerate(t_attns):
                # student layers paired with teacher layer j (consecutive, as plans pair them): one step each
                mine = {n: [i for i, tj in pairs[n] if tj == j] for n in subjects}
                s_qk = {n: {i: _layer(s_layers[n], i) for i in layers} for n, layers in mine.items()}
                _walk_layer(
                    j,
                    t_attn,
                    t_layers.get(j),
                    next(f_layers) if f_layers is not None else None,
                    subjects,
                    s_qk,
                    mine,
                    lay,
                    topk,
                    chunk,
                    t_sums[j],
                    f_sums[j],
                    s_sums,
                    costs,
                    cost_rows,
                )
                t_layers.done_with(j)
            images += x.shape[0]
            floor_seen += n_floor
            bar.update(x.shape[0])
    finally:
        bar.close()
        teacher.train(was[id(teacher)])
        for s in subjects.values():
            s.model.train(was[id(s.model)])
    if images == 0:
        raise ValueError("no images to inspect: the image list (or dataset split) is empty")
    teacher_layers = []
    for j, t_attn in enumerate(t_attns):
        side, floor = t_sums[j].means(), f_sums[j].means()
        mean = {k: _mean(v) for k, v in side.items()} | {f"floor_{k}": _mean(v) for k, v in floor.items()}
        teacher_layers.append(
            TeacherLayer(j, t_attn.num_heads, side.get("entropy", []), side.get("distance", []), floor, mean)
        )
    reports = {}
    for n, s in subjects.items():
        rows = []
        for i, t in pairs[n]:
            attn = s.model.blocks[i].attn
            kind = attn.map_kind if i not in s.borrow else MapKind.SOFTMAX
            comp = LayerComparison(
                i,
                t,
                attention_name_of(attn),
                str(attn.map_kind),
                attn.num_heads,
                borrowed=s.borrow.get(i, (0, ""))[1],
                note=_signed_note(kind),
            )
            if kind.has_map:
                comp.metrics = s_sums[n][i].means()
                comp.mean = {k: _mean(v) for k, v in comp.metrics.items()}
                cost = costs[n][i] / max(1, cost_rows[n][i])
                comp.js_cost = cost.tolist()
                comp.assignment = head_assignment(cost)
            rows.append(comp)
        reports[n] = rows
    settings = {"topk": topk, "noise": noise, "probe_rows": int(lay.probe.numel()), "head_cost": "js"}
    return Inspection(images, floor_seen, settings, t_layout, teacher_layers, reports)


def _student_rows(attn, qk: dict[str, torch.Tensor], rows: slice, borrowed: bool) -> torch.Tensor | None:
    kind = MapKind.SOFTMAX if borrowed else attn.map_kind
    if not kind.has_map:
        return None
    a = attn.attention_map(qk["q"], qk["k"], rows)
    return renormalise(a.clamp_min(0)) if kind is MapKind.SIGNED else a


def _walk_layer(
    j, t_attn, t_qk, f_qk, subjects, s_qk, mine, lay, topk, chunk, t_sums, f_sums, s_sums, costs, cost_rows
) -> None:
    """One teacher layer, a chunk of query rows at a time: the teacher's own metrics, the floor, and every
    student layer paired with it."""
    q_t, k_t = t_qk["q"], t_qk["k"]
    n = q_t.shape[-2]
    live = 6 + 3 * sum(len(v) for v in mine.values())
    step = row_chunk(q_t, n, chunk, live_tensors=live)
    for rows in row_slices(0, n, step):
        p = t_attn.attention_map(q_t, k_t, rows)
        h_p = _side(t_sums, p, rows, lay)
        if f_qk is not None:
            pf = t_attn.attention_map(f_qk["q"], f_qk["k"], rows)
            b = pf.shape[0]
            _compare_rows(f_sums, p[:b], pf, h_p[:b], row_entropy(pf), rows, lay, topk)
        tp = p[:, :, lay.probe_in(rows)]
        for name, layers in mine.items():
            subject = subjects[name]
            for i in layers:
                attn = subject.model.blocks[i].attn
                a = _student_rows(attn, s_qk[name][i], rows, i in subject.borrow)
                if a is None:
                    continue
                sums = s_sums[name][i]
                h_a = _side(sums, a, rows, lay)
                if a.shape[1] == p.shape[1]:
                    p_bar, h_bar = p, h_p
                else:
                    p_bar = _grouped(p, a.shape[1])
                    h_bar = row_entropy(p_bar)
                ap = _compare_rows(sums, p_bar, a, h_bar, h_a, rows, lay, topk)
                # head costs: every teacher head against every student head, on the probe rows
                h_ap = row_entropy(ap)
                cost = torch.stack(
                    [
                        row_js(tp[:, h : h + 1], ap, row_entropy(tp[:, h : h + 1]), h_ap).sum((0, 2))
                        for h in range(tp.shape[1])
                    ]
                )
                costs[name][i] = cost.double().cpu() + (0 if costs[name][i] is None else costs[name][i])
                cost_rows[name][i] += tp.shape[0] * tp.shape[2]


#: per-row agreement of teacher rows ``p`` with student rows ``a`` over ``n`` keys, by name
AGREEMENT_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "kl": lambda p, a, n: row_kl(p, a),
    "map_mse": lambda p, a, n: row_squared_error(p, a) / n,
}


def layer_agreement(
    t_attn, t_qk: Mapping[str, torch.Tensor], s_attn, s_qk: Mapping[str, torch.Tensor], metric: str = "kl"
) -> float:
    """One number for a student layer against its teacher layer, averaged over (batch, student head, query):
    ``kl`` (KL(P̄_t ‖ A_s), nats per row; teacher head groups averaged) or ``map_mse`` (mean squared map
    difference over entries). Built from rows a chunk at a time; what conversion reports measure."""
    if metric not in AGREEMENT_METRICS:
        raise ValueError(
            f"layer_agreement: metric must be one of {', '.join(AGREEMENT_METRICS)}, got {metric!r}"
        )
    per_row = AGREEMENT_METRICS[metric]
    q_t, k_t, q_s, k_s = t_qk["q"], t_qk["k"], s_qk["q"], s_qk["k"]
    n = q_t.shape[-2]
    if k_s.shape[-2] != n or q_s.shape[-2] != n or q_t.shape[1] % q_s.shape[1]:
        raise ValueError(
            f"teacher and student attention shapes differ: q {tuple(q_t.shape)} vs {tuple(q_s.shape)}; "
            "the student needs the teacher's tokens, and heads that divide the teacher's"
        )
    step = row_chunk(q_t, n, live_tensors=4)
    total, count = 0.0, 0
    for rows in row_slices(0, n, step):
        p = _grouped(t_attn.attention_map(q_t, k_t, rows), q_s.shape[1])
        a = s_attn.attention_map(q_s, k_s, rows)
        v = per_row(p, a, n)
        total += float(v.double().sum())
        count += v.numel()
    return total / max(1, count)


@torch.no_grad()
def class_token_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: list[dict[str, torch.Tensor]] | None = None,
) -> list[torch.Tensor | None]:
    """Per layer the class token's attention over the patches, (B, H, grid_h, grid_w), rows renormalised
    over patch keys (signed maps clipped at 0 first); None for layers without a map or models without a
    class token. Borrowed q/k (attention copy) are what the layer attends with; ``qk``: `layer_qk`'s output
    for ``x`` if already computed."""
    lay = token_layout(model)
    if lay["prefix"] == 0:
        return [None] * len(model.blocks)
    out = []
    qk = qk if qk is not None else layer_qk(model, x, borrow)
    for attn, layer in zip(transfer_attentions(model), qk):
        borrowed = bool(borrow) and len(out) in borrow
        if not (borrowed or attn.map_kind.has_map):
            out.append(None)
            continue
        row = attn.attention_map(layer["q"], layer["k"], slice(0, 1))[:, :, 0, lay["prefix"] :].clamp_min(0)
        out.append(renormalise(row).reshape(*row.shape[:2], *lay["grid"]).float().cpu())
    return out


@torch.no_grad()
def rollout_class_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: list[dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The class token's row of the attention rollout over the patches, (B, grid_h, grid_w), renormalised.
    Builds each layer's whole head-averaged map: meant for the few images of a picture."""
    lay = token_layout(model)
    if lay["prefix"] == 0:
        raise ValueError("attention rollout of the class token needs a model with a class token")
    maps = []
    qk = qk if qk is not None else layer_qk(model, x, borrow)
    for i, (attn, layer) in enumerate(zip(transfer_attentions(model), qk)):
        borrowed = bool(borrow) and i in borrow
        if not (borrowed or attn.map_kind.has_map):
            maps.append(None)
            continue
        maps.append(attn.attention_map(layer["q"], layer["k"]).clamp_min(0).mean(1))
    rolled = attention_rollout(maps)[:, 0, lay["prefix"] :]
    return renormalise(rolled).reshape(rolled.shape[0], *lay["grid"]).float().cpu()
