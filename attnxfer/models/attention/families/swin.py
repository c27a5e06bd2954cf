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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from timm.models.swin_transformer import WindowAttention

from ..adapters import register_adapter
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import FusedQKVDims, freeze_chunks, project_heads

__all__ = ["SwinWindowParts", "TransferSwinAttention", "swin_partition", "with_window_mask"]


def with_window_mask(bias: torch.Tensor, mask: torch.Tensor | None, windows: int) -> torch.Tensor:
    """A (1, H, N, N) logit bias plus a block's shifted-window mask (nW, N, N), as (windows, H, N, N) with
    ``windows`` = B·nW in timm's order (image-major); the bias alone without a mask."""
    if mask is None:
        return bias
    nw, n = mask.shape[0], mask.shape[-1]
    full = bias.unsqueeze(1) + mask.to(bias.dtype).view(1, nw, 1, n, n)  # (1, nW, H, N, N)
    return full.expand(windows // nw, -1, -1, -1, -1).reshape(windows, bias.shape[1], n, n)


def swin_partition(block: nn.Module) -> dict[str, Any]:
    """The grid a Swin(-V2, -V2-CR) block works on, its window and its shift (what decides each window's tokens)."""
    return {
        "grid": tuple(int(v) for v in getattr(block, "input_resolution", None) or block.feat_size),
        "window": tuple(int(v) for v in block.window_size),
        "shift": tuple(int(v) for v in block.shift_size),
    }


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
        return swin_partition(block) if block is not None else {}  # the block decides Swin's windows

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, -1)))

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        freeze_chunks(self, chunks)


@register_adapter(WindowAttention)
class TransferSwinAttention(SwinWindowParts, SoftmaxCore, WindowAttention):
    """Swin's ``WindowAttention`` meeting `TransferableAttention`; without an `AttentionIO` its forward is
    timm's. Takes and returns timm's (B·nW, N, C) windows."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class
    has_logit_bias = True

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
