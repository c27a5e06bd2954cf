"""Where a hierarchical layer's rows and keys sit on the image (`row_positions`): windows stitched back, keys
on their grid. Each adapter places its own rows (`TransferableAttention.place_rows`, following timm's order
of operations); this module only runs the model once to read its calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.attention import RowPlacement, TokenWalk, attention_blocks, attention_layers
from .knn import evaluating
from .signals import LayerSignals


@dataclass(frozen=True)
class RowPositions(RowPlacement):
    """One layer's rows on the image (`RowPlacement`), checked against its signals."""

    def matches(self, sig: LayerSignals, images: int) -> bool:
        """Whether these rows are the layer's on a batch of ``images`` (windows, queries and keys)."""
        b, nq, nk = sig.shape
        return b == images * self.windows and self.queries.shape[1] == nq and self.keys.shape[1] == nk


@torch.no_grad()
def row_positions(model: nn.Module, x: torch.Tensor) -> list[RowPositions | None]:
    """Per attention layer where its rows and keys sit for images like ``x`` (one image is run to read each
    call's token count and grid); None for a layer its adapter does not place (flat layers)."""
    layers = attention_layers(model)
    blocks = attention_blocks(model)
    parts = [a.token_partition(b) for (_, a), b in zip(layers, blocks)]
    if not any(parts):  # a flat model: nothing to place, no forward needed
        return [None] * len(layers)
    calls: dict[nn.Module, tuple[int, tuple[int, int] | None]] = {}

    def record(attn, args, kwargs) -> None:
        calls.setdefault(attn, (args[0].shape[1], attn.call_grid(args, kwargs)))

    handles = [attn.register_forward_pre_hook(record, with_kwargs=True) for _, attn in layers]
    try:
        with evaluating(model):
            model.forward_features(x[:1].to(next(model.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    walk = TokenWalk(model)
    out: list[RowPositions | None] = []
    for (_, attn), part in zip(layers, parts):
        tokens, grid = calls.get(attn, (0, None))
        placed = attn.place_rows(part, tokens, grid, walk) if part else None
        out.append(
            RowPositions(placed.grid, placed.key_grid, placed.queries, placed.keys) if placed else None
        )
    return out


def _centres(cells: torch.Tensor, grid: tuple[int, int], image: tuple[int, int]) -> torch.Tensor:
    """(..., 2) pixel centres (y, x) of flat ``cells`` of a ``grid`` laid over an ``image`` (h, w) px."""
    ph, pw = image[0] / grid[0], image[1] / grid[1]
    cells = cells.clamp_min(0).double()
    return torch.stack([(cells // grid[1] + 0.5) * ph, (cells % grid[1] + 0.5) * pw], -1)


def cell_distances(pos: RowPositions, image: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window the pixel distances from each query row's cell to each key's, (W, N_q, N_k) (NaN for a
    padding query), and which keys are image cells, not padding (W, N_k)."""
    q = _centres(pos.queries, pos.grid, image)
    k = _centres(pos.keys, pos.key_grid, image)
    d = torch.cdist(q, k).float()
    d[pos.queries < 0] = math.nan
    return d, pos.keys >= 0


def in_raster_order(row: torch.Tensor, pos: RowPositions, window: int = 0) -> torch.Tensor:
    """(B, H, P) values of the keys of ``window`` (a global layer's one) moved to their raster cells of the key
    grid, 0 where it has no key: a hierarchical model's tokens need not be in raster order (Hiera's are still
    partly unrolled)."""
    keys = pos.keys[window].to(row.device)
    valid = keys >= 0
    out = row.new_zeros(*row.shape[:2], pos.key_grid[0] * pos.key_grid[1])
    out[..., keys[valid]] = row[..., valid]
    return out


def query_points(grid: tuple[int, int]) -> dict[str, int]:
    """The query cells drawn in the pictures: the grid's centre and its top-left corner."""
    gh, gw = grid
    return {"centre": (gh // 2) * gw + gw // 2, "corner": 0}


def query_maps(
    sig: LayerSignals, pos: RowPositions, images: int, points: Mapping[str, int]
) -> dict[str, torch.Tensor | None]:
    """Per query cell (``points``: name -> flat cell) that query's attention over the image, (B, H, key_h,
    key_w), 0 outside its window; None for a cell no row queries from."""
    out: dict[str, torch.Tensor | None] = {}
    heads, nk = sig.heads, sig.shape[2]
    for name, cell in points.items():
        hit = (pos.queries == cell).nonzero()
        if hit.numel() == 0 or not sig.kind.has_map:
            out[name] = None
            continue
        w, t = (int(v) for v in hit[0])
        row = sig.map_rows(slice(t, t + 1)).reshape(images, pos.windows, heads, nk)[:, w]
        m = in_raster_order(row.clamp_min(0), pos, w)
        out[name] = m.reshape(images, heads, *pos.key_grid).float().cpu()
    return out
