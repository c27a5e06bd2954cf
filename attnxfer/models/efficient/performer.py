"""Performer / FAVOR+ (Choromanski et al. 2021): positive orthogonal random features phi(x) =
exp(w.x' - |x'|^2 / 2), x' = x d^-1/4, whose dot products estimate exp(q.k / sqrt(d)). m = d by default, not
d ln d: set by speed, where the projection folds into qkv (docs/benchmarks.md; ``num_features=256`` restores
the paper's count). On GPU the projection is split into two bf16 halves (`PERFORMER_BF16`)."""

from __future__ import annotations

import math

import torch

from ...errors import InputError
from ..attention.numerics import PrecisionPolicy, compute_dtype, matmul_split
from ..attention.opcount import OpCounts, matmul_ops
from ..attention.registry import register_attention
from .base import snapshot, unchanged
from .kernels import ALL_HEADS, KERNEL_BF16, KernelAttention, add_scalar

#: Kernel products in bf16 as `KERNEL_BF16`; the random projection at fp32 accuracy (two bf16 halves).
PERFORMER_BF16 = PrecisionPolicy(
    bf16=("projection operands, as hi + lo bf16 halves of w", *KERNEL_BF16.bf16[1:], "features (stored)"),
    fp32=("projection accumulation", "|k|^2 / 2, stabilisers and exp2", *KERNEL_BF16.fp32),
    why="exp of large arguments: a bf16-rounded projection moves the exponent by up to 2^-8 |x'||w| (5-60 % in "
    "the feature); the two-term split keeps it to ~2^-17, and features in (0, 1] round safely",
)


def gaussian_orthogonal_features(
    num_features: int,
    dim: int,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(num_features, dim) random projection: orthogonal blocks with Gaussian row norms, or i.i.d. Gaussian.
    Each block is Haar-distributed (Q of the QR times sign(diag R)): Householder QR alone gives direction r a
    negative r-th entry more often than not, and the estimate of exp(q.k) a bias (-7 % at d = 16)."""
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append((q * r.diagonal().sign()).T)
    directions = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=1, keepdim=True)
    return directions * norms


_LOG2E = 1.4426950408889634


def _stabilised_exp2(x: torch.Tensor, dims) -> torch.Tensor:
    """2^(x - max over dims). The max is not detached: with eps in the features it does not cancel
    exactly, and autograd then gives the exact gradient of the function computed."""
    shift = x.amax(dim=dims, keepdim=True)
    x = x.sub_(shift) if not x.requires_grad else x - shift  # amax keeps x for its backward
    return x.exp2_()


@register_attention("performer")
class PerformerAttention(KernelAttention):
    """FAVOR+ kernel attention. Options: ``num_features`` (m, default d), ``orthogonal`` (True),
    ``redraw_interval`` (training forwards between redraws; None = never), ``feature_seed``."""

    eps: float = 1e-6
    rope_why = (
        "keeps row_stochastic and its target: positive features exp(w.x - x.x/2) estimate exp(q.k) for "
        "any q, k, and rope keeps norms, so they estimate the teacher's rope softmax"
    )
    precision = PERFORMER_BF16
    repr_options = ("num_features", "redraw_interval")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_features: int | None = None,
        orthogonal: bool = True,
        redraw_interval: int | None = None,
        feature_seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        d = self.head_dim
        # d by default: one orthogonal block (see the module docstring for why not d ln d)
        self.num_features = d if num_features is None else int(num_features)
        if self.num_features < 1:
            raise InputError(f"num_features must be >= 1, got {num_features}")
        if redraw_interval is not None and redraw_interval < 1:
            raise InputError(f"redraw_interval must be >= 1 or None, got {redraw_interval}")
        self.orthogonal = orthogonal
        self.redraw_interval = redraw_interval
        self.feature_seed = feature_seed
        self._forwards_since_redraw = 0
        self.register_buffer(
            "feature_projection", torch.empty(self.num_features, d, device=kwargs.get("device"))
        )
        generator = torch.Generator().manual_seed(feature_seed) if feature_seed is not None else None
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh projection (on CPU with ``generator``, then moved)."""
        w = gaussian_orthogonal_features(self.num_features, self.head_dim, self.orthogonal, generator)
        self.feature_projection.copy_(w)
        self._forwards_since_redraw = 0

    def forward(self, x, attn_mask=None, is_causal=False, *, rope=None):
        if self.training and self.redraw_interval:
            if self._forwards_since_redraw >= self.redraw_interval:
                self.redraw()
            self._forwards_since_redraw += 1
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope)

    # The d^-1/4 scaling and log2(e) are folded into the (small) projection, made contiguous: a
    # transposed view made the CPU GEMM ~2x slower. For queries, -|q'|^2/2 is constant along the
    # row and is removed by the row-max stabiliser anyway, so it is skipped; for keys it is needed
    # (it differs between the keys of one row). q and k arrive as strided views of the qkv output;
    # projecting a contiguous copy was ~4x faster than projecting the view.
    def _projection(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.feature_projection.to(dtype) * (self.head_dim**-0.25 * _LOG2E)).T.contiguous()

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        """x' . w (log2 e folded in) at compute-dtype accuracy (bf16 x: x @ hi + x @ lo)."""
        return matmul_split(x.contiguous(), self._projection(compute_dtype(x)))

    def query_features(self, q, heads=ALL_HEADS):
        features = add_scalar(_stabilised_exp2(self._exponent(q), dims=(-1,)), self.eps)
        return features.to(q.dtype)

    def key_features(self, k, heads=ALL_HEADS):
        k_fp = k.to(compute_dtype(k))
        half_sq_norm = k_fp.pow(2).sum(-1, keepdim=True).mul_(0.5 / self.head_dim**0.5 * _LOG2E)
        exponent = self._exponent(k).sub_(half_sq_norm)
        return add_scalar(_stabilised_exp2(exponent, dims=(-2, -1)), self.eps).to(k.dtype)

    def feature_counts(self, num_tokens):
        """Projections, keys' |k|^2 / 2, per q and k the stabiliser, exp2 and + eps."""
        n, d, m = num_tokens, self.head_dim, self.num_features
        projections = 2 * matmul_ops(n, d, m)
        key_norm = OpCounts(mul=n * d + n, add=n * (d - 1) + n * m)
        stabilised = OpCounts(add=2 * n * m, other=n * (m - 1) + 2 * n * m) + OpCounts(other=n * m - 1)
        return projections + key_norm + stabilised + OpCounts(add=2 * n * m), m

    _key_scales: tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None = None

    def folds(self) -> bool:
        return self.num_features == self.head_dim and self._norm_scales() is not None

    def _norm_scales(self) -> torch.Tensor | None:
        """c_f with |k|^2 (0.5 / sqrt(d) log2 e) = sum_f (u_f c_f)^2, u = k @ `_projection`, where the
        projection's rows are orthogonal; None otherwise. Kept until the projection changes."""
        w = self.feature_projection
        if self._key_scales is None or not unchanged(self._key_scales[0], (w,)):
            gram = w @ w.T
            norms_sq = gram.diagonal()
            orthogonal = bool((gram - torch.diag(norms_sq)).abs().max() <= 1e-4 * norms_sq.max())
            scale = self.head_dim**-0.25 * _LOG2E
            half = 0.5 / self.head_dim**0.5 * _LOG2E
            self._key_scales = (snapshot((w,)), half**0.5 / (scale * norms_sq.sqrt()) if orthogonal else None)
        return self._key_scales[1]

    def fold_sources(self):
        return (self.feature_projection,)

    def fold_maps(self, which):
        projection = self._projection(self.qkv.weight.dtype)  # (d, m)
        return projection.T[None], projection.new_zeros(1, projection.shape[1])

    def folded_query_features(self, u, heads=ALL_HEADS):
        return add_scalar(_stabilised_exp2(u, dims=(-1,)), self.eps)

    def folded_key_features(self, u, heads=ALL_HEADS):
        half_sq_norm = (u * self._norm_scales().to(u.dtype)).square_().sum(-1, keepdim=True)
        return add_scalar(_stabilised_exp2(u.sub_(half_sq_norm), dims=(-2, -1)), self.eps)
