"""Hiera's ``MaskUnitAttention`` as a softmax `TransferableAttention`. Tokens arrive unrolled (token n is in
mask unit n mod units); with ``use_mask_unit_attn`` the units are rows of the batch, else attention is
global. With ``q_stride`` > 1 the queries are max-pooled before the logits, so ``project`` hands out the
pooled q and every path works on N_q × N_k logits s·q kᵀ. The module has no attention dropout."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.hiera import MaskUnitAttention

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of
from ..placement import RowPlacement, TokenWalk
from ..softmax import SoftmaxCore
from ._projections import project_heads


@register_adapter(MaskUnitAttention)
class TransferMaskUnitAttention(SoftmaxCore, MaskUnitAttention):
    @property
    def num_heads(self) -> int:
        return self.heads

    @property
    def attn_dim(self) -> int:
        return self.dim_out

    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        return {
            "mask_unit_attn": self.use_mask_unit_attn,
            "window_size": self.window_size if self.use_mask_unit_attn else 0,
            "q_stride": self.q_stride,
        }

    def place_rows(
        self, partition: dict[str, Any], tokens: int, grid: tuple[int, int] | None, walk: TokenWalk
    ) -> RowPlacement | None:
        """Tokens in the model's unrolled order; pooled queries land on the next stage's grid."""
        unroll = getattr(walk.model, "unroll", None)
        if walk.sequence is None and isinstance(unroll, nn.Module) and getattr(unroll, "size", None):
            # the order the model's blocks see its tokens in: its unroll of the raster grid's cell indices
            grid = tuple(int(s) for s in unroll.size)
            cells = torch.arange(math.prod(grid), dtype=torch.float32).reshape(1, -1, 1)
            walk.sequence, walk.grid = unroll(cells).reshape(-1).round().long(), grid
        seq, (gh, gw) = walk.sequence, walk.grid
        if seq is None or seq.numel() != tokens:
            return None
        qs = int(partition["q_stride"])
        units = tokens // (qs * int(partition["window_size"])) if partition["mask_unit_attn"] else 1
        keys = seq.reshape(tokens // units, units).t()  # (units, tokens per unit)
        if qs == 1:
            return RowPlacement((gh, gw), (gh, gw), keys, keys)
        s = math.isqrt(qs)
        groups = keys.reshape(units, qs, -1)
        rows, cols = (groups // gw).amin(1) // s, (groups % gw).amin(1) // s
        pooled = (gh // s, gw // s)
        queries = rows * pooled[1] + cols  # (units, tokens per unit / q_stride)
        # the next blocks' order: token m·units + u
        walk.sequence, walk.grid = queries.t().reshape(-1), pooled
        return RowPlacement(pooled, (gh, gw), queries, keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return MaskUnitAttention.forward(self, x)
        B, N, C = x.shape
        units = N // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1
        rows = x.view(B, N // units, units, C).transpose(1, 2).reshape(B * units, N // units, C)
        out = self.transfer_forward(rows)  # (B·units, tokens per unit / q_stride, dim_out)
        n_q = out.shape[1]
        return out.view(B, units, n_q, -1).transpose(1, 2).reshape(B, n_q * units, -1)

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        out = project_heads(self, x, which, self.head_dim)
        if "q" in out and self.q_stride > 1:
            q = out["q"]
            out["q"] = q.view(*q.shape[:2], self.q_stride, -1, q.shape[-1]).amax(dim=2)
        return out

    def attention_dropout(self) -> float:
        return 0.0  # MaskUnitAttention has no attention dropout: SoftmaxCore's attend applies as it is

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        Bu, H, n_q, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(Bu, n_q, H * d))


def hiera_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """Whole patches in whole mask units, and a token grid its ``unroll`` can halve at every pooling stage."""
    patch = [int(s) for s in model.patch_embed.proj.stride]
    pooled = [math.prod(int(s[i]) for s in model.unroll.schedule) for i in range(2)]
    return (
        *tilings_of(patch, model.mask_unit_size, what="its mask units", unit="mask units"),
        *tilings_of([p * q for p, q in zip(patch, pooled)], what="the token grid its query pooling halves"),
    )


def resize_hiera_weights(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Hiera's weights at another size: a (1, N, C) position embedding resampled on the token grid (timm's
    Hiera filter does not); the windowed variants' one timm's forward interpolates."""
    out = dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.dim() == 3 and model.pos_embed.shape != pos.shape:
        out["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.tokens_spatial_shape), num_prefix_tokens=0
        )
    return out


FAMILY = register_family(
    Family(
        name="hiera",
        title="Hiera",
        hierarchical=True,
        modules=(ModuleCoverage("hiera", 7, 7, 7, ("inspect", "export")),),
        sizes=ImageSizes(
            tilings=hiera_tilings,
            resize_weights=resize_hiera_weights,
            how="position embedding resampled on the token grid (timm's resample_abs_pos_embed; timm's Hiera "
            "filter does not); sizes whose token grid is whole mask units and halves at every pooling stage",
        ),
    )
)
