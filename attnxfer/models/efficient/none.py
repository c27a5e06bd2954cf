"""``none``: an attention-free block (LIT's "no attention in early stages"). ``forward`` returns zeros, not
``proj(0)`` (which would add the bias), so the residual passes the input on; stage 1 has nothing to fit."""

from __future__ import annotations

import torch

from ..attention.interface import MapKind
from ..attention.numerics import PrecisionPolicy
from ..attention.opcount import OpCounts
from ..attention.registry import register_attention
from .base import EfficientAttention


@register_attention("none")
class NoAttention(EfficientAttention):
    """The attention branch removed: output zeros of the input's shape, no parameters of its own."""

    map_kind = MapKind.NONE
    #: read by the conversion plan: stage 1 skips the layer (no map, no output to fit)
    attention_free = True
    rope_keeps_map_kind = True
    rope_why = "no map and no q, k to rotate: a rope teacher's block simply loses its attention branch"
    precision = PrecisionPolicy(
        fp32=("nothing is computed",), why="the branch outputs zeros: no arithmetic to round"
    )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # zero heads captured: pictures and inspect, which line layers up, see a layer without a map
        if self.io is not None:
            self.io.captured.update({c: x.new_zeros(x.shape[0], 0, x.shape[1], 0) for c in self.io.capture})
        return torch.zeros_like(x)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(v)

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        return OpCounts()
