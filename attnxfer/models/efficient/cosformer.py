"""cosFormer (Qin et al. 2022): ReLU kernel re-weighted by cos(pi/2 (i - j) / N).

cos(a - b) = cos a cos b + sin a sin b, so with theta_i = pi/2 * i / N the weighted kernel is
the plain kernel of the 2m-dimensional features [relu(x_i) cos theta_i, relu(x_i) sin theta_i]:
still linear, still non-negative (|theta_i - theta_j| < pi/2). Position i is the index in the
sequence: prefix tokens come first, then the grid in raster order; they attend and are
attended globally like every token, with the same locality weighting.

bf16-safe on GPU (`KERNEL_BF16`) because the angles are always computed in fp32: in bf16, positions
above 256 are not representable (3000 and 3008 would share an angle) and the re-weighting would blur.
The products relu(x) cos theta are formed in fp32 and rounded once.
"""

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

    def positional_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin blocks of the features (ReLU is homogeneous: no d^-1/4 scaling needed), in x's
        dtype; angles and products in the compute dtype (fp32), whatever x's."""
        N = x.shape[-2]
        theta = (math.pi / 2) * torch.arange(N, device=x.device, dtype=compute_dtype(x)) / N
        relu = add_scalar(F.relu(x.to(theta.dtype)), self.eps)
        return (relu * theta.cos()[:, None]).to(x.dtype), (relu * theta.sin()[:, None]).to(x.dtype)

    def query_features(self, q, heads=ALL_HEADS):
        return self.positional_features(q)

    def key_features(self, k, heads=ALL_HEADS):
        return self.positional_features(k)

    def feature_counts(self, num_tokens):
        """Per q and k: relu (other), + eps (add), times cos and sin of the position (2 N d mul; the N
        angles' cos / sin as other); m = 2d."""
        n, d = num_tokens, self.head_dim
        one = OpCounts(mul=2 * n * d, add=n * d, other=n * d + 2 * n)
        return 2 * one, 2 * d
