"""Where a layer's query rows and keys sit on the image (windows, reduced keys, pooled queries), for attention
distance and pictures of hierarchical layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class RowPlacement:
    """One layer's rows on the image: per window (1 without windows), the flat cell of each query row
    (``queries`` (W, N_q) on ``grid``) and key (``keys`` (W, N_k) on ``key_grid``), -1 for padding."""

    grid: tuple[int, int]
    key_grid: tuple[int, int]
    queries: torch.Tensor
    keys: torch.Tensor

    @property
    def windows(self) -> int:
        return self.queries.shape[0]


@dataclass
class TokenWalk:
    """What the walk over a model's layers carries on: the ``model``, and the token order its blocks see
    where it is not raster (``sequence``: flat cells of ``grid``; set by a family at its first layer)."""

    model: nn.Module
    sequence: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)


def raster_cells(size: tuple[int, int]) -> torch.Tensor:
    return torch.arange(size[0] * size[1]).reshape(size)


def window_cells(
    cells: torch.Tensor, window: tuple[int, int], shift: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """(nW, wh·ww) flat cells of ``cells`` (H, W) in windows as timm's blocks cut them (padding: -1)."""
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
