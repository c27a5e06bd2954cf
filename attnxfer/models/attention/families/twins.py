"""The Twins family's two attentions as softmax `TransferableAttention`s (logits s·q kᵀ, the stage's ``size``
passed per call): LSA (`TransferLocallyGroupedAttn`) inside ws×ws windows that are rows of the batch,
padding tokens included as timm keeps them; GSA (`TransferGlobalSubSampleAttn`) with sub-sampled keys, as
PVTv2."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of
from ..placement import RowPlacement, TokenWalk, grid_argument, raster_cells, window_cells
from ..softmax import SoftmaxCore
from ._projections import merged_heads_output, project_heads
from ._reduced_keys import ReducedKeys, freeze_q_kv, project_q_kv


class _TwinsParts:
    """What Twins' two attentions share: head sizes (timm keeps only ``dim`` and ``num_heads``), the stage
    grid of their call, their output."""

    dim: int
    num_heads: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def attn_dim(self) -> int:
        return self.dim

    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int] | None:
        return grid_argument(args, kwargs, "size")

    _output = merged_heads_output


@register_adapter(LocallyGroupedAttn)
class TransferLocallyGroupedAttn(_TwinsParts, SoftmaxCore, LocallyGroupedAttn):
    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        return {"window_size": self.ws}

    def place_rows(
        self, partition: dict[str, Any], tokens: int, grid: tuple[int, int] | None, walk: TokenWalk
    ) -> RowPlacement | None:
        if grid is None:
            return None
        cells = window_cells(raster_cells(grid), (self.ws, self.ws))
        return RowPlacement(grid, grid, cells, cells)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.io is None:
            return LocallyGroupedAttn.forward(self, x, size)
        B, N, C = x.shape
        H, W = size
        ws = self.ws
        grid = F.pad(x.view(B, H, W, C), (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
        _, Hp, Wp, _ = grid.shape
        h, w = Hp // ws, Wp // ws
        windows = grid.reshape(B, h, ws, w, ws, C).transpose(2, 3).reshape(B * h * w, ws * ws, C)
        out = self.transfer_forward(windows)  # (B·windows, ws², C), proj applied per token
        out = out.reshape(B, h, w, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        return out[:, :H, :W, :].reshape(B, N, C)

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        return project_heads(self, x, which, self.head_dim)


@register_adapter(GlobalSubSampleAttn)
class TransferGlobalSubSampleAttn(_TwinsParts, ReducedKeys, SoftmaxCore, GlobalSubSampleAttn):
    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        return {"sr_ratio": self.sr_ratio}

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.io is None:
            return GlobalSubSampleAttn.forward(self, x, size)
        return self.transfer_forward(x, size=size)

    def reduce(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.sr is None:
            return x
        B, _, C = x.shape
        r = self.sr(x.permute(0, 2, 1).reshape(B, C, *size)).reshape(B, C, -1).permute(0, 2, 1)
        return self.norm(r)

    def project(
        self, x: torch.Tensor, which: str = "qkv", size: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        return project_q_kv(self, x, which, lambda t: self.reduce(t, size))

    freeze_projections = freeze_q_kv


def twins_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """Whole patches at every stage's stride, in whole windows, and grids its sub-sampling convs divide."""
    stride = [1, 1]
    out: dict[Tiling, None] = {}
    for k, (embed, blocks) in enumerate(zip(model.patch_embeds, model.blocks)):
        stride = [s * int(p) for s, p in zip(stride, embed.proj.stride)]
        out.update(dict.fromkeys(tilings_of(stride, what=f"stage {k}")))
        for block in blocks:
            attn = block.attn
            if isinstance(attn, LocallyGroupedAttn) and attn.ws > 1:
                out.update(dict.fromkeys(tilings_of(stride, (attn.ws, attn.ws), what=f"stage {k}")))
            sr = getattr(attn, "sr", None)
            if sr is not None and max(sr.stride) > 1:
                reduced = [s * int(r) for s, r in zip(stride, sr.stride)]
                what = f"stage {k}'s {sr.stride[0]}x{sr.stride[0]} key sub-sampling"
                out.update(dict.fromkeys(tilings_of(reduced, what=what)))
    return tuple(out)


FAMILY = register_family(
    Family(
        name="twins",
        title="Twins",
        hierarchical=True,
        patch_embedding="patch_embeds.0",
        modules=(ModuleCoverage("twins", 6, 6, 6, ("inspect", "export")),),
        sizes=ImageSizes(
            tilings=twins_tilings,
            how="stage grids of whole windows and whole sub-sampled keys (its position encoding is a conv: "
            "nothing to resample)",
        ),
    )
)
