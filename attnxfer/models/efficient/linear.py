"""Linear attention with fixed feature maps: ReLU (relu(x) + eps) and ELU+1 (Katharopoulos et al. 2020).

For ELU+1, q and k are scaled by d^-1/4 first, so phi sees the quantities whose dot product is
the teacher's logit; ReLU is positively homogeneous, so the scale would only cancel.
No new parameters: these students start exactly from the teacher's q/k projections.
"""

from __future__ import annotations

from ..attention.registry import register_attention
from .kernels import FEATURE_MAPS, ELUFeatures, KernelAttention, ReLUFeatures, scaled_for_kernel

__all__ = ["ELULinearAttention", "ReLULinearAttention"]


@register_attention("relu_linear")
class ReLULinearAttention(KernelAttention):
    """Kernel attention with phi(x) = relu(x) + eps."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.feature_map = ReLUFeatures()

    def query_features(self, q):
        return self.feature_map(q)

    key_features = query_features

    def feature_counts(self, num_tokens):
        return FEATURE_MAPS["relu"].counts(num_tokens, self.head_dim)


@register_attention("elu_linear")
class ELULinearAttention(KernelAttention):
    """Kernel attention with phi(x) = elu(x) + 1."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.feature_map = ELUFeatures()

    def query_features(self, q):
        return self.feature_map(scaled_for_kernel(q, self.head_dim))

    key_features = query_features

    def feature_counts(self, num_tokens):
        return FEATURE_MAPS["elu"].counts(num_tokens, self.head_dim)
