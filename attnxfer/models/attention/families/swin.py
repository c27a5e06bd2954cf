"""Swin's ``WindowAttention`` as a softmax `TransferableAttention`: windows are rows of the attention's batch
(padding tokens keys of their windows, as timm keeps them); the logits are s·q kᵀ plus the gathered
relative-position table plus the block's shift mask, (B·nW, H, N, N) as timm's fused path builds it.

Swin converts with the zoo attention inside the teacher's windows (stage 1 compares maps over the same
keys); the shift mask is honoured exactly for row-stochastic maps by restricting rows to the query's
region and renormalising; the position table is dropped (softmax keeps the teacher's layer, table and all).
In a 7x7 window (N = 49 ≈ d) a kernel attention costs about what softmax does: Swin conversion changes what
the layer computes, not its cost."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention

from ....errors import InputError
from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of
from ..interface import MapKind
from ..placement import RowPlacement, TokenWalk, raster_cells, window_cells
from ..slots import ConversionSlot, TokenLayout, attention_config
from ..softmax import SoftmaxCore
from ._projections import FusedQKVDims, merged_heads_output, project_heads


def with_window_mask(bias: torch.Tensor, mask: torch.Tensor | None, windows: int) -> torch.Tensor:
    """A (1, H, N, N) logit bias plus a block's shift mask (nW, N, N), as timm's (B·nW, H, N, N)."""
    if mask is None:
        return bias
    nw, n = mask.shape[0], mask.shape[-1]
    full = bias.unsqueeze(1) + mask.to(bias.dtype).view(1, nw, 1, n, n)  # (1, nW, H, N, N)
    return full.expand(windows // nw, -1, -1, -1, -1).reshape(windows, bias.shape[1], n, n)


class SwinWindowParts(FusedQKVDims):
    """What Swin's window attentions (Swin, V2, V2-CR) share around their ``_position_bias``."""

    def _position_bias(self) -> torch.Tensor:
        raise NotImplementedError

    def logit_bias(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return with_window_mask(self._position_bias(), mask, q.shape[0])

    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        if block is None:
            return {}
        return {
            "grid": tuple(int(v) for v in getattr(block, "input_resolution", None) or block.feat_size),
            "window": tuple(int(v) for v in block.window_size),
            "shift": tuple(int(v) for v in block.shift_size),
        }

    def place_rows(
        self, partition: dict[str, Any], tokens: int, grid: tuple[int, int] | None, walk: TokenWalk
    ) -> RowPlacement | None:
        if not partition:
            return None
        grid = tuple(partition["grid"])
        cells = window_cells(raster_cells(grid), tuple(partition["window"]), tuple(partition["shift"]))
        return RowPlacement(grid, grid, cells, cells)

    _output = merged_heads_output


class SwinSlot:
    """Before a zoo attention class: Swin's call, regions of a shifted window kept apart."""

    token_partition = SwinWindowParts.token_partition  # the teacher's windows: its keys, its shift

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = None
        if mask is not None:
            windows = mask.shape[0]
            keep = (mask == 0).unsqueeze(0).expand(x.shape[0] // windows, -1, -1, -1)
            keep = keep.reshape(x.shape[0], 1, *mask.shape[1:])
        return super().forward(x, attn_mask=keep)

    def attend(self, q, k, v, *, attn_mask=None, is_causal=False):
        # an all-kept mask is the plain core (a shortcut only: while torch.export traces, the restricted
        # path below computes the same rows without a branch on the buffer's values)
        if attn_mask is None or (
            attn_mask.dtype == torch.bool and not torch.compiler.is_exporting() and bool(attn_mask.all())
        ):
            return super().attend(q, k, v, is_causal=is_causal)
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"{type(self).__name__} takes a boolean region mask, got {attn_mask.dtype}")
        if not self.map_kind.row_stochastic:  # `none` returns zeros before attending
            raise InputError(
                f"{self.attention_name} ({self.map_kind.value} map) cannot be restricted to a shifted window's "
                "regions; choose a row-stochastic attention (hashing, relu_linear, performer, ...) for Swin"
            )
        # The kernel attention over the query's region: its map rows restricted there and renormalised.
        rows = self.attention_map(q, k) * attn_mask
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
        out = rows @ v.float()
        if getattr(self, "dwc", None) is not None:  # a conv of v outside the map, restricted the same way
            out = out + self.local_term(v, attn_mask).float()
        return out.to(v.dtype)

    def region_log_mass(self, q: torch.Tensor, k: torch.Tensor, bias_t: torch.Tensor) -> torch.Tensor:
        """Mean log-mass of the layer's rows on the query's region (read off the teacher's -100 shift mask):
        the student's rows are restricted there and renormalised, so CE(P, restricted) = CE(P, row) + this."""
        keep = bias_t > -50.0  # relative-position biases are O(1); the shift mask is -100
        if bool(keep.all()):
            return q.new_zeros((), dtype=torch.float32)
        rows = self.attention_map(q, k)
        mass = (rows * keep).sum(-1).clamp_min(torch.finfo(rows.dtype).tiny)
        return mass.log().mean()


class SwinConversion(ConversionSlot):
    """A zoo attention in a Swin window attention's place: the grid is the window."""

    call = SwinSlot

    @classmethod
    def keeps(cls, zoo: type[nn.Module]) -> bool:
        # softmax is the teacher's own window attention, position table included (stage 1 leaves it)
        return zoo.map_kind is MapKind.SOFTMAX

    @classmethod
    def config(cls, old: nn.Module, zoo: type[nn.Module], layout: TokenLayout | None) -> dict[str, Any]:
        return dict(attention_config(old), num_prefix_tokens=0, grid_size=tuple(old.window_size))

    @classmethod
    def moved(cls, old: nn.Module) -> dict[str, nn.Module]:
        return {"qkv": old.qkv, "proj": old.proj}


@register_adapter(WindowAttention)
class TransferSwinAttention(SwinWindowParts, SoftmaxCore, WindowAttention):
    """Swin's ``WindowAttention``; takes and returns timm's (B·nW, N, C) windows."""

    has_logit_bias = True
    conversion_slot = SwinConversion

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.io is None:
            return WindowAttention.forward(self, x, mask=mask)
        return self.transfer_forward(x, mask=mask)

    def project(
        self, x: torch.Tensor, which: str = "qkv", mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return project_heads(self, x, which, self.head_dim)

    _position_bias = WindowAttention._get_rel_pos_bias


def swin_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """Whole patches, and stage grids of whole windows (a smaller grid is one window, as timm's blocks shrink
    it): other sizes run in timm only with zero-padded windows the model never saw, so they are refused."""
    side = model.patch_embed.img_size
    blocks = [m for m in model.modules() if hasattr(m, "shift_size") and hasattr(m, "window_size")]
    window = [max(int(b.window_size[i]) for b in blocks) for i in range(2)]
    shrinks = not any(getattr(b, "always_partition", False) for b in blocks)
    patch = model.patch_embed.patch_size
    out: dict[Tiling, None] = dict.fromkeys(tilings_of(patch, what=f"{patch[0]} px patches"))
    for b in blocks:
        grid = tuple(getattr(b, "input_resolution", None) or b.feat_size)
        strides = [round(side[i] / grid[i]) for i in range(2)]
        what = f"the 1/{strides[0]} stage"
        out.update(dict.fromkeys(tilings_of(strides, window, what=what, shrinks=shrinks)))
    return tuple(out)


SWIN_SIZES = ImageSizes(
    tilings=swin_tilings,
    how="stage grids of whole windows (a smaller grid is one window, as timm shrinks it); the position "
    "table resized by timm's checkpoint filter where the window changes",
)

FAMILY = register_family(
    Family(
        name="swin",
        title="Swin",
        hierarchical=True,
        modules=(ModuleCoverage("swin_transformer", 9, 9, 9, ("inspect", "convert", "export")),),
        sizes=SWIN_SIZES,
    )
)
