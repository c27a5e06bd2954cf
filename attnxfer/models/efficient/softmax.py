"""Plain softmax attention through SDPA: the teacher's own attention, registered so per-layer
lists can keep softmax in some layers. Its state dict is exactly timm's ``Attention``'s."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import EfficientAttention
from .registry import register_attention

__all__ = ['SoftmaxAttention']


@register_attention('softmax')
class SoftmaxAttention(EfficientAttention):
    """softmax(q k^T / sqrt(d)) v with ``F.scaled_dot_product_attention`` in the input dtype
    (flash/memory-efficient kernels: no N x N tensor on the forward path). Supports masks."""
    map_kind = 'row_stochastic'

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        B, N, _ = x.shape
        q, k, v = self.project_qkv(x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)

    def _attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def _map_context(self, q, k):
        return q * self.scale, k

    def _map_rows(self, context, rows):
        q, k = context
        return (q[:, :, rows] @ k.transpose(-2, -1)).softmax(dim=-1)
