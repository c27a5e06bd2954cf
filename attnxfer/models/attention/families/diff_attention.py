"""timm's ``DiffAttention`` (differential attention) is refused: its maps are not distributions.

A layer's output is (softmax(s·q₁k₁ᵀ) − λ·softmax(s·q₂k₂ᵀ))·v: the difference of two softmax maps with a
learned λ, so rows are signed and sum to 1 − λ. There is no row-stochastic map to copy into SDPA or to
distil with a cross-entropy, and splitting it into its two halves would transfer something the layer
never uses on its own.
"""

from __future__ import annotations

from timm.layers import DiffAttention

from ..adapters import refuse_attention

__all__ = ["DIFF_ATTENTION_REASON"]

DIFF_ATTENTION_REASON = (
    "differential attention's map is the difference of two softmax maps (λ-weighted), signed, with rows "
    "summing to 1 − λ, not a distribution: attnxfer's softmax copy and CE distillation have nothing to take "
    "from it. Use a teacher with softmax attention (e.g. the same family without attn_layer='diff')"
)

refuse_attention(DiffAttention, DIFF_ATTENTION_REASON)
