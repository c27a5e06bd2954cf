"""Linear attention with fixed feature maps, ReLU and ELU+1 (Katharopoulos et al. 2020): no new parameters.
ELU+1 sees q, k scaled by d^-1/4 (their dot product is the teacher's logit); ReLU is homogeneous."""

from __future__ import annotations

from ..attention.numerics import in_compute_dtype
from ..attention.registry import register_attention
from .kernels import (
    ALL_HEADS,
    FEATURE_MAPS,
    KERNEL_BF16,
    KernelAttention,
    scaled_for_kernel,
)


@register_attention("relu_linear")
class ReLULinearAttention(KernelAttention):
    """Kernel attention with phi(x) = relu(x) + eps."""

    precision = KERNEL_BF16
    kernel = "relu"

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.feature_map = FEATURE_MAPS[self.kernel].build(num_heads, self.head_dim)[0]

    def query_features(self, q, heads=ALL_HEADS):
        # relu of a bf16 value is exact (+ eps rounds at most 2^-9 relative): it runs in q's dtype. The d^-1/4
        # scaling before elu, rounded to bf16, would move e^x by |x| 2^-9: fp32, rounded once.
        if self.kernel == "relu":
            return self.feature_map(q)
        return in_compute_dtype(lambda x: self.feature_map(scaled_for_kernel(x, self.head_dim)), q)

    key_features = query_features

    def feature_counts(self, num_tokens):
        return FEATURE_MAPS[self.kernel].counts(num_tokens, self.head_dim)


@register_attention("elu_linear")
class ELULinearAttention(ReLULinearAttention):
    """Kernel attention with phi(x) = elu(x) + 1."""

    kernel = "elu"
