"""Where a layer's query rows and keys sit on the image: the data a family's adapter hands out
(`TransferableAttention.place_rows`) for attention distance and pictures of hierarchical layers.

A windowed layer's rows are rows of a batch of windows; a spatial-reduction layer's keys are a coarser grid
than its queries; pooled queries land on the next stage's grid. `RowPlacement` says per window which grid
cell each query row and each key is; `window_cells` and `raster_cells` cut grids as timm's blocks do, and
`TokenWalk` carries what one layer's placement leaves to the next (a token order that is not raster order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RowPlacement:
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


@dataclass
class TokenWalk:
    """What the walk over one model's attention layers carries from layer to layer: the ``model`` itself, and
    its token order where the blocks do not see raster order (``sequence``: flat cells of ``grid`` in the order
    the blocks see them; None: raster order). A family whose blocks reorder tokens sets it at its first layer."""

    model: nn.Module
    sequence: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)


def raster_cells(size: tuple[int, int]) -> torch.Tensor:
    """(H, W) flat cell indices of a grid in raster order."""
    return torch.arange(size[0] * size[1]).reshape(size)


def window_cells(
    cells: torch.Tensor, window: tuple[int, int], shift: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """(nW, wh·ww) flat cells of ``cells`` (H, W) cut into windows as timm's windowed blocks cut them: rolled
    by -shift, padded at the bottom and right (-1), row-major windows of row-major tokens."""
    if any(shift):
        cells = torch.roll(cells, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    wh, ww = window
    h, w = cells.shape
    cells = F.pad(cells, (0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh), value=-1)
    hp, wp = cells.shape
    return cells.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


def grid_argument(args: tuple, kwargs: dict, name: str) -> tuple[int, int] | None:
    """The (H, W) grid a call passes, positionally after its input or as ``name``; None where it passes none."""
    for value in (*args[1:], kwargs.get(name)):
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return int(value[0]), int(value[1])
    return None
