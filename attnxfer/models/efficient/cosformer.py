"""cosFormer (Qin et al. 2022): ReLU kernel re-weighted by cos(pi/2 (i - j) / N), i.e. the plain kernel of
[relu(x_i) cos t_i, relu(x_i) sin t_i], t_i = pi/2 i / N: linear and non-negative. Angles are always fp32:
in bf16, positions above 256 share angles and the re-weighting would blur."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.numerics import compute_dtype
from ..attention.opcount import OpCounts
from ..attention.registry import register_attention
from .kernels import ALL_HEADS, KERNEL_BF16, KernelAttention, add_scalar


@register_attention("cosformer")
class CosFormerAttention(KernelAttention):
    eps: float = 1e-6
    rope_why = (
        "keeps row_stochastic: relu(x) + eps times cos/sin of the raster position is non-negative for any "
        "rotated x (its 1-D locality weight sits on top of rope's 2-D positions)"
    )
    precision = KERNEL_BF16

    def query_features(self, x: torch.Tensor, heads: slice = ALL_HEADS) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin blocks in x's dtype; angles and products in fp32 whatever x's."""
        N = x.shape[-2]
        theta = (math.pi / 2) * torch.arange(N, device=x.device, dtype=compute_dtype(x)) / N
        relu = add_scalar(F.relu(x.to(theta.dtype)), self.eps)
        return (relu * theta.cos()[:, None]).to(x.dtype), (relu * theta.sin()[:, None]).to(x.dtype)

    key_features = query_features

    def feature_counts(self, num_tokens):
        """Per q and k: relu + eps, times cos and sin of the position, the angles; m = 2d."""
        n, d = num_tokens, self.head_dim
        one = OpCounts(mul=2 * n * d, add=n * d, other=n * d + 2 * n)
        return 2 * one, 2 * d
