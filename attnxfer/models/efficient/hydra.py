"""Hydra attention (Bolya et al. 2022): as many heads as channels, out = gain (C / N) q^ sum_j k^_j v_j with
q^, k^ L2-normalised; no single N x N map (map_kind 'none'). The C / N keeps the teacher's scale;
``channel_gain`` (1 at first) is the new parameter. No matmul, so bf16 only saves memory traffic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.interface import MapKind
from ..attention.numerics import PrecisionPolicy, compute_dtype
from ..attention.opcount import OpCounts
from ..attention.registry import register_attention
from .base import EfficientAttention

HYDRA_BF16 = PrecisionPolicy(
    bf16=("q, k, v in, output out",),
    fp32=("L2 norms over the C channels", "the global context sum over N tokens", "the output product"),
    why="element-wise work and two reductions, all in fp32; only the tensors read and written are bf16",
)


@register_attention("hydra")
class HydraAttention(EfficientAttention):
    map_kind = MapKind.NONE
    rope_keeps_map_kind = True
    rope_why = "keeps none: no map (outputs only) for any q, k"
    precision = HYDRA_BF16

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.channel_gain = nn.Parameter(
            torch.empty(self.attn_dim, device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        )
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            self.channel_gain.fill_(1.0)

    def _attend(self, q, k, v):
        B, H, N, d = q.shape
        C = H * d
        q, k, v = (t.transpose(1, 2).reshape(B, N, C).to(compute_dtype(t)) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        global_context = (k * v).sum(dim=1, keepdim=True)  # (B, 1, C)
        out = self.channel_gain.to(q.dtype) * (C / N) * q * global_context
        return out.reshape(B, N, H, d).transpose(1, 2)

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per image over C = H d channels: normalising q and k, the context sum, gain and output products."""
        n, c = num_tokens, self.attn_dim
        normalise = 2 * OpCounts(mul=2 * n * c, add=n * (c - 1), other=n)
        context = OpCounts(mul=n * c, add=(n - 1) * c)
        output = OpCounts(mul=2 * c + 2 * n * c)
        return (normalise + context + output) * batch
