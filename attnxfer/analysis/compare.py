"""Compare a teacher's attention with students' (and with itself on noisy inputs), layer by layer, head
by head. Maps are built one teacher layer and one row chunk at a time, so peak extra memory is one layer's
row chunk; whatever a family does around its attention (rope, windows, class attention, key reduction) is
timm's own forward. The result is plain data: ``dataclasses.asdict`` is what `attnxfer inspect` writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from ..models.attention import MapKind, TransferableAttention, attention_name_of, stage_of
from ..speak import progress_bar, warn
from ..transfer.plan import map_layers
from .geometry import layer_geometry
from .knn import evaluating
from .layer_sums import LayerWork, RowLayout, StudentSums, TeacherSums, walk_layer
from .layout import NotInspectable, inspectable_layers, token_layout
from .metrics import finite_mean, head_assignment
from .positions import RowPositions, cell_distances, row_positions
from .signals import LayerSignals, borrowed_signals, layer_qk

#: Per-head metrics of a (teacher, other) pair of maps: divergences, agreement of rows and of class-token maps.
PAIR_METRICS = ("kl", "js", "topk", "spearman", "cls_js", "cls_pearson")
_NOTES = {
    MapKind.SIGNED: "signed map: rows clipped at 0 and renormalised before comparing",
    MapKind.NONE: "no attention map (map kind none): nothing to compare",
}


@dataclass
class InspectedStudent:
    """A student and the teacher q/k its layers borrow: ``borrow[layer] = (teacher layer, "qk")``."""

    model: nn.Module
    borrow: dict[int, tuple[int, str]] = field(default_factory=dict)


@dataclass
class TeacherLayer:
    """One teacher layer: its own maps, and how far they move when the input gets a little noise (the floor);
    ``partition`` is where its rows sit (`LayerGeometry.label`: ``global``, ``4 windows``, ...)."""

    layer: int
    heads: int
    entropy: list[float]
    distance: list[float]
    floor: dict[str, list[float]]
    mean: dict[str, float]
    name: str = ""
    stage: str = ""
    partition: str = ""
    note: str = ""  # what was done to its maps before measuring (a signed map's rows clipped)


@dataclass
class LayerComparison:
    """One student layer against its teacher layer: per-head metrics, means, head assignment."""

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
    name: str = ""
    stage: str = ""


@dataclass
class Inspection:
    """Everything `compare_attention` measured, as plain data."""

    images: int
    floor_images: int
    settings: dict[str, Any]
    tokens: dict[str, Any]
    teacher: list[TeacherLayer]
    students: dict[str, list[LayerComparison]]


@dataclass(frozen=True)
class _Settings:
    """`compare_attention`'s keywords that shape the measurement."""

    topk: int
    noise: float
    floor_images: int | None
    probe_rows: int
    chunk: int | None


@torch.no_grad()
def compare_attention(
    teacher: nn.Module,
    students: Mapping[str, InspectedStudent | nn.Module],
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
    inputs with Gaussian noise of std ``noise`` (on the first ``floor_images`` images, None: all) as a floor
    that says what "close" means. Layers pair uniformly over different depths, as transfer plans do; a
    teacher with g× the student's heads is averaged in groups of g heads, as the distillation loss does.
    Top-k overlap, Spearman and head costs use ``probe_rows`` query rows per row batch (sorts are costly).
    """
    if not isinstance(students, Mapping) or isinstance(batches, torch.Tensor):
        raise TypeError(
            "compare_attention takes students as a mapping name -> model ({'student': model}) and batches as an "
            "iterable of (B, C, H, W) image batches ([images] for one batch)"
        )
    subjects = {n: s if isinstance(s, InspectedStudent) else InspectedStudent(s) for n, s in students.items()}
    if not subjects:
        raise InputError("compare_attention needs at least one student")
    comparison = _Comparison(teacher, subjects, _Settings(topk, noise, floor_images, probe_rows, chunk))
    bar = progress_bar(None, desc="inspect", unit="image", disable=not progress)
    with evaluating(teacher, *(s.model for s in subjects.values())), contextlib.closing(bar):
        for x in batches:
            x = x.to(comparison.device)
            if not x.shape[0]:
                continue  # an empty batch adds nothing
            comparison.add_batch(x)
            bar.update(x.shape[0])
    return comparison.inspection()


class _Comparison:
    """What `compare_attention` sums over the batches, per teacher layer and per student layer."""

    def __init__(
        self, teacher: nn.Module, subjects: Mapping[str, InspectedStudent], settings: _Settings
    ) -> None:
        self.teacher, self.subjects, self.settings = teacher, subjects, settings
        self.t_layers = inspectable_layers(teacher)
        depth_t = len(self.t_layers)
        depth = {n: len(inspectable_layers(s.model)) for n, s in subjects.items()}
        #: per student, its (student layer, teacher layer) pairs: uniform over different depths, as plans pair
        self.pairs = {n: map_layers(range(depth[n]), depth[n], depth_t) for n in subjects}
        self.t_acc = [TeacherSums() for _ in range(depth_t)]
        self.s_acc = {n: [StudentSums() for _ in range(depth[n])] for n in subjects}
        self.last: dict[str, list[LayerSignals]] = {}  # each student's signals on the latest batch
        self.noise_rng = torch.Generator(device="cpu").manual_seed(0)
        self.device = next(teacher.parameters()).device
        self.images = self.floor_seen = 0
        self.layout: dict[str, Any] | None = None
        self.positions: list[RowPositions | None] = []
        self.fewest_keys: int | None = None  # a row's keys, in the layer with fewest (a window's)

    def add_batch(self, x: torch.Tensor) -> None:
        """One batch: every model's signals, then each teacher layer with its floor and its students' layers."""
        if self.layout is None:
            self._read_layout(x)
        # how many of this batch's images the floor still takes
        limit = self.settings.floor_images
        n_floor = x.shape[0] if limit is None else max(0, min(x.shape[0], limit - self.floor_seen))
        t_sig = layer_qk(self.teacher, x)
        f_sig = None
        if n_floor:
            x_floor = x[:n_floor]
            noise = torch.randn(x_floor.shape, generator=self.noise_rng).to(x_floor)
            f_sig = layer_qk(self.teacher, x_floor + self.settings.noise * noise)
        s_sig = {n: layer_qk(s.model, x, borrowed_signals(s.borrow, t_sig)) for n, s in self.subjects.items()}
        for j in range(len(self.t_acc)):
            self._add_layer(j, x, t_sig, f_sig, s_sig)
        self.last = s_sig
        self.images += x.shape[0]
        self.floor_seen += n_floor

    def _read_layout(self, x: torch.Tensor) -> None:
        """On the first batch: the teacher's tokens (every student's must match) and row positions."""
        self.layout = token_layout(self.teacher, x.shape[-2:])
        tokens, k = self.layout["tokens"], self.settings.topk
        # every key of every layer's rows in the top k: the overlap is 1 whatever the maps
        if tokens is not None and k >= tokens:
            raise InputError(
                f"topk={k} is not below the teacher's {tokens} tokens: choose topk (--topk) below {tokens}"
            )
        self.positions = row_positions(self.teacher, x[:1])
        show = lambda lay: (
            f"{lay['prefix']} prefix + {'x'.join(map(str, lay['grid'])) or '?'} grid of "
            f"{'x'.join(map(str, lay['patch'])) or '?'} px patches"
        )
        for name, s in self.subjects.items():
            s_layout = token_layout(s.model, x.shape[-2:])
            if s_layout != self.layout:
                raise NotInspectable(
                    f"{name}: its tokens ({show(s_layout)}) differ from the teacher's ({show(self.layout)}): maps "
                    "can only be compared token for token; build both for the same input size and patch size"
                )

    def _add_layer(
        self,
        j: int,
        x: torch.Tensor,
        t_sig: list[LayerSignals],
        f_sig: list[LayerSignals] | None,
        s_sig: Mapping[str, list[LayerSignals]],
    ) -> None:
        """Teacher layer ``j`` on this batch, with the floor and every student layer paired with it."""
        acc = self.t_acc[j]
        mine = [(n, i) for n in self.subjects for i, tj in self.pairs[n] if tj == j]
        # a student layer's map must have the teacher layer's rows and keys, and heads that divide its
        for n, i in mine:
            sig = s_sig[n][i]
            (b, nq, nk), t_keys = sig.shape, t_sig[j].shape[2]
            if (b, nq) == t_sig[j].shape[:2] and nk == nq > t_keys:  # the teacher pools its keys (PVTv2's sr)
                raise NotInspectable(
                    f"{n}: layer {i} ({sig.name}) attends over all {nk} keys, the teacher's layer {j} over {t_keys} "
                    "pooled ones (a key reduction, which a conversion drops): inspect compares maps key for key "
                    "and does not pool a student's rows; a conversion's report.md gives their agreement with the "
                    "rows pooled onto the teacher's keys"
                )
            if sig.shape != t_sig[j].shape:
                raise NotInspectable(
                    f"{n}: layer {i} ({sig.name}) attends over {_shape_words(sig)}, the teacher's layer {j} "
                    f"({t_sig[j].name}) over {_shape_words(t_sig[j])}: maps can only be compared row for row; "
                    "give the student the teacher's token layout (grid, prefix tokens, windows, key reduction)"
                )
            if sig.kind.has_map and t_sig[j].heads % sig.heads:  # a mapless layer has no heads to pair
                raise NotInspectable(
                    f"{n}: {sig.heads} heads against the teacher's {t_sig[j].heads} (layer {i}): the teacher's "
                    "heads must be the student's or a whole multiple of them (its maps are then averaged in "
                    "groups, as the distillation loss does)"
                )
        if acc.geometry is None:
            acc.geometry = layer_geometry(t_sig[j], x.shape[0], self.layout)
        # a hierarchical layer's rows and keys on the image (`cell_distances`), where known: global ones too,
        # whose tokens need not be in raster order (Hiera's are still partly unrolled)
        pos, cells = self.positions[j], None
        if pos is not None and pos.matches(t_sig[j], x.shape[0]):
            cells = cell_distances(pos, tuple(x.shape[-2:]))
        self.fewest_keys = min(self.fewest_keys or t_sig[j].shape[2], t_sig[j].shape[2])
        lay = RowLayout(acc.geometry, t_sig[j].q.shape[-2], self.settings.probe_rows, self.device, cells)
        acc.probe_rows = int(lay.probe.numel())
        students = [(s_sig[n][i], self.s_acc[n][i]) for n, i in mine]
        work = LayerWork(t_sig[j], f_sig[j] if f_sig is not None else None, lay, students)
        walk_layer(work, acc, self.settings.topk, self.settings.chunk)

    def inspection(self) -> Inspection:
        """The sums as per-head means, layer means and head assignments."""
        if self.images == 0:
            raise InputError("no images to inspect: the image list (or dataset split) is empty")
        teacher_layers = [_teacher_result(j, self.t_layers[j], acc) for j, acc in enumerate(self.t_acc)]
        reports = {
            n: [_student_result(i, t, s, self.last[n][i], self.s_acc[n][i]) for i, t in self.pairs[n]]
            for n, s in self.subjects.items()
        }
        if self.fewest_keys is not None and self.settings.topk >= self.fewest_keys:
            warn(
                f"topk={self.settings.topk} is not below the {self.fewest_keys} keys a row attends to in some "
                "layers: there every key is in the top k, and the top-k overlap is 1 whatever the maps"
            )
        settings = {
            "topk": self.settings.topk,
            "noise": self.settings.noise,
            "probe_rows": max((a.probe_rows for a in self.t_acc), default=0),
            "head_cost": "js",
        }
        return Inspection(self.images, self.floor_seen, settings, self.layout, teacher_layers, reports)


def _shape_words(sig: LayerSignals) -> str:
    b, nq, nk = sig.shape
    return f"{b} row batches x {nq} queries x {nk} keys"


def _teacher_result(j: int, layer: tuple[str, TransferableAttention], acc: TeacherSums) -> TeacherLayer:
    name, attn = layer
    side, floor = acc.own.means(), acc.floor.means()
    mean = {k: finite_mean(v) for k, v in side.items()} | {
        f"floor_{k}": finite_mean(v) for k, v in floor.items()
    }
    heads = len(side.get("entropy", [])) or int(getattr(attn, "num_heads", 0))
    geometry = acc.geometry.label if acc.geometry is not None else ""
    return TeacherLayer(
        j,
        heads,
        side.get("entropy", []),
        side.get("distance", []),
        floor,
        mean,
        name,
        stage_of(name),
        geometry,
        _NOTES[MapKind.SIGNED] if getattr(attn, "map_kind", None) is MapKind.SIGNED else "",
    )


def _student_result(
    i: int, t: int, subject: InspectedStudent, sig: LayerSignals, acc: StudentSums
) -> LayerComparison:
    kind = sig.kind
    comp = LayerComparison(
        i,
        t,
        attention_name_of(sig.attn),
        str(sig.attn.map_kind),
        sig.heads,
        borrowed=str(subject.borrow.get(i, (0, ""))[1]),  # the letters (qk), as reports have always said it
        note=_NOTES.get(kind, ""),
        name=sig.name,
        stage=stage_of(sig.name),
    )
    if kind.has_map and acc.cost is not None:
        comp.metrics = acc.sums.means()
        comp.mean = {k: finite_mean(v) for k, v in comp.metrics.items()}
        cost = acc.cost / max(1, acc.cost_rows)
        comp.js_cost = cost.tolist()
        comp.assignment = head_assignment(cost)
    return comp
