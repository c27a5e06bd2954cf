"""`TransferAttentionRope`: timm's ``AttentionRope`` (eva models built with ``attn_type='rope'``: the
Perception Encoder family) as a softmax `TransferableAttention`.

The same logits as ``EvaAttention`` (q/k norms, then rope on the patch tokens), with timm's own
``qkv`` bias, and grouped-query attention: k and v heads are repeated to the q heads after the rope
(as timm does), so q, k and v always have ``num_heads`` heads here.
"""

from __future__ import annotations

from timm.layers import AttentionRope

from ..adapters import register_adapter
from ..softmax import SOFTMAX
from .eva import RopeProjection

__all__ = ["TransferAttentionRope"]


@register_adapter(AttentionRope)
class TransferAttentionRope(RopeProjection, AttentionRope):
    """``AttentionRope`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX
    timm_class = AttentionRope
