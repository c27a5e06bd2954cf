"""`TransferSwinAttention`: timm's Swin ``WindowAttention`` (``timm.models.swin_transformer``) as a softmax
`TransferableAttention`.

A Swin block rolls its (B, H, W, C) grid by the shift (odd blocks), pads it to whole windows and hands the
attention a batch of windows: (B·nW, N, C) with N = window area, plus the shifted-window mask (nW, N, N)
(0 / −100 between tokens that the roll brought together from different regions). Windows are rows of the
attention's batch, so the partition needs nothing here; padding tokens are keys of their windows as timm
keeps them (unmasked). The logits are s·q kᵀ + B with B the layer's relative-position table gathered to
(1, H, N, N), plus the block's mask broadcast over the batch's windows: (B·nW, H, N, N), as timm's fused
path builds it. Copy applies the teacher's q, k and B (SDPA's ``attn_mask``) to the student's v in the
teacher's windows; distillation takes the chunked biased CE over each window's keys, with a gradient into
the student's table.

Swin converts (`SwinConversion`, `SwinSlot`): the zoo attention runs **inside the teacher's windows**, so its
key set is the teacher's (stage 1 compares maps over the same keys) and the block's window partition, shift
and padding stay timm's. Swin's shift mask (0 / -100 between regions of a shifted window) is honoured exactly
for row-stochastic maps: the window's map rows are restricted to the query's region and renormalised (the
kernel attention over that region's keys). The relative-position bias table is dropped (zoo attentions have
no logit bias). Inside a 7x7 window a kernel attention costs about what softmax does (N = 49 ≈ d): Swin
conversion changes what the layer computes, not its cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention

from ....errors import InputError
from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of
from ..placement import RowPlacement, TokenWalk, raster_cells, window_cells
from ..slots import ConversionSlot, TokenLayout
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import FusedQKVDims, freeze_chunks, merged_heads_output, project_heads


def with_window_mask(bias: torch.Tensor, mask: torch.Tensor | None, windows: int) -> torch.Tensor:
    """A (1, H, N, N) logit bias plus a block's shifted-window mask (nW, N, N), as (windows, H, N, N) with
    ``windows`` = B·nW in timm's order (image-major); the bias alone without a mask."""
    if mask is None:
        return bias
    nw, n = mask.shape[0], mask.shape[-1]
    full = bias.unsqueeze(1) + mask.to(bias.dtype).view(1, nw, 1, n, n)  # (1, nW, H, N, N)
    return full.expand(windows // nw, -1, -1, -1, -1).reshape(windows, bias.shape[1], n, n)


class SwinWindowParts(FusedQKVDims):
    """What Swin's window attentions (Swin, Swin V2, Swin V2-CR) share around their logits: sizes from the
    fused ``qkv``, the layer's position bias plus the block's shifted-window mask as the logit bias, the
    block's windows as the token partition, heads merged into ``proj`` (no norm, no gate), frozen chunks.
    Subclasses give ``_position_bias``."""

    def _position_bias(self) -> torch.Tensor:
        """The layer's (1, H, N, N) position bias."""
        raise NotImplementedError

    def logit_bias(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(1, H, N, N) position bias; (B·nW, H, N, N) with the block's shifted-window mask added."""
        return with_window_mask(self._position_bias(), mask, q.shape[0])

    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        """The grid the block works on, its window and its shift: the block decides each window's tokens."""
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
        """The block's grid in shifted (or not) windows, cut as timm's blocks cut them; keys are the query's
        window."""
        if not partition:
            return None
        grid = tuple(partition["grid"])
        cells = window_cells(raster_cells(grid), tuple(partition["window"]), tuple(partition["shift"]))
        return RowPlacement(grid, grid, cells, cells)

    _output = merged_heads_output

    freeze_projections = freeze_chunks


class SwinSlot:
    """Before a zoo attention class: Swin's call ``attn(x_windows, mask=...)``, the zoo attention inside each
    window, regions of a shifted window kept apart (``mask``: timm's (num_windows, N, N) additive 0 / -100)."""

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
        if not self.map_kind.row_stochastic:
            if self.map_kind.has_map:
                raise InputError(
                    f"{self.attention_name} has a signed map and cannot be restricted to a shifted window's "
                    "regions; choose a row-stochastic attention (hashing, relu_linear, performer, ...) for Swin"
                )
            return torch.zeros_like(v)
        # The kernel attention over the query's region: its map rows restricted there and renormalised.
        rows = self.attention_map(q, k) * attn_mask
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
        return (rows @ v.float()).to(v.dtype)

    def region_log_mass(self, q: torch.Tensor, k: torch.Tensor, bias_t: torch.Tensor) -> torch.Tensor:
        """Mean over rows of log(the mass of this layer's window row on the query's region), the regions read
        off a Swin teacher's logit bias (its shift mask adds -100 between regions). The student's output uses
        its rows restricted to the region and renormalised, so CE(P, restricted) = CE(P, row) + this (P is 0
        outside the region): stage 1 adds it to fit what the layer computes. 0 for unshifted windows."""
        keep = bias_t > -50.0  # relative-position biases are O(1); the shift mask is -100
        if bool(keep.all()):
            return q.new_zeros((), dtype=torch.float32)
        rows = self.attention_map(q, k)
        mass = (rows * keep).sum(-1).clamp_min(torch.finfo(rows.dtype).tiny)
        return mass.log().mean()


class SwinConversion(ConversionSlot):
    """A zoo attention in a Swin window attention's place (see the module docstring): its ``qkv`` and
    ``proj`` move in unchanged, the token grid is the window, no prefix tokens."""

    call = SwinSlot

    @classmethod
    def config(cls, old: nn.Module, zoo: type[nn.Module], layout: TokenLayout | None) -> dict[str, Any]:
        return dict(
            dim=old.qkv.in_features,
            num_heads=old.num_heads,
            attn_head_dim=old.qkv.out_features // (3 * old.num_heads),
            qkv_bias=old.qkv.bias is not None,
            proj_bias=old.proj.bias is not None,
            attn_drop=old.attn_drop.p,
            proj_drop=old.proj_drop.p,
            num_prefix_tokens=0,
            grid_size=tuple(old.window_size),
        )

    @classmethod
    def moved(cls, old: nn.Module) -> dict[str, nn.Module]:
        return {"qkv": old.qkv, "proj": old.proj}


@register_adapter(WindowAttention)
class TransferSwinAttention(SwinWindowParts, SoftmaxCore, WindowAttention):
    """Swin's ``WindowAttention`` meeting `TransferableAttention`; without an `AttentionIO` its forward is
    timm's. Takes and returns timm's (B·nW, N, C) windows."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class
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

    def _position_bias(self) -> torch.Tensor:
        """(1, H, N, N): the relative-position table gathered by timm."""
        return self._get_rel_pos_bias()


def swin_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """The sizes a Swin (V2, V2-CR) model runs at besides its own: whole patches, and at every stage a grid
    that is whole windows. The window is the model's (the largest of its blocks'); a stage grid smaller than
    it takes one window of its own size, as timm's blocks do unless they always partition. Other sizes run
    in timm only with windows padded with zero tokens that the model never saw at its own size: refused."""
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


#: What sizes the Swin families' models run at and how they are rebuilt there (Swin V2 and V2-CR too).
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
