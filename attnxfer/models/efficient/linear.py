"""Linear attention with fixed feature maps: ReLU (relu(x) + eps) and ELU+1 (Katharopoulos et al. 2020).

For ELU+1, q and k are scaled by d^-1/4 first, so phi sees the quantities whose dot product is
the teacher's logit; ReLU is positively homogeneous, so the scale would only cancel.
No new parameters: these students start exactly from the teacher's q/k projections.
Both are bf16-safe on GPU (`KERNEL_BF16`): ReLU features are evaluated in bf16, ELU features in fp32
(scaling included) and rounded once.
"""

from __future__ import annotations

from ..attention.registry import register_attention
from .kernels import (
    ALL_HEADS,
    FEATURE_MAPS,
    KERNEL_BF16,
    ELUFeatures,
    KernelAttention,
    ReLUFeatures,
    evaluate_features,
    scaled_for_kernel,
)


@register_attention("relu_linear")
class ReLULinearAttention(KernelAttention):
    """Kernel attention with phi(x) = relu(x) + eps."""

    precision = KERNEL_BF16

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.feature_map = ReLUFeatures()

    def query_features(self, q, heads=ALL_HEADS):
        return evaluate_features("relu", self.feature_map, q)

    key_features = query_features

    def feature_counts(self, num_tokens):
        return FEATURE_MAPS["relu"].counts(num_tokens, self.head_dim)


@register_attention("elu_linear")
class ELULinearAttention(KernelAttention):
    """Kernel attention with phi(x) = elu(x) + 1."""

    precision = KERNEL_BF16

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.feature_map = ELUFeatures()

    def query_features(self, q, heads=ALL_HEADS):
        return evaluate_features("elu", lambda x: self.feature_map(scaled_for_kernel(x, self.head_dim)), q)

    key_features = query_features

    def feature_counts(self, num_tokens):
        return FEATURE_MAPS["elu"].counts(num_tokens, self.head_dim)
