"""Token-grid helpers: cut the patch grid into non-overlapping windows (zero-padded at the bottom/right)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _padding(grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    return (-grid[0]) % window[0], (-grid[1]) % window[1]


def window_partition(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """(B, H, gh*gw, c) -> (B, nW, H, wh*ww, c); padded positions are zeros."""
    B, H, _, c = x.shape
    (gh, gw), (wh, ww) = grid, window
    ph, pw = _padding(grid, window)
    x = F.pad(x.reshape(B, H, gh, gw, c), (0, 0, 0, pw, 0, ph))
    nh, nw = (gh + ph) // wh, (gw + pw) // ww
    x = x.reshape(B, H, nh, wh, nw, ww, c).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(B, nh * nw, H, wh * ww, c)


def window_merge(x: torch.Tensor, grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``window_partition``: (B, nW, H, wh*ww, c) -> (B, H, gh*gw, c), padding cropped."""
    B, _, H, _, c = x.shape
    (gh, gw), (wh, ww) = grid, window
    ph, pw = _padding(grid, window)
    nh, nw = (gh + ph) // wh, (gw + pw) // ww
    x = x.reshape(B, nh, nw, H, wh, ww, c).permute(0, 3, 1, 4, 2, 5, 6).reshape(B, H, nh * wh, nw * ww, c)
    return x[:, :, :gh, :gw].reshape(B, H, gh * gw, c)


def window_valid(grid: tuple[int, int], window: tuple[int, int], device=None) -> torch.Tensor | None:
    """(nW, wh*ww) bool, True at real (unpadded) tokens; None when the grid needs no padding."""
    if _padding(grid, window) == (0, 0):
        return None
    ones = torch.ones(1, 1, grid[0] * grid[1], 1, device=device)
    return window_partition(ones, grid, window)[0, :, 0, :, 0] > 0


def window_ids(
    num_prefix_tokens: int, grid: tuple[int, int], window: tuple[int, int], device=None
) -> torch.Tensor:
    """(N,) window index of every token in the sequence, -1 for prefix tokens."""
    (gh, gw), (wh, ww) = grid, window
    nw = -(-gw // ww)
    rows = torch.arange(gh, device=device)[:, None] // wh
    cols = torch.arange(gw, device=device)[None, :] // ww
    ids = (rows * nw + cols).reshape(-1)
    return torch.cat([torch.full((num_prefix_tokens,), -1, device=device, dtype=ids.dtype), ids])
