"""Performer / FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

exp(q.k / sqrt(d)) = E_w[phi(q) . phi(k)] with phi(x) = exp(w.x' - |x'|^2 / 2), x' = x d^-1/4,
w ~ N(0, I). Rows of w are drawn in orthogonal blocks (QR of Gaussian blocks) and rescaled to
chi-distributed norms, which lowers the variance. Stabilisers (the max exponent per query row,
and per (batch, head) over all keys and features) are constants within a map row, so they
cancel in the normalisation (up to the 1e-6 added to every feature). The projection is a
buffer: fixed in eval, redrawn by ``redraw()`` or every ``redraw_interval`` training forwards.
Its error falls as 1/sqrt(num_features).

The default m = d (one orthogonal block) is set by speed where conversion pays. FAVOR+'s usual m = d ln d
(256 for d = 64) costs about 4 N d m multiply-adds per head for the projections and the two kernel
products, as many as the block's own projections at d = 64: a ViT-S/16 student at 512 and 1024 px then ran
at 0.75-0.78 of its floor (the attention-free model, `floor_model`) on this CPU, and no implementation
can pass ~0.82 there. With m = d and the projection folded into qkv (below) it runs at the floor's speed
less its kernel products. The price is a noisier estimate (error ~ 1/sqrt(m)); measured on the demo's MAE
encoder (head dim 32) converted without labels, m = d against m = 3d: map KL after stage 1 1.5-2.4x
higher, k-NN top-1 65.3 against 65.9 (the teacher 64.9). ``num_features=256`` restores the paper's count.
Exponentials are taken base 2 with log2(e) folded into the projection (exp2 is cheaper on CPU).

Folded inference (`KernelAttention`): u = x' w is linear in the block's input, so plain inference calls
project x straight to u_q, u_k. Keys also need |k|^2, which u_k gives back when the rows of the projection
are orthogonal and m = d: w_f = n_f o_f with o_f an orthonormal basis, so |k|^2 = sum_f (u_f / (s n_f))^2
(s the folded scale). Other projections (i.i.d. rows, m != d) take the plain path.

Precision on GPU (`PERFORMER_BF16`): the exponent w.x' must not be rounded to bf16. Rounding the projection
to bf16 moves an exponent of size |x'||w| (tens, for peaked maps) by about 2^-9 of that, i.e. 0.05-0.5, and
the feature by 5-60 %. So the projection is split into two bf16 matrices hi + lo (`split_bf16`, 16
significant bits): x @ hi + x @ lo with fp32 accumulation is exact to about 2^-17 for bf16 x, at bf16
matmul speed. |k|^2 / 2, the stabilisers and exp2 run in fp32; the features, in (0, 1 + eps] after
stabilisation, are rounded once to bf16 for the two kernel products (fp32 accumulation).
"""

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
    """(num_features, dim) random projection: orthogonal blocks with Gaussian row norms, or i.i.d. Gaussian."""
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)
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
    """FAVOR+ kernel attention.

    Options: ``num_features`` (m, default d), ``orthogonal`` (default True),
    ``redraw_interval`` (redraw every that many training forwards; None = never),
    ``feature_seed`` (seed of the first draw, for reproducible students).
    """

    eps: float = 1e-6
    rope_why = (
        "keeps row_stochastic and its target: positive features exp(w.x - x.x/2) estimate exp(q.k) for "
        "any q, k, and rope keeps norms, so they estimate the teacher's rope softmax"
    )
    precision = PERFORMER_BF16

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
        self.num_features = int(num_features or max(1, d))
        if self.num_features < 1:
            raise InputError(f"num_features must be >= 1, got {num_features}")
        if redraw_interval is not None and redraw_interval < 1:
            raise InputError(f"redraw_interval must be >= 1 or None, got {redraw_interval}")
        self.orthogonal = orthogonal
        self.redraw_interval = redraw_interval
        self.feature_seed = feature_seed
        self._forwards_since_redraw = 0
        self.register_buffer(
            "feature_projection",
            torch.empty(self.num_features, d, device=kwargs.get("device")),
            persistent=True,
        )
        generator = torch.Generator().manual_seed(feature_seed) if feature_seed is not None else None
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh random projection (on CPU with ``generator``, then moved to the buffer's device)."""
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
        """x' . w (log2 e folded in), in the compute dtype at its accuracy: for bf16 x, as x @ hi + x @ lo."""
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
        """q and k through the (pre-scaled) projection (2 N d m multiply-adds); keys' |k|^2 / 2 (N d mul,
        N (d - 1) add, N mul) subtracted (N m add); per q and k the stabiliser (max: other, shift: add),
        exp2 (other) and + eps (add)."""
        n, d, m = num_tokens, self.head_dim, self.num_features
        projections = 2 * matmul_ops(n, d, m)
        key_norm = OpCounts(mul=n * d + n, add=n * (d - 1) + n * m)
        stabilised = OpCounts(add=2 * n * m, other=n * (m - 1) + 2 * n * m) + OpCounts(other=n * m - 1)
        return projections + key_norm + stabilised + OpCounts(add=2 * n * m), m

    # ----------------------------------------------------------------- folded inference
    _key_scales: tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None = None

    def folds(self) -> bool:
        return self.num_features == self.head_dim and self._norm_scales() is not None

    def _norm_scales(self) -> torch.Tensor | None:
        """c_f with |k|^2 (0.5 / sqrt(d) log2 e) = sum_f (u_f c_f)^2 for u = k @ `_projection`, where the
        projection's rows are orthogonal (W W^T diagonal to float tolerance); None otherwise. Kept until the
        projection changes (a redraw, a load)."""
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_features={self.num_features}, redraw_interval={self.redraw_interval}"
