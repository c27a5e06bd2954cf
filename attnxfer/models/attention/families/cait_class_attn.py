"""`TransferClassAttn`: CaiT's ``ClassAttn`` (``cait_*``, the class-attention blocks in
``blocks_token_only``) as a softmax `TransferableAttention`.

One query row: the class token's q (B, H, 1, d) against the keys of the class token and every patch
token (B, H, 1 + N, d). Its map is one distribution per head — what copy borrows (SDPA with the
teacher's q, k) and what distillation's CE averages over (batch, head, that one row).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.models.cait import ClassAttn

from ..adapters import register_adapter
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import _to_buffer

__all__ = ["TransferClassAttn"]


@register_adapter(ClassAttn)
class TransferClassAttn(SoftmaxCore, ClassAttn):
    """``ClassAttn`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class

    @property
    def head_dim(self) -> int:
        return self.q.out_features // self.num_heads

    @property
    def attn_dim(self) -> int:
        return self.q.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return ClassAttn.forward(self, x)
        return self.transfer_forward(x)

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        """q of the class token only (B, H, 1, d); k, v of every token (B, H, N, d)."""
        B = x.shape[0]
        out = {}
        for c in "qkv":
            if c in which:
                rows = x[:, :1] if c == "q" else x
                out[c] = getattr(self, c)(rows).reshape(B, rows.shape[1], self.num_heads, -1).transpose(1, 2)
        return out

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, 1, -1)))

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        """Copied chunks' linears (``q``/``k``/``v``) become buffers of the same names."""
        for c in set(chunks):
            for name in ("weight", "bias"):
                _to_buffer(getattr(self, c), name)
