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

from .kernels import KernelAttention, scaled_for_kernel
from .registry import register_attention

__all__ = ['CosFormerAttention']


@register_attention('cosformer')
class CosFormerAttention(KernelAttention):
    eps: float = 1e-6

    def positional_features(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[-2]
        theta = (math.pi / 2) * torch.arange(N, device=x.device, dtype=x.dtype) / N
        relu = F.relu(scaled_for_kernel(x, self.head_dim)) + self.eps
        return torch.cat([relu * theta.cos()[:, None], relu * theta.sin()[:, None]], dim=-1)

    def features(self, q, k):
        return self.positional_features(q), self.positional_features(k)
