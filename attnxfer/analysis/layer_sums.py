"""One teacher layer on one batch, a chunk of query rows at a time, reduced at once to per-head sums (its own,
the floor's, and every paired student layer's): peak extra memory is one row chunk of each map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models.attention.numerics import row_chunk, row_slices
from ..transfer.row_ce import grouped_mean
from .geometry import LayerGeometry
from .metrics import (
    attention_distance,
    patch_distances,
    pearson,
    renormalise,
    row_entropy,
    row_js,
    row_kl,
    spearman_rows,
    topk_overlap,
)
from .signals import LayerSignals


class HeadSums:
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


class RowLayout:
    """One layer's rows: class-token, patch and probe rows, and the patch distances in pixels."""

    def __init__(
        self,
        geometry: LayerGeometry,
        queries: int,
        probe_rows: int,
        device,
        cells: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.geometry = geometry
        #: a windowed or reduced layer's per-window distances and image keys (`cell_distances`), or None
        self.cells = None if cells is None else tuple(t.to(device) for t in cells)
        self.prefix = geometry.query_prefix
        self.key_prefix = geometry.prefix
        self.distances = (
            patch_distances(geometry.grid, geometry.patch, device=device)
            if geometry.kind == "global"
            else None
        )
        count = max(1, min(probe_rows, queries))
        probe = {0} | {round(v) for v in torch.linspace(self.prefix, queries - 1, max(1, count - 1)).tolist()}
        self.probe = torch.tensor(sorted(p for p in probe if p < queries), device=device)

    def probe_in(self, rows: slice) -> torch.Tensor:
        inside = self.probe[(self.probe >= rows.start) & (self.probe < rows.stop)]
        return inside - rows.start


def _compare_rows(
    sums: HeadSums,
    p: torch.Tensor,
    q: torch.Tensor,
    rows: slice,
    lay: RowLayout,
    topk: int,
) -> torch.Tensor:
    """Add the pair metrics of teacher rows ``p`` and other rows ``q`` to ``sums``; returns ``q``'s probe
    rows. Top-k overlap and rank correlation (sorts, the costly part) use the probe rows only."""
    sums.add("kl", row_kl(p, q))
    sums.add("js", row_js(p, q))
    probe = lay.probe_in(rows)
    pp, qp = p[:, :, probe], q[:, :, probe]
    sums.add("topk", topk_overlap(pp, qp, topk))
    sums.add("spearman", spearman_rows(pp, qp))
    if rows.start == 0 and lay.geometry.has_class_row:
        k0 = lay.key_prefix
        cp, cq = renormalise(p[:, :, 0, k0:]), renormalise(q[:, :, 0, k0:])
        sums.add("cls_js", row_js(cp, cq)[..., None])
        sums.add("cls_pearson", pearson(cp, cq)[..., None])
    return qp


def _side(sums: HeadSums, p: torch.Tensor, rows: slice, lay: RowLayout) -> None:
    """Add one model's row entropy and attention distance to ``sums``."""
    sums.add("entropy", row_entropy(p))
    if lay.cells is not None:  # rows of windows (or reduced keys): each row's and key's cell on the image
        d, image_keys = lay.cells
        b = p.shape[0] // d.shape[0]
        dist = d[:, rows].repeat(b, 1, 1)[:, None]
        sums.add("distance", attention_distance(p * image_keys.repeat(b, 1)[:, None, None], dist))
    elif lay.distances is not None:
        # the chunk's patch queries: their local rows, and their rows in the distance matrix
        lo = max(rows.start, lay.prefix)
        local = slice(lo - rows.start, rows.stop - rows.start)
        dist_rows = slice(lo - lay.prefix, rows.stop - lay.prefix)
        if local.stop > local.start:
            sums.add(
                "distance", attention_distance(p[:, :, local, lay.key_prefix :], lay.distances[dist_rows])
            )


@dataclass
class StudentSums:
    """What is accumulated for one student layer over the batches: its metrics and its head costs."""

    sums: HeadSums = field(default_factory=HeadSums)
    cost: torch.Tensor | None = None
    cost_rows: int = 0


@dataclass
class TeacherSums:
    """What is accumulated for one teacher layer: its own metrics and the noise floor's."""

    own: HeadSums = field(default_factory=HeadSums)
    floor: HeadSums = field(default_factory=HeadSums)
    geometry: LayerGeometry | None = None
    probe_rows: int = 0


@dataclass
class LayerWork:
    """One teacher layer on one batch: its signals, the floor's (None: no floor images left), students."""

    teacher: LayerSignals
    floor: LayerSignals | None
    lay: RowLayout
    students: list[tuple[LayerSignals, StudentSums]]


def _student_rows(
    sig: LayerSignals,
    acc: StudentSums,
    p: torch.Tensor,
    tp: torch.Tensor,
    rows,
    lay,
    topk,
) -> None:
    """One chunk of a student layer's rows against the teacher's ``p`` (probe rows ``tp``)."""
    a = sig.map_rows(rows)
    if a is None:
        return
    _side(acc.sums, a, rows, lay)
    p_bar = grouped_mean(p, p.shape[1] // a.shape[1])  # teacher heads averaged in groups, as the loss does
    ap = _compare_rows(acc.sums, p_bar, a, rows, lay, topk)
    # head costs: (teacher heads, student heads) summed JS of every teacher head's probe rows against every
    # student head's
    cost = torch.stack([row_js(tp[:, h : h + 1], ap).sum((0, 2)) for h in range(tp.shape[1])])
    acc.cost = cost.double().cpu() + (0 if acc.cost is None else acc.cost)
    acc.cost_rows += tp.shape[0] * tp.shape[2]


def walk_layer(work: LayerWork, acc: TeacherSums, topk: int, chunk: int | None) -> None:
    """One teacher layer, a row chunk at a time: its own metrics, the floor, its student layers."""
    t, lay = work.teacher, work.lay
    n = t.q.shape[-2]
    live = 12 + 3 * len(work.students)  # row_js's float64 rows: three more, twice the size
    step = row_chunk(t.q, t.k.shape[-2], chunk, live_tensors=live)
    for rows in row_slices(0, n, step):
        p = t.map_rows(rows)
        _side(acc.own, p, rows, lay)
        if work.floor is not None:
            pf = work.floor.map_rows(rows)
            b = pf.shape[0]
            _compare_rows(acc.floor, p[:b], pf, rows, lay, topk)
        tp = p[:, :, lay.probe_in(rows)]
        for sig, s_acc in work.students:
            _student_rows(sig, s_acc, p, tp, rows, lay, topk)
