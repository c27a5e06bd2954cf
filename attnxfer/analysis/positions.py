"""Where a hierarchical layer's rows and keys sit on the image: windows stitched back, keys on their grid.

A windowed layer's map rows are rows of a batch of windows (Swin's shifted windows, Twins' local groups,
Hiera's mask units); a spatial-reduction layer's keys are a coarser grid than its queries (PVTv2, Twins'
global sub-sampled attention). To draw where a token looks, `row_positions` says per layer which stage-grid
cell each (window, query row) and each (window, key) is: `RowPositions`. It is read from the layer's
partition (`token_partition` of its adapter) and the tokens each attention call takes, following timm's own
order of operations (Swin: roll by the shift, then pad, then cut row-major windows; Hiera: its ``unroll``
order, queries max-pooled in groups of ``q_stride``). How each partition places its rows is a registry
(`register_rows`), keyed by the partition's entries.

`query_maps` then stitches one query row of a layer back onto the image: (B, H, key grid) maps with zeros
where the query's window does not reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.attention import attention_blocks, attention_layers
from .signals import LayerSignals

__all__ = ["RowPositions", "cell_distances", "query_maps", "query_points", "register_rows", "row_positions"]


@dataclass(frozen=True)
class RowPositions:
    """One layer's rows on the image. ``grid``: the queries' grid (the stage's, after any query pooling);
    ``key_grid``: the keys' (the stage's, a reduced one, or the grid before pooling). ``queries``
    (W, N_q) and ``keys`` (W, N_k): per window (W per image; 1 without windows) the flat cell of each row
    and key on its grid, -1 for padding."""

    grid: tuple[int, int]
    key_grid: tuple[int, int]
    queries: torch.Tensor
    keys: torch.Tensor

    @property
    def windows(self) -> int:
        return self.queries.shape[0]

    def matches(self, sig: LayerSignals, images: int) -> bool:
        """Whether these rows are the layer's on a batch of ``images`` (windows, queries and keys)."""
        b, nq, nk = sig.shape
        return b == images * self.windows and self.queries.shape[1] == nq and self.keys.shape[1] == nk


@dataclass
class _Walk:
    """What the walk over a model's layers carries: its token order (Hiera's unrolled sequence: flat cells
    of ``grid`` in the order the blocks see them; None: raster order)."""

    sequence: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


#: partition entries -> how that partition places its rows: fn(partition, tokens, size, walk) -> RowPositions
_ROWS: list[tuple[frozenset[str], Callable[..., RowPositions | None]]] = []


def register_rows(*keys: str):
    """Register ``fn(partition, tokens, size, walk)`` for layers whose `token_partition` has ``keys`` (the
    placement with the most matching keys wins):
    ``tokens`` is the attention input's token count, ``size`` the grid its call names (or None)."""

    def deco(fn):
        _ROWS.append((frozenset(keys), fn))
        return fn

    return deco


def _windows(cells: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(nW, wh·ww) flat cells of ``cells`` (H, W) cut as timm's Swin blocks cut them: rolled by -shift,
    padded at the bottom and right (-1), row-major windows of row-major tokens."""
    if any(shift):
        cells = torch.roll(cells, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    wh, ww = window
    h, w = cells.shape
    cells = F.pad(cells, (0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh), value=-1)
    hp, wp = cells.shape
    return cells.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


def _raster(size: tuple[int, int]) -> torch.Tensor:
    return torch.arange(size[0] * size[1]).reshape(size)


@register_rows("grid", "window", "shift")
def _swin_rows(part, tokens, size, walk) -> RowPositions:
    """Swin (V1, V2, V2-CR): the block's grid in shifted (or not) windows; keys are the query's window."""
    grid = tuple(part["grid"])
    cells = _windows(_raster(grid), tuple(part["window"]), tuple(part["shift"]))
    return RowPositions(grid, grid, cells, cells)


@register_rows("window_size")
def _local_group_rows(part, tokens, size, walk) -> RowPositions | None:
    """Twins' locally grouped attention: ws×ws windows of the stage's grid, padded at the bottom and right."""
    if size is None:
        return None
    ws = int(part["window_size"])
    cells = _windows(_raster(size), (ws, ws), (0, 0))
    return RowPositions(size, size, cells, cells)


@register_rows("sr_ratio")
def _reduced_rows(part, tokens, size, walk) -> RowPositions | None:
    """Spatial reduction (PVTv2, Twins' GSA): every token queries keys on the grid an ``sr``-strided conv
    leaves (PVTv2's ``linear`` variant: 7×7 average pooling first)."""
    if size is None:
        return None
    sr = int(part["sr_ratio"])
    if part.get("linear"):
        keys = (7, 7)
    elif sr > 1:
        keys = (size[0] // sr, size[1] // sr)
    else:
        keys = size
    return RowPositions(size, keys, _raster(size).reshape(1, -1), _raster(keys).reshape(1, -1))


@register_rows("mask_unit_attn", "window_size", "q_stride")
def _mask_unit_rows(part, tokens, size, walk) -> RowPositions | None:
    """Hiera: tokens in its unrolled order, mask unit u holding every ``units``-th token (or one global
    unit); queries max-pooled over groups of ``q_stride`` tokens, a 2-D block of the grid each, which land
    on the next stage's grid."""
    seq, (gh, gw) = walk.sequence, walk.grid
    if seq is None or seq.numel() != tokens:
        return None
    qs = int(part["q_stride"])
    units = tokens // (qs * int(part["window_size"])) if part["mask_unit_attn"] else 1
    keys = seq.reshape(tokens // units, units).t()  # (units, tokens per unit)
    if qs == 1:
        return RowPositions((gh, gw), (gh, gw), keys, keys)
    s = math.isqrt(qs)
    groups = keys.reshape(units, qs, -1)
    rows, cols = (groups // gw).amin(1) // s, (groups % gw).amin(1) // s
    grid = (gh // s, gw // s)
    queries = rows * grid[1] + cols  # (units, tokens per unit / q_stride)
    walk.sequence, walk.grid = (
        queries.t().reshape(-1),
        grid,
    )  # the next blocks' order: pooled token m·units + u
    return RowPositions(grid, (gh, gw), queries, keys)


def _size_of(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """The grid an attention call names (PVTv2's ``feat_size``, Twins' ``size``), if any."""
    for value in (*args[1:], kwargs.get("feat_size"), kwargs.get("size")):
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return int(value[0]), int(value[1])
    return None


@torch.no_grad()
def row_positions(model: nn.Module, x: torch.Tensor) -> list[RowPositions | None]:
    """Per attention layer (forward order) where its rows and keys sit for images like ``x`` (one image
    of it is run through the model's own forward to read each call's token count and grid); None for a
    layer whose partition has no registered placement (flat layers: their rows are the image's tokens)."""
    layers = attention_layers(model)
    blocks = attention_blocks(model)
    parts = [
        a.token_partition(b) if hasattr(a, "token_partition") else {} for (_, a), b in zip(layers, blocks)
    ]
    placements = []
    for part in parts:
        fits = [(len(keys), f) for keys, f in _ROWS if part and keys <= part.keys()]
        placements.append(max(fits, key=lambda kf: kf[0])[1] if fits else None)  # the most specific one
    if all(f is None for f in placements):  # a flat model: nothing to place, no forward needed
        return [None] * len(layers)
    calls: dict[int, tuple[int, tuple[int, int] | None]] = {}

    def record(i: int):
        def hook(mod, args, kwargs) -> None:
            calls.setdefault(i, (args[0].shape[1], _size_of(args, kwargs)))

        return hook

    handles = [
        attn.register_forward_pre_hook(record(i), with_kwargs=True) for i, (_, attn) in enumerate(layers)
    ]
    was = model.training
    try:
        model.eval().forward_features(x[:1].to(next(model.parameters()).dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    walk = _Walk()
    unroll = getattr(model, "unroll", None)
    if isinstance(unroll, nn.Module) and getattr(unroll, "size", None):
        grid = tuple(int(s) for s in unroll.size)
        cells = torch.arange(math.prod(grid), dtype=torch.float32).reshape(1, -1, 1)
        walk.sequence, walk.grid = unroll(cells).reshape(-1).round().long(), grid
    out: list[RowPositions | None] = []
    for i, (part, fn) in enumerate(zip(parts, placements)):
        tokens, size = calls.get(i, (0, None))
        out.append(fn(part, tokens, size, walk) if fn is not None else None)
    return out


def _centres(cells: torch.Tensor, grid: tuple[int, int], image: tuple[int, int]) -> torch.Tensor:
    """(..., 2) pixel centres (y, x) of flat ``cells`` of a ``grid`` laid over an ``image`` (h, w) px."""
    ph, pw = image[0] / grid[0], image[1] / grid[1]
    cells = cells.clamp_min(0).double()
    return torch.stack([(cells // grid[1] + 0.5) * ph, (cells % grid[1] + 0.5) * pw], -1)


def cell_distances(pos: RowPositions, image: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window the distances in pixels from each query row's cell to each key's cell, (W, N_q, N_k)
    (NaN for a padding query: it has no place), and which keys are image cells, not padding (W, N_k):
    what the attention distance of a windowed or reduced layer is measured with."""
    q = _centres(pos.queries, pos.grid, image)
    k = _centres(pos.keys, pos.key_grid, image)
    d = torch.cdist(q, k).float()
    d[pos.queries < 0] = math.nan
    return d, pos.keys >= 0


def query_points(grid: tuple[int, int]) -> dict[str, int]:
    """The query cells drawn in the pictures: the grid's centre and its top-left corner."""
    gh, gw = grid
    return {"centre": (gh // 2) * gw + gw // 2, "corner": 0}


def query_maps(
    sig: LayerSignals, pos: RowPositions, images: int, points: Mapping[str, int]
) -> dict[str, torch.Tensor | None]:
    """Per query cell (``points``: name -> flat cell of ``pos.grid``) the layer's attention of that query
    over the image, (B, H, key_h, key_w): its window's keys put back where they sit, 0 elsewhere (and over
    padding). One map row per point is built (for every window of the batch at once). None for a cell no
    row queries from."""
    out: dict[str, torch.Tensor | None] = {}
    heads, nk = sig.heads, sig.shape[2]
    for name, cell in points.items():
        hit = (pos.queries == cell).nonzero()
        if hit.numel() == 0 or not sig.kind.has_map:
            out[name] = None
            continue
        w, t = (int(v) for v in hit[0])
        row = sig.map_rows(slice(t, t + 1)).reshape(images, pos.windows, heads, nk)[:, w]
        keys = pos.keys[w].to(row.device)
        valid = keys >= 0
        m = row.new_zeros(images, heads, pos.key_grid[0] * pos.key_grid[1])
        m[..., keys[valid]] = row[..., valid].clamp_min(0)
        out[name] = m.reshape(images, heads, *pos.key_grid).float().cpu()
    return out
