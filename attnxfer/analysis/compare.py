"""Compare a teacher's attention with students' (and with itself on noisy inputs), layer by layer, head
by head, over batches of images.

Each batch runs every model's own timm forward once with a capturing `AttentionIO` on each attention
layer (`attnxfer.models.attention.run_with_ios`), keeping only what the layer's logits are made of —
``logit_scale · q kᵀ + logit_bias`` over the layer's own key set, the model's attention mask folded into
the bias (`LayerSignals`), never a map. Then, one teacher layer at a time, rows of the maps are built a
chunk at a time and reduced to per-head sums at once. Peak extra memory is one layer's row chunk (a bias
gathered from a relative-position table is taken a row chunk at a time too, as `BiasRows`; one that is a
tensor already, Swin's window bias with its shift mask, stays as captured: the size of one layer's logits).

Whatever a family does around its attention is timm's: rope, relative-position biases, SAM's windows
(a windowed layer's rows are rows of a batch of windows), CaiT's class-attention blocks (one query row
over the class token and the patches), spatial reduction (fewer keys than queries), padding masks.
Where a layer's rows sit on the image (`LayerGeometry`) is read from its shapes: the class-token map,
attention distance and rollout use the layers that see the whole grid; the rest are compared row for row.

The result is plain data (`Inspection`, dataclasses of lists and floats): ``dataclasses.asdict`` is
the JSON that `attnxfer inspect` writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..models.attention import (
    AttentionIO,
    MapKind,
    TransferableAttention,
    attention_layers,
    attention_name_of,
    run_with_ios,
)
from ..models.attention.bias_rows import BiasRows, bias_block
from ..models.attention.numerics import fp32_section, row_chunk, row_slices, upcast
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
from .positions import cell_distances, row_positions

__all__ = [
    "PAIR_METRICS",
    "Inspection",
    "LayerComparison",
    "LayerGeometry",
    "LayerSignals",
    "NotInspectable",
    "Subject",
    "TeacherLayer",
    "class_token_maps",
    "compare_attention",
    "has_rollout",
    "input_size",
    "iter_layer_qk",
    "layer_agreement",
    "layer_geometry",
    "layer_qk",
    "rollout_class_maps",
    "stage_of",
    "token_layout",
    "token_maps",
]

#: Per-head metrics of a (teacher, other) pair of maps: divergences, agreement of rows and of class-token maps.
PAIR_METRICS = ("kl", "js", "topk", "spearman", "cls_js", "cls_pearson")
#: Per-head properties of one model's maps.
SIDE_METRICS = ("entropy", "distance")


class NotInspectable(InputError, TypeError):
    """A model (or a teacher/student pair) that cannot be inspected: the message says why and what to do."""


@dataclass
class Subject:
    """A student to inspect: the model and the teacher chunks its layers borrow at run time (attention copy:
    ``borrow[student layer] = (teacher layer, "qk")``); a borrowed q/k is what the layer attends with."""

    model: nn.Module
    borrow: dict[int, tuple[int, str]] = field(default_factory=dict)


@dataclass
class TeacherLayer:
    """One teacher layer: its own maps, and how far they move when the input gets a little noise (the floor).
    ``name`` is the attention's module name, ``stage`` its group (`stage_of`), ``partition`` where its rows
    sit (`LayerGeometry.label`: ``global``, ``class attention``, ``4 windows``, ``reduced keys``)."""

    layer: int
    heads: int
    entropy: list[float]
    distance: list[float]
    floor: dict[str, list[float]]
    mean: dict[str, float]
    name: str = ""
    stage: str = ""
    partition: str = ""


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


# ------------------------------------------------------------------------------------------- models
def _stem(model: nn.Module) -> nn.Module | None:
    """The module that cuts images into patch tokens: the first ``patch_embed`` (most families; under
    ``encoder`` in VLM encoders), ``embeds`` (NaFlexViT) or the first of ``patch_embeds`` (Twins: one per
    stage)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("patch_embed", "embeds") or name.endswith("patch_embeds.0"):
            return module
    return None


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    return (value[0], value[1]) if len(value) >= 2 else (value[0], value[0])


def input_size(model: nn.Module) -> tuple[tuple[int, int], int]:
    """((height, width), channels) of the images ``model`` takes: its stem's, else its pretrained config's."""
    stem = _stem(model)
    cfg = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    size = _pair(getattr(stem, "img_size", None) or getattr(stem, "default_img_size", None)) or _pair(cfg[1:])
    proj = getattr(stem, "proj", None)
    chans = getattr(stem, "in_chans", None) or getattr(proj, "in_channels", None) or cfg[0]
    return size, int(chans)


def token_layout(model: nn.Module, image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Prefix tokens (timm's ``num_prefix_tokens``: class and register tokens), patch grid and patch size
    (pixels) of a timm vision transformer for images of ``image_size`` (default: the model's). Any family
    with attention adapters; `NotInspectable` (one message: what has no adapter, or is refused, and why)
    for anything else. ``grid`` is empty where the stem has none to read (the layers' shapes still say
    which rows are whole-image ones)."""
    try:
        attention_layers(model)
    except TypeError as err:
        raise NotInspectable(f"cannot inspect {type(model).__name__}: {err}") from None
    stem = _stem(model)
    proj = getattr(stem, "proj", None)
    # a conv stem's stride is the patch pitch (overlapping patch embeddings: PVTv2's 7x7 convs of stride 4)
    patch = _pair(proj.stride if isinstance(proj, nn.Conv2d) else getattr(stem, "patch_size", None))
    grid = _pair(getattr(stem, "grid_size", None))
    if (
        image_size is not None
        and patch is not None
        and (grid is None or getattr(stem, "dynamic_img_size", 0))
    ):
        grid = (int(image_size[0]) // patch[0], int(image_size[1]) // patch[1])
    elif grid is None and patch is not None:
        (h, w), _ = input_size(model)
        grid = (h // patch[0], w // patch[1])
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if grid is None or patch is None:
        return {"prefix": prefix, "grid": [], "patch": [], "tokens": None}
    return {"prefix": prefix, "grid": list(grid), "patch": list(patch), "tokens": prefix + math.prod(grid)}


def stage_of(name: str) -> str:
    """The group an attention layer belongs to, from its module name: everything before the block index
    (``layers.0.blocks.1.attn`` -> ``layers.0.blocks``, ``stages.2.blocks.0.attn`` -> ``stages.2.blocks``,
    ``blocks.3.attn`` -> ``blocks``, ``blocks_token_only.0.attn`` -> ``blocks_token_only``)."""
    parts = name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: numeric[-1]]) if numeric else ""


@dataclass
class LayerSignals:
    """What one attention layer attended with on one batch: its logits are ``scale · q kᵀ + bias`` over
    its own key set, q (B', H, N_q, d) and k (B', H, N_k, d) as they enter them (after q/k norms and rope;
    B' is the images, or images × windows), ``bias`` the additive term (relative-position bias, the
    model's attention mask; None: none), as a tensor or as `BiasRows` (rows taken a chunk at a time: a
    bias gathered from a table is never held whole). ``borrowed``: q and k are a teacher's (attention copy), so the
    map is a softmax one whatever the layer's own kind. Indexable like a dict (``signals["q"]``)."""

    name: str
    attn: TransferableAttention
    q: torch.Tensor
    k: torch.Tensor
    bias: torch.Tensor | BiasRows | None = None
    borrowed: bool = False

    def __getitem__(self, key: str) -> torch.Tensor | None:
        if key not in ("q", "k", "bias"):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self[key] if key in ("q", "k", "bias") else None
        return default if value is None else value

    @property
    def kind(self) -> MapKind:
        return MapKind.SOFTMAX if self.borrowed else self.attn.map_kind

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B', N_q, N_k): rows of a batch, queries, keys."""
        return self.q.shape[0], self.q.shape[-2], self.k.shape[-2]

    def map_rows(self, rows: slice | None = None) -> torch.Tensor | None:
        """Rows of the layer's map, (B', H, len(rows), N_k) in fp32 (float64 stays): softmax layers (and
        borrowed q/k) from their logits with the bias; other attentions through their ``attention_map``;
        signed maps clipped at 0 and renormalised; None for an attention without a map."""
        kind = self.kind
        if not kind.has_map:
            return None
        if kind is MapKind.SOFTMAX:
            a = _softmax_rows(self.q, self.k, self.bias, self.attn.logit_scale(self.q), rows)
        else:
            a = self.attn.attention_map(self.q, self.k, rows)
        return renormalise(a.clamp_min(0)) if kind is MapKind.SIGNED else a


def _softmax_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | BiasRows | None,
    scale: float,
    rows: slice | None,
) -> torch.Tensor:
    """softmax(scale · q[rows] kᵀ + bias[rows]) in fp32 (float64 stays). A bias broadcasts over batch,
    heads or queries where it has size 1 there; `BiasRows` hand out only the chunk's rows."""
    rows = rows or slice(0, q.shape[-2])
    with fp32_section(q.device.type):
        q, k = upcast(q[:, :, rows], k)
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + _bias_rows(bias, rows).to(logits.dtype)
        return logits.softmax(-1)


def _bias_rows(bias: torch.Tensor | BiasRows, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of a bias (a tensor with size 1 over queries broadcasts: it is returned whole)."""
    return bias if isinstance(bias, torch.Tensor) and bias.shape[-2] == 1 else bias_block(bias, rows)


def _with_mask(
    bias: torch.Tensor | BiasRows | None, mask: torch.Tensor | None
) -> torch.Tensor | BiasRows | None:
    """The logit bias with the model's additive attention mask folded in, still a chunk of rows at a time
    where the bias is `BiasRows` (nothing is built whole that was not whole already)."""
    if mask is None or bias is None:
        return bias if mask is None else mask
    if isinstance(bias, torch.Tensor):
        return bias + mask
    shape = tuple(torch.broadcast_shapes(bias.shape, mask.shape))
    return BiasRows(_masked_rows(bias), (*bias.inputs, mask), shape)


def _masked_rows(bias: BiasRows):
    def rows_fn(rows: slice, *inputs: torch.Tensor) -> torch.Tensor:
        *own, mask = inputs
        return bias.rows_fn(rows, *own) + _bias_rows(mask, rows)

    return rows_fn


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """timm's ``attn_mask`` as an additive term (bool: True = attend)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


@torch.no_grad()
def layer_qk(
    model: nn.Module, x: torch.Tensor, borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None
) -> list[LayerSignals]:
    """Per attention layer (forward order) what it attends with on images ``x`` (`LayerSignals`): its own
    q/k and logit bias, or the tensors in ``borrow[layer]`` (attention copy: ``q``, ``k`` and, with both,
    the teacher's ``bias``), which the layer uses in place of its own. One run of the model's own forward
    (`run_with_ios`), stopped inside the last attention layer once it has captured; holds every layer's q/k."""
    layers = attention_layers(model)
    borrow = borrow or {}
    ios: dict[int, AttentionIO] = {}
    for i in range(len(layers)):
        given = {c: t for c, t in (borrow.get(i) or {}).items() if c in "qk" and t is not None}
        io = AttentionIO(capture="" if len(given) == 2 else "qk", **given)
        if len(given) == 2:
            io.bias = (borrow.get(i) or {}).get("bias")
        ios[i] = io
    if ios:  # nothing after the last attention is read: its core, MLP, neck and head are skipped
        ios[len(layers) - 1].stop = True
    masks: dict[int, torch.Tensor] = {}
    dtype = next(model.parameters()).dtype
    run_with_ios(model, x.to(dtype), ios, masks=masks)
    out = []
    for i, (name, attn) in enumerate(layers):
        io = ios[i]
        if not io.captured and io.q is None:
            raise RuntimeError(f"{name} did not run in {type(model).__name__}'s forward: nothing to inspect")
        q = io.q if io.q is not None else io.captured["q"]
        k = io.k if io.k is not None else io.captured["k"]
        # a captured bias comes as `BiasRows`: kept so, the maps take it a row chunk at a time
        bias = io.bias if io.q is not None and io.k is not None else io.captured.get("bias")
        mask = _additive(masks.get(i), q.dtype if q.is_floating_point() else torch.float32)
        bias = _with_mask(bias, mask)
        out.append(LayerSignals(name, attn, q, k, bias, borrowed=io.q is not None or io.k is not None))
    return out


def iter_layer_qk(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
) -> Iterator[LayerSignals]:
    """`layer_qk` one layer at a time (``borrow(layer)``: the tensors that layer attends with in place of
    its own). The model's forward runs once, whole: every layer's signals exist before the first is seen."""
    n = len(attention_layers(model))
    yield from layer_qk(model, x, {i: borrow(i) for i in range(n)} if borrow else None)


@dataclass(frozen=True)
class LayerGeometry:
    """Where one layer's query rows and keys sit on the image, read from its shapes on a batch of images.

    ``kind``: ``global`` (queries and keys are the prefix tokens and the whole patch grid, or a stage's
    coarser grid), ``class`` (class attention: the queries are prefix tokens, the keys prefix + grid),
    ``windows`` (rows of a batch of windows), ``reduced`` (fewer keys than queries: spatial reduction) or
    ``other``. ``prefix``: prefix keys before the grid's; ``grid`` and ``patch`` (px) of the keys."""

    kind: str
    prefix: int = 0
    grid: tuple[int, int] | None = None
    patch: tuple[float, float] | None = None
    windows: int = 0

    @property
    def whole(self) -> bool:
        """Keys are the whole image (prefix + grid)."""
        return self.kind in ("global", "class")

    @property
    def has_class_row(self) -> bool:
        """Query row 0 is the class token and its keys cover the grid."""
        return self.whole and self.prefix >= 1

    @property
    def query_prefix(self) -> int:
        """Query rows before the patch queries (all of them for class attention; 0 without a grid)."""
        return self.prefix if self.kind == "global" else 0

    @property
    def label(self) -> str:
        return {
            "global": "global",
            "class": "class attention",
            "windows": f"{self.windows} windows",
            "reduced": "reduced keys",
        }.get(self.kind, "partitioned")


def layer_geometry(sig: LayerSignals, images: int, layout: Mapping[str, Any]) -> LayerGeometry:
    """`LayerGeometry` of ``sig`` for a batch of ``images`` whose model has ``layout`` (`token_layout`)."""
    b, nq, nk = sig.shape
    if b != images:
        return LayerGeometry("windows" if b % images == 0 else "other", windows=b // images)
    if nk < nq:
        return LayerGeometry("reduced")
    if not layout.get("grid"):
        return LayerGeometry("other")
    (gh, gw), (ph, pw) = layout["grid"], layout["patch"]
    if gh * gw <= nk <= gh * gw + max(1, layout.get("prefix", 0)):  # prefix keys: the model's, or one
        prefix = nk - gh * gw
        if nq == nk:
            return LayerGeometry("global", prefix, (gh, gw), (ph, pw))
        if nq <= prefix:
            return LayerGeometry("class", prefix, (gh, gw), (ph, pw))
    elif nq == nk and (gh * gw) % nk == 0:  # a later stage's coarser grid (hierarchical models)
        f = math.isqrt((gh * gw) // nk)
        if f * f * nk == gh * gw and gh % f == 0 and gw % f == 0:
            return LayerGeometry("global", 0, (gh // f, gw // f), (ph * f, pw * f))
    return LayerGeometry("other")


def _check_pair(name: str, s_layout: dict, t_layout: dict) -> None:
    if s_layout != t_layout:
        show = lambda lay: (
            f"{lay['prefix']} prefix + {'x'.join(map(str, lay['grid'])) or '?'} grid of "
            f"{'x'.join(map(str, lay['patch'])) or '?'} px patches"
        )
        raise NotInspectable(
            f"{name}: its tokens ({show(s_layout)}) differ from the teacher's ({show(t_layout)}): maps can "
            "only be compared token for token; build both for the same input size and patch size"
        )


def _check_layer(name: str, i: int, sig: LayerSignals, j: int, t_sig: LayerSignals) -> None:
    """A student layer's map must have the teacher layer's rows and keys, and heads that divide its."""
    if sig.shape != t_sig.shape:
        raise NotInspectable(
            f"{name}: layer {i} ({sig.name}) attends over {_shape_words(sig)}, the teacher's layer {j} "
            f"({t_sig.name}) over {_shape_words(t_sig)}: maps can only be compared row for row; give the "
            "student the teacher's token layout (grid, prefix tokens, windows, key reduction)"
        )
    if t_sig.heads % sig.heads:
        raise NotInspectable(
            f"{name}: {sig.heads} heads against the teacher's {t_sig.heads} (layer {i}): the teacher's heads "
            "must be the student's or a whole multiple of them (its maps are then averaged in groups, as "
            "the distillation loss does)"
        )


def _shape_words(sig: LayerSignals) -> str:
    b, nq, nk = sig.shape
    return f"{b} row batches x {nq} queries x {nk} keys"


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
    """One layer's rows: which are class-token, patch and probe rows, and the patch distances in pixels
    (where its geometry has a grid)."""

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
        n = queries
        count = max(1, min(probe_rows, n))
        probe = {0} | {round(v) for v in torch.linspace(self.prefix, n - 1, max(1, count - 1)).tolist()}
        self.probe = torch.tensor(sorted(p for p in probe if p < n), device=device)

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
    if rows.start == 0 and lay.geometry.has_class_row:
        k0 = lay.key_prefix
        cp, cq = renormalise(p[:, :, 0, k0:]), renormalise(q[:, :, 0, k0:])
        sums.add("cls_js", row_js(cp, cq)[..., None])
        sums.add("cls_pearson", pearson(cp, cq)[..., None])
    return qp


def _side(sums: _Sums, p: torch.Tensor, rows: slice, lay: _Layout) -> torch.Tensor:
    """Add one model's row entropy and attention distance to ``sums``; returns the row entropies."""
    h = row_entropy(p)
    sums.add("entropy", h)
    if lay.cells is not None:  # rows of windows (or reduced keys): each row's and key's cell on the image
        d, image_keys = lay.cells
        b = p.shape[0] // d.shape[0]
        dist = d[:, rows].repeat(b, 1, 1)[:, None]
        sums.add("distance", attention_distance(p * image_keys.repeat(b, 1)[:, None, None], dist))
    elif lay.distances is not None:
        local, dist_rows = lay.patch_part(rows)
        if local.stop > local.start:
            sums.add(
                "distance", attention_distance(p[:, :, local, lay.key_prefix :], lay.distances[dist_rows])
            )
    return h


def _signed_note(kind: MapKind) -> str:
    if kind is MapKind.SIGNED:
        return "signed map: rows clipped at 0 and renormalised before comparing"
    if kind is MapKind.NONE:
        return "no attention map (map kind none): nothing to compare"
    return ""


# ------------------------------------------------------------------------------------------- one layer
@dataclass
class _StudentLayer:
    """What is accumulated for one student layer over the batches: its metrics and its head costs."""

    sums: _Sums = field(default_factory=_Sums)
    cost: torch.Tensor | None = None
    cost_rows: int = 0

    def add_cost(self, cost: torch.Tensor, rows: int) -> None:
        self.cost = cost.double().cpu() + (0 if self.cost is None else self.cost)
        self.cost_rows += rows


@dataclass
class _TeacherSums:
    """What is accumulated for one teacher layer: its own metrics and the noise floor's."""

    own: _Sums = field(default_factory=_Sums)
    floor: _Sums = field(default_factory=_Sums)
    geometry: LayerGeometry | None = None
    probe_rows: int = 0


@dataclass
class _LayerWork:
    """One teacher layer on one batch: its signals, the floor's (noisy inputs; None: no floor images left),
    and the student layers paired with it ([(student layer signals, its accumulator)])."""

    teacher: LayerSignals
    floor: LayerSignals | None
    lay: _Layout
    students: list[tuple[LayerSignals, _StudentLayer]]


def _head_costs(tp: torch.Tensor, ap: torch.Tensor) -> torch.Tensor:
    """(teacher heads, student heads) summed JS of every teacher head's probe rows ``tp`` against every
    student head's ``ap``."""
    h_ap = row_entropy(ap)
    return torch.stack(
        [
            row_js(tp[:, h : h + 1], ap, row_entropy(tp[:, h : h + 1]), h_ap).sum((0, 2))
            for h in range(tp.shape[1])
        ]
    )


def _student_rows(
    sig: LayerSignals,
    acc: _StudentLayer,
    p: torch.Tensor,
    h_p: torch.Tensor,
    tp: torch.Tensor,
    rows,
    lay,
    topk,
) -> None:
    """One chunk of a student layer's rows against the teacher's ``p`` (entropies ``h_p``, probe rows ``tp``)."""
    a = sig.map_rows(rows)
    if a is None:
        return
    h_a = _side(acc.sums, a, rows, lay)
    p_bar, h_bar = (p, h_p) if a.shape[1] == p.shape[1] else (_grouped(p, a.shape[1]), None)
    if h_bar is None:
        h_bar = row_entropy(p_bar)
    ap = _compare_rows(acc.sums, p_bar, a, h_bar, h_a, rows, lay, topk)
    acc.add_cost(_head_costs(tp, ap), tp.shape[0] * tp.shape[2])


def _walk_layer(work: _LayerWork, acc: _TeacherSums, topk: int, chunk: int | None) -> None:
    """One teacher layer, a chunk of query rows at a time: the teacher's own metrics, the floor, and every
    student layer paired with it."""
    t, lay = work.teacher, work.lay
    n = t.q.shape[-2]
    live = 6 + 3 * len(work.students)
    step = row_chunk(t.q, t.k.shape[-2], chunk, live_tensors=live)
    for rows in row_slices(0, n, step):
        p = t.map_rows(rows)
        h_p = _side(acc.own, p, rows, lay)
        if work.floor is not None:
            pf = work.floor.map_rows(rows)
            b = pf.shape[0]
            _compare_rows(acc.floor, p[:b], pf, h_p[:b], row_entropy(pf), rows, lay, topk)
        tp = p[:, :, lay.probe_in(rows)]
        for sig, s_acc in work.students:
            _student_rows(sig, s_acc, p, h_p, tp, rows, lay, topk)


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

    Layers are the models' attention layers in forward order (`attention_layers`: any family with
    adapters). Student layer i is paired with teacher layer i (different depths: uniformly, as transfer
    plans do); a teacher with g× the student's heads is averaged in contiguous groups of g heads (as the
    distillation loss does). Paired layers must attend over the same rows and keys (windows, key
    reduction and all). Metrics: KL(P_t ‖ P_s), JS, top-``topk`` overlap, Spearman correlation (on
    ``probe_rows`` query rows per row batch: the first and evenly spaced others), row entropy, and where
    the layer sees the whole grid mean attention distance in pixels (patch queries over patch keys) and
    class-token map JS and Pearson correlation (over patches); a Hungarian teacher↔student head
    assignment by JS on the probe rows.
    """
    subjects = {n: s if isinstance(s, Subject) else Subject(s) for n, s in students.items()}
    if not subjects:
        raise InputError("compare_attention needs at least one student")
    t_names = [name for name, _ in _layers(teacher)]
    depth_t = len(t_names)
    depth = {n: len(_layers(s.model)) for n, s in subjects.items()}
    pairs = {n: map_layers(range(depth[n]), depth[n], depth_t) for n in subjects}
    t_acc = [_TeacherSums() for _ in range(depth_t)]
    s_acc = {n: [_StudentLayer() for _ in range(depth[n])] for n in subjects}
    last: dict[str, list[LayerSignals]] = {}
    was = {id(m): m.training for m in [teacher, *(s.model for s in subjects.values())]}
    teacher.eval()
    for s in subjects.values():
        s.model.eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    device = next(teacher.parameters()).device
    images = floor_seen = 0
    t_layout: dict[str, Any] | None = None
    t_pos: list = []
    bar = tqdm(desc="inspect", unit="img", disable=not progress, leave=False)
    try:
        for x in batches:
            x = x.to(device)
            if x.shape[0] == 0:
                continue
            if t_layout is None:
                t_layout = token_layout(teacher, x.shape[-2:])
                t_pos = row_positions(teacher, x[:1])  # where windowed and reduced rows sit (distance)
                for name, s in subjects.items():
                    _check_pair(name, token_layout(s.model, x.shape[-2:]), t_layout)
            n_floor = (
                x.shape[0] if floor_images is None else max(0, min(x.shape[0], floor_images - floor_seen))
            )
            t_sig = layer_qk(teacher, x)
            f_sig = None
            if n_floor:
                xn = x[:n_floor] + noise * torch.randn(x[:n_floor].shape, generator=gen).to(x)
                f_sig = layer_qk(teacher, xn)
            s_sig = {n: layer_qk(s.model, x, _borrowed(s, t_sig)) for n, s in subjects.items()}
            for j, acc in enumerate(t_acc):
                mine = [(n, i) for n in subjects for i, tj in pairs[n] if tj == j]
                for n, i in mine:
                    _check_layer(n, i, s_sig[n][i], j, t_sig[j])
                if acc.geometry is None:
                    acc.geometry = layer_geometry(t_sig[j], x.shape[0], t_layout)
                pos = t_pos[j]
                cells = (
                    cell_distances(pos, tuple(x.shape[-2:]))
                    if pos is not None and acc.geometry.kind != "global" and pos.matches(t_sig[j], x.shape[0])
                    else None
                )
                lay = _Layout(acc.geometry, t_sig[j].q.shape[-2], probe_rows, device, cells)
                acc.probe_rows = int(lay.probe.numel())
                work = _LayerWork(
                    t_sig[j],
                    f_sig[j] if f_sig is not None else None,
                    lay,
                    [(s_sig[n][i], s_acc[n][i]) for n, i in mine],
                )
                _walk_layer(work, acc, topk, chunk)
            last = s_sig
            images += x.shape[0]
            floor_seen += n_floor
            bar.update(x.shape[0])
    finally:
        bar.close()
        teacher.train(was[id(teacher)])
        for s in subjects.values():
            s.model.train(was[id(s.model)])
    if images == 0:
        raise InputError("no images to inspect: the image list (or dataset split) is empty")
    t_attns = _layers(teacher)
    teacher_layers = [_teacher_result(j, t_attns[j], acc) for j, acc in enumerate(t_acc)]
    reports = {
        n: [_student_result(i, t, s, last[n][i], s_acc[n][i]) for i, t in pairs[n]]
        for n, s in subjects.items()
    }
    settings = {
        "topk": topk,
        "noise": noise,
        "probe_rows": max((a.probe_rows for a in t_acc), default=0),
        "head_cost": "js",
    }
    return Inspection(images, floor_seen, settings, t_layout, teacher_layers, reports)


def _layers(model: nn.Module) -> list[tuple[str, TransferableAttention]]:
    """The model's attention layers (`attention_layers`), a refusal as `NotInspectable`."""
    try:
        return attention_layers(model)
    except TypeError as err:
        raise NotInspectable(f"cannot inspect {type(model).__name__}: {err}") from None


def _borrowed(subject: Subject, t_sig: list[LayerSignals]) -> dict[int, dict[str, torch.Tensor]]:
    """What ``subject``'s layers attend with in place of their own: the borrowed chunks of the teacher's
    layers (q and k together bring the teacher's logit bias)."""
    out = {}
    for i, (t, chunks) in subject.borrow.items():
        given = {c: t_sig[t][c] for c in chunks if c in "qk"}
        if len(given) == 2:
            given["bias"] = t_sig[t].bias
        out[i] = given
    return out


def _teacher_result(j: int, layer: tuple[str, TransferableAttention], acc: _TeacherSums) -> TeacherLayer:
    name, attn = layer
    side, floor = acc.own.means(), acc.floor.means()
    mean = {k: _mean(v) for k, v in side.items()} | {f"floor_{k}": _mean(v) for k, v in floor.items()}
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
    )


def _student_result(
    i: int, t: int, subject: Subject, sig: LayerSignals, acc: _StudentLayer
) -> LayerComparison:
    kind = sig.kind
    comp = LayerComparison(
        i,
        t,
        attention_name_of(sig.attn),
        str(sig.attn.map_kind),
        sig.heads,
        borrowed=subject.borrow.get(i, (0, ""))[1],
        note=_signed_note(kind),
        name=sig.name,
        stage=stage_of(sig.name),
    )
    if kind.has_map and acc.cost is not None:
        comp.metrics = acc.sums.means()
        comp.mean = {k: _mean(v) for k, v in comp.metrics.items()}
        cost = acc.cost / max(1, acc.cost_rows)
        comp.js_cost = cost.tolist()
        comp.assignment = head_assignment(cost)
    return comp


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
    difference over entries). Built from rows a chunk at a time (a ``bias`` in either mapping is the
    layer's logit bias); what conversion reports measure."""
    if metric not in AGREEMENT_METRICS:
        raise ValueError(
            f"layer_agreement: metric must be one of {', '.join(AGREEMENT_METRICS)}, got {metric!r}"
        )
    per_row = AGREEMENT_METRICS[metric]
    q_t, k_t, q_s, k_s = t_qk["q"], t_qk["k"], s_qk["q"], s_qk["k"]
    n = k_t.shape[-2]
    if k_s.shape[-2] != n or q_s.shape[-2] != q_t.shape[-2] or q_t.shape[1] % q_s.shape[1]:
        raise InputError(
            f"teacher and student attention shapes differ: q {tuple(q_t.shape)} vs {tuple(q_s.shape)}; "
            "the student needs the teacher's tokens, and heads that divide the teacher's"
        )
    teacher = LayerSignals("teacher", t_attn, q_t, k_t, t_qk.get("bias"))
    student = LayerSignals("student", s_attn, q_s, k_s, s_qk.get("bias"))
    step = row_chunk(q_t, n, live_tensors=4)
    total, count = 0.0, 0
    for rows in row_slices(0, q_t.shape[-2], step):
        p = _grouped(teacher.map_rows(rows), q_s.shape[1])
        a = (
            s_attn.attention_map(q_s, k_s, rows)
            if s_attn.map_kind is not MapKind.SOFTMAX
            else student.map_rows(rows)
        )
        v = per_row(p, a, n)
        total += float(v.double().sum())
        count += v.numel()
    return total / max(1, count)


# ------------------------------------------------------------------------------------------- pictures' maps
def _signals(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None,
    qk: Sequence[LayerSignals] | None,
) -> list[LayerSignals]:
    if qk is not None and all(isinstance(s, LayerSignals) for s in qk):
        return list(qk)
    return layer_qk(model, x, borrow)


@torch.no_grad()
def token_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: Sequence[LayerSignals] | None = None,
) -> tuple[list[torch.Tensor | None], list[LayerGeometry]]:
    """Per layer one map over the patch grid per head, (B, H, grid_h, grid_w), and the layer's geometry:
    the class token's attention over the patches where the layer has a class-token row (rows renormalised
    over patch keys); for a whole-grid layer without one, the attention each patch receives (column mean
    over the patch queries, renormalised); None for windowed, reduced and other partitioned layers and for
    attentions without a map. Borrowed q/k (attention copy) are what the layer attends with; ``qk``:
    `layer_qk`'s output for ``x`` if already computed."""
    layout = token_layout(model, x.shape[-2:])
    maps: list[torch.Tensor | None] = []
    geometries = []
    for sig in _signals(model, x, borrow, qk):
        geo = layer_geometry(sig, x.shape[0], layout)
        geometries.append(geo)
        if not (geo.whole and sig.kind.has_map):
            maps.append(None)
            continue
        if geo.has_class_row:
            row = sig.map_rows(slice(0, 1))[:, :, 0, geo.prefix :].clamp_min(0)
        else:
            row = _received(sig, geo)
        maps.append(renormalise(row).reshape(*row.shape[:2], *geo.grid).float().cpu())
    return maps, geometries


def _received(sig: LayerSignals, geo: LayerGeometry) -> torch.Tensor:
    """(B, H, P): the mean attention each patch key receives from the patch queries (row chunks)."""
    nq = sig.q.shape[-2]
    total = None
    for rows in row_slices(geo.query_prefix, nq, row_chunk(sig.q, sig.k.shape[-2], live_tensors=4)):
        part = sig.map_rows(rows)[..., geo.prefix :].clamp_min(0).sum(-2)
        total = part if total is None else total + part
    return total / max(1, nq - geo.query_prefix)


@torch.no_grad()
def class_token_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: Sequence[LayerSignals] | None = None,
) -> list[torch.Tensor | None]:
    """Per layer the class token's attention over the patches, (B, H, grid_h, grid_w), rows renormalised
    over patch keys (signed maps clipped at 0 first); None for layers without a map or without a
    class-token row over the whole grid (windowed layers, models without a class token). Borrowed q/k
    (attention copy) are what the layer attends with; ``qk``: `layer_qk`'s output for ``x`` if already
    computed."""
    maps, geometries = token_maps(model, x, borrow, qk)
    return [m if g.has_class_row else None for m, g in zip(maps, geometries)]


@torch.no_grad()
def rollout_class_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: Sequence[LayerSignals] | None = None,
) -> torch.Tensor:
    """The class token's row of the attention rollout over the patches, (B, grid_h, grid_w), renormalised,
    through the layers whose queries and keys are the model's whole token set (windowed, class-attention
    and reduced layers pass tokens through). Builds each such layer's whole head-averaged map: meant for
    the few images of a picture."""
    layout = token_layout(model, x.shape[-2:])
    maps, prefix = [], None
    for sig in _signals(model, x, borrow, qk):
        geo = layer_geometry(sig, x.shape[0], layout)
        if geo.kind != "global" or geo.prefix < 1 or tuple(geo.grid) != tuple(layout["grid"]):
            maps.append(None)
            continue
        prefix = geo.prefix
        maps.append(sig.map_rows().clamp_min(0).mean(1) if sig.kind.has_map else None)
    if prefix is None:
        raise InputError(
            "attention rollout of the class token needs a model with a class token in its whole-image "
            "self-attention layers"
        )
    rolled = attention_rollout(maps)[:, 0, prefix:]
    return renormalise(rolled).reshape(rolled.shape[0], *layout["grid"]).float().cpu()


def has_rollout(model: nn.Module, x: torch.Tensor, qk: Sequence[LayerSignals]) -> bool:
    """Whether `rollout_class_maps` has layers to roll out for ``model`` on ``x``."""
    layout = token_layout(model, x.shape[-2:])
    for sig in qk:
        geo = layer_geometry(sig, x.shape[0], layout)
        if geo.kind == "global" and geo.prefix >= 1 and tuple(geo.grid) == tuple(layout["grid"]):
            return True
    return False
