"""Hedgehog (Zhang et al. 2024): kernel attention with learnable per-head feature maps [softmax(xW + b),
softmax(-(xW + b))] for q and k, W starting as the identity: what conversion stage 1 fits (LoLCATs).

m = d / 2 per sign by default, not the paper's m = d: set by speed, where the maps fold into qkv (measured
in docs/benchmarks.md, "What changed since the first measurement"); ``feature_dim=d`` restores it."""

from __future__ import annotations

from ..attention.numerics import PrecisionPolicy
from ..attention.registry import register_attention
from .kernels import ALL_HEADS, FEATURE_MAPS, KERNEL_BF16, HedgehogFeatures, KernelAttention

HEDGEHOG_BF16 = PrecisionPolicy(
    bf16=("projection operands x and W as hi + lo halves", *KERNEL_BF16.bf16),
    fp32=("projection accumulation", "the two softmaxes over features", *KERNEL_BF16.fp32),
    why="softmax features are exponentials of x W: W is split into two bf16 halves so x W keeps fp32 "
    "accuracy (a bf16-rounded W moves a logit of size L by L 2^-8); the features, in (0, 1], round safely",
)


@register_attention("hedgehog")
class HedgehogAttention(KernelAttention):
    """Learnable-feature linear attention. Option: ``feature_dim`` (m per sign, default head_dim // 2)."""

    eps: float = 1e-6
    precision = HEDGEHOG_BF16

    def __init__(self, dim: int, num_heads: int = 8, *, feature_dim: int | None = None, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.feature_dim = max(1, self.head_dim // 2) if feature_dim is None else int(feature_dim)
        self.feature_map_q = HedgehogFeatures(num_heads, self.head_dim, self.feature_dim, **dd)
        self.feature_map_k = HedgehogFeatures(num_heads, self.head_dim, self.feature_dim, **dd)

    def reset_new_parameters(self) -> None:
        self.feature_map_q.reset_parameters()
        self.feature_map_k.reset_parameters()

    # Folded inference (`KernelAttention`): u = x (W_q,k W) + b_q,k W + b, then the two softmaxes.
    def folds(self) -> bool:
        """When u_q, u_k from x cost no more than q, k and then the maps: C m <= C d + d m per head."""
        c, d, m = self.dim, self.head_dim, self.feature_dim
        return m * (c - d) <= c * d

    def fold_sources(self):
        return (*self.feature_map_q.parameters(), *self.feature_map_k.parameters())

    def fold_maps(self, which):
        fmap = (self.feature_map_q, self.feature_map_k)[which]
        return fmap.weight.transpose(-2, -1), fmap.bias

    def folded_query_features(self, u, heads=ALL_HEADS):
        return self.feature_map_q.activate(u, self.eps)

    def folded_key_features(self, u, heads=ALL_HEADS):
        return self.feature_map_k.activate(u, self.eps)

    # eps: softmax features can underflow to exact zeros at large logits; keep rows defined.
    def query_features(self, q, heads=ALL_HEADS):
        return self.feature_map_q.blocks(q, self.eps, heads)

    def key_features(self, k, heads=ALL_HEADS):
        return self.feature_map_k.blocks(k, self.eps, heads)

    def feature_counts(self, num_tokens):
        return FEATURE_MAPS["hedgehog"].counts(num_tokens, self.head_dim, self.feature_dim)
