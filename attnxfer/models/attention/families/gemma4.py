"""`TransferGemma4Attention`: timm's ``Gemma4Attention`` (the Gemma-4 vision encoder, ``gemma4_vit_*``;
its blocks live under ``encoder.blocks``) as a softmax `TransferableAttention`.

Its logits are q kᵀ with scale 1 (q and k are RMS-normalised with a gain, then rotated by a 2-D rotary
embedding whose cos/sin arrive per call). v is RMS-normalised too (no gain); k/v heads are repeated for
grouped-query attention as timm does. Padding masks arrive as ``attn_mask``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from timm.models.gemma4_vit import Gemma4Attention, apply_multidimensional_rope

from ..adapters import register_adapter
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import _to_buffer

__all__ = ["TransferGemma4Attention", "gemma4_heads"]


@register_adapter(Gemma4Attention)
class TransferGemma4Attention(SoftmaxCore, Gemma4Attention):
    """``Gemma4Attention`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class
    rope_cos_sin_call = True  # the block passes the rope as (x, cos, sin): capture stacks them

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if rope is not None:  # cos and sin stacked, as capture records them (stage 1, map agreement)
            rope_cos, rope_sin = rope[0], rope[1]
        if self.io is None:
            return Gemma4Attention.forward(self, x, rope_cos, rope_sin, attn_mask=attn_mask)
        return self.transfer_forward(x, attn_mask=attn_mask, rope_cos=rope_cos, rope_sin=rope_sin)

    def project(
        self,
        x: torch.Tensor,
        which: str = "qkv",
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """q/k/v heads as timm computes them; ``rope`` is cos and sin stacked, as capture records them."""
        if rope is not None:
            rope_cos, rope_sin = rope[0], rope[1]
        return gemma4_heads(self, x, which, rope_cos, rope_sin)

    def logit_scale(self, q: torch.Tensor) -> float:
        return 1.0

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return self.proj_drop(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        """Copied chunks' projections (inside timm's clippable linears) become buffers of the same names."""
        for c in set(chunks):
            for name in ("weight", "bias"):
                _to_buffer(getattr(self, f"{c}_proj").linear, name)
            if c in "qk":
                getattr(self, f"{c}_norm").requires_grad_(False)


def gemma4_heads(
    attn: nn.Module,
    x: torch.Tensor,
    which: str = "qkv",
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """q/k/v heads (B, H, N, d) of a module with ``Gemma4Attention``'s projections, as its forward makes them:
    projection, RMS norm, 2-D rope on q and k, grouped k/v heads repeated. Shared by the adapter and the
    converted student (`models/efficient/gemma4_student.py`)."""
    B, N, _ = x.shape
    out = {}
    for c in "qkv":
        if c not in which:
            continue
        heads = attn.num_heads if c == "q" else attn.num_kv_heads
        t = getattr(attn, f"{c}_proj")(x).view(B, N, heads, attn.head_dim)
        t = getattr(attn, f"{c}_norm")(t)
        if c != "v" and rope_cos is not None:
            t = apply_multidimensional_rope(t, rope_cos, rope_sin, ndim=2, unsqueeze_dim=2)
        t = t.transpose(1, 2)
        if c != "q" and attn.num_kv_groups > 1:
            t = t.repeat_interleave(attn.num_kv_groups, dim=1)
        out[c] = t
    return out
