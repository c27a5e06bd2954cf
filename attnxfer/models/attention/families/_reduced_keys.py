"""Spatial-reduction attention, shared by PVTv2's ``Attention`` and Twins' ``GlobalSubSampleAttn``: queries
from every token, keys and values from a reduced token set, exactly as timm computes them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..interface import QKV
from ..partial_qkv import _to_buffer, freeze_fused, fused_rows
from ..placement import RowPlacement, TokenWalk, raster_cells

#: The row blocks of a fused ``kv`` linear, in timm's order.
KV_CHUNKS = ("k", "v")


def project_q_kv(
    attn: nn.Module, x: torch.Tensor, which: str, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """q of ``x`` and k/v of ``reduce(x)`` (computed only when asked for), as (B, heads, tokens, head_dim)."""
    out: dict[str, torch.Tensor] = {}
    if "q" in which:
        B, N, _ = x.shape
        out["q"] = attn.q(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    wanted = [c for c in KV_CHUNKS if c in which]
    if not wanted:
        return out
    r = reduce(x)
    B, M, _ = r.shape
    if len(wanted) == 2:
        k, v = attn.kv(r).reshape(B, M, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return {**out, "k": k, "v": v}
    c = wanted[0]
    w, b = fused_rows(attn.kv, c, KV_CHUNKS)
    out[c] = F.linear(r, w, b).reshape(B, M, attn.num_heads, attn.head_dim).transpose(1, 2)
    return out


def freeze_q_kv(attn: nn.Module, chunks: Iterable[str]) -> None:
    """Freeze ``chunks``: ``q``'s parameters become buffers, k/v frozen blocks of a `PartialQKV`."""
    chunks = set(chunks) & set(QKV)
    if "q" in chunks:
        _to_buffer(attn.q, "weight", "bias")
    frozen = chunks & set(KV_CHUNKS)
    if frozen:
        freeze_fused(attn, "kv", frozen, KV_CHUNKS)


class ReducedKeys:
    """Keys over a reduced token set (a stride-``sr_ratio`` conv, or a ``pool`` to a fixed grid)."""

    sr_ratio: int

    def key_grid(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            size = pool.output_size
            return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if grid is None or self.sr_ratio <= 1:
            return grid
        return grid[0] // self.sr_ratio, grid[1] // self.sr_ratio

    def key_count(self, tokens: int, grid: tuple[int, int] | None) -> int:
        keys = self.key_grid(grid)
        return keys[0] * keys[1] if keys is not None else tokens

    def key_reduction(self) -> str | None:
        if getattr(self, "pool", None) is not None:
            h, w = self.key_grid(None)
            return f"{h}x{w} adaptive bins"
        return f"{self.sr_ratio}x{self.sr_ratio} blocks" if self.sr_ratio > 1 else None

    def place_rows(
        self, partition: dict[str, Any], tokens: int, grid: tuple[int, int] | None, walk: TokenWalk
    ) -> RowPlacement | None:
        if grid is None:
            return None
        keys = self.key_grid(grid)
        return RowPlacement(grid, keys, raster_cells(grid).reshape(1, -1), raster_cells(keys).reshape(1, -1))
