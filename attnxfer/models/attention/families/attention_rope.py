"""`TransferAttentionRope`: timm's ``AttentionRope`` (eva models built with ``attn_type='rope'``: the
Perception Encoder family) as a softmax `TransferableAttention`.

The same logits as ``EvaAttention`` (q/k norms, then rope on the patch tokens), with timm's own
``qkv`` bias, and grouped-query attention: k and v heads are repeated to the q heads after the rope
(as timm does), so q, k and v always have ``num_heads`` heads here.
"""

from __future__ import annotations

import torch
from timm.layers import AttentionRope

from ..adapters import register_adapter
from ..softmax import SOFTMAX
from .eva import RopeProjection

__all__ = ["TransferAttentionRope"]


@register_adapter(AttentionRope)
class TransferAttentionRope(RopeProjection, AttentionRope):
    """``AttentionRope`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if self.io is None:
            return AttentionRope.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return self.transfer_forward(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope)
