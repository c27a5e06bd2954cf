"""Hedgehog (Zhang et al. 2024): kernel attention with learnable per-head feature maps.

phi_q, phi_k = [softmax(xW + b), softmax(-(xW + b))], separate maps for q and k, W starting as
the identity. The maps are the new parameters that conversion stage 1 fits to the teacher's
softmax maps (the LoLCATs recipe). bf16-safe on GPU (`HEDGEHOG_BF16`): the map's projection feeds
exponentials, so it runs at fp32 accuracy as two bf16 products (W split in halves), its softmaxes run in
fp32, and the features are rounded once for `KERNEL_BF16`'s kernel products.

The default m = d / 2 per sign (2m = d features in all, the ratio LoLCATs uses for Llama 3: 64 per sign at
d = 128) is set by speed where conversion pays. The Hedgehog paper's m = d gives 2d features: four softmaxes
and twice relu_linear's kernel products, which kept a ViT-S/16 student at 0.83-0.87 of its floor (the
attention-free model, `floor_model`) at 512 and 1024 px on this CPU; m = d / 2 runs at the floor's speed.
Measured on the demo's MAE encoder (head dim 32) converted without labels, m = d / 2 against m = d: k-NN
top-1 65.1 against 64.8 (the teacher 64.9), map KL after stage 1 1.4-1.9x higher. ``feature_dim=d`` restores
the paper's count.

Speed (inference): u = q W + b is linear in the block's input x, so plain inference calls fold the maps into
the q/k/v projection (`KernelAttention`'s folded path): the maps' own (N, d) x (d, m) products are gone and,
for m <= d, the projection costs no more than qkv's (whole ViT-S/16 at 512 px, m = d: 567 against 591 ms).
"""

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
    """Learnable-feature linear attention. Option: ``feature_dim`` (m per sign, default head_dim // 2: 2m = d
    features in all, the ratio LoLCATs uses for Llama 3; see the module docstring)."""

    eps: float = 1e-6
    precision = HEDGEHOG_BF16

    def __init__(self, dim: int, num_heads: int = 8, *, feature_dim: int | None = None, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.feature_dim = int(feature_dim or max(1, self.head_dim // 2))
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
