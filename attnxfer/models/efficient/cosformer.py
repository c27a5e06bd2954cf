"""cosFormer (Qin et al. 2022): ReLU kernel re-weighted by cos(pi/2 (i - j) / N).

cos(a - b) = cos a cos b + sin a sin b, so with theta_i = pi/2 * i / N the weighted kernel is
the plain kernel of the 2m-dimensional features [relu(x_i) cos theta_i, relu(x_i) sin theta_i]:
still linear, still non-negative (|theta_i - theta_j| < pi/2). Position i is the index in the
sequence: prefix tokens come first, then the grid in raster order; they attend and are
attended globally like every token, with the same locality weighting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.opcount import OpCounts
from ..attention.registry import register_attention
from .kernels import KernelAttention, add_scalar

__all__ = ["CosFormerAttention"]


@register_attention("cosformer")
class CosFormerAttention(KernelAttention):
    eps: float = 1e-6

    def positional_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin blocks of the features (ReLU is homogeneous: no d^-1/4 scaling needed)."""
        N = x.shape[-2]
        theta = (math.pi / 2) * torch.arange(N, device=x.device, dtype=x.dtype) / N
        relu = add_scalar(F.relu(x), self.eps)
        return relu * theta.cos()[:, None], relu * theta.sin()[:, None]

    def query_features(self, q):
        return self.positional_features(q)

    def key_features(self, k):
        return self.positional_features(k)

    def feature_counts(self, num_tokens):
        """Per q and k: relu (other), + eps (add), times cos and sin of the position (2 N d mul; the N
        angles' cos / sin as other); m = 2d."""
        n, d = num_tokens, self.head_dim
        one = OpCounts(mul=2 * n * d, add=n * d, other=n * d + 2 * n)
        return 2 * one, 2 * d
