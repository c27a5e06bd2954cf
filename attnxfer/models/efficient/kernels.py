"""Kernel (linear) attention: the shared O(N) core, its implicit map, and feature maps.

With a non-negative feature map phi, kernel attention is
    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j)),
the product of the row-stochastic map A_ij = phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j')
with v, computed without forming A. Feature maps add a small ``eps`` *inside* phi (not to the
denominator), so the map stays exactly row-stochastic and ``A @ v`` equals the core exactly.

Speed (inference): where one (batch, head) pair's features are large (`head_groups`: 4097 tokens and up for a
ViT-S head) the core runs without autograd a group of pairs at a time, so each group's features are made,
reduced to the key state and read out while they are still in cache, instead of one pass per operation over
every head's (N, m) features; the read-out then writes into the (B, N, H, d) layout that the output
projection reads, so merging the heads costs no copy. Otherwise (smaller inputs, autograd, torch.compile)
one batched pass computes the same sums.

Precision (`KERNEL_BF16`, for attentions that declare it): on GPU the features are stored in bf16 and the
two kernel products take bf16 operands, while the key state sum_j phi(k_j) [v_j, 1] and the read-out
accumulate in fp32 (`matmul_fp32`, `sum_fp32`) and the division runs in fp32. Each feature map says
(`FeatureMapKind.bf16_evaluation`) whether it may also be *evaluated* in bf16 or is evaluated in fp32 and
rounded once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ..attention.interface import MapKind
from ..attention.numerics import (
    PrecisionPolicy,
    compute_dtype,
    in_compute_dtype,
    matmul_fp32,
    matmul_split,
    sum_fp32,
)
from ..attention.opcount import OpCounts, matmul_ops
from .base import EfficientAttention, snapshot, unchanged

#: A feature tensor (B, H, N, m), or a tuple of blocks whose concatenation along m is one.
FeatureBlocks = torch.Tensor | tuple[torch.Tensor, ...]


#: Every head: the default of the feature maps' ``heads`` (which heads' parameters a slice of q / k takes).
ALL_HEADS = slice(None)
#: Feature entries (batch x heads x tokens x features) of one group of the inference core (`head_groups`):
#: 2M fp32 = 8 MiB. A pair with an eighth of that or more (256K entries: 1 MiB, 4097 tokens of 64 features)
#: runs alone: measured on this CPU (ViT-S/16 heads), single pairs won from 4097 tokens on and lost at 1025.
FEATURE_CHUNK_ELEMENTS = 1 << 21


def _as_blocks(features: FeatureBlocks) -> tuple[torch.Tensor, ...]:
    return (features,) if isinstance(features, torch.Tensor) else tuple(features)


#: The policy of kernel attentions whose features are safe in bf16 (see the module docstring).
KERNEL_BF16 = PrecisionPolicy(
    bf16=("q/k features (stored)", "key-state operands phi(k), v", "read-out operands phi(q), [KV | z]"),
    fp32=(
        "sum_j phi(k_j) v_j^T and the normaliser sum_j phi(k_j) (accumulated over all N keys)",
        "read-out accumulation",
        "division by the normaliser",
    ),
    why="non-negative features rounded once (at most 2^-8 relative, bf16's unit roundoff); every sum over "
    "tokens accumulates in fp32, so the output's error stays within a few 2^-8 sum_j A_ij |v_j|, as flash "
    "attention's does",
)


def linear_state(phi_k: FeatureBlocks, v: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per feature block: sum_j phi(k_j) v_j^T (B, H, m, d) and sum_j phi(k_j) (B, H, m, 1), both accumulated
    and returned in fp32 (float64 kept) whatever the operands' dtype."""
    return tuple(
        (matmul_fp32(block.transpose(-2, -1), v), sum_fp32(block, dim=-2).unsqueeze(-1))
        for block in _as_blocks(phi_k)
    )


def linear_readout(phi_q: FeatureBlocks, state) -> torch.Tensor:
    """phi(q_i)^T KV / phi(q_i)^T z, summed over feature blocks, in fp32 (float64 kept).

    KV and z are joined into one (m, d + 1) matrix so each feature block is read once: one
    matmul instead of a matmul plus a matrix-vector product (measured ~25% faster on CPU). With bf16
    features the joined state is rounded to bf16 for the product (fp32 accumulation, fp32 result).
    """
    total = None
    for block_q, (kv, normaliser) in zip(_as_blocks(phi_q), state, strict=True):
        joined = torch.cat((kv, normaliser), dim=-1).to(block_q.dtype)
        total = _accumulate(total, matmul_fp32(block_q, joined))
    numerator, denominator = total[..., :-1], total[..., -1:]
    # In place without autograd: the result is a strided view of ``total``, no second (N, d) buffer.
    return numerator.div_(denominator) if not total.requires_grad else numerator / denominator


def linear_readout_into(phi_q: FeatureBlocks, state, out: torch.Tensor) -> torch.Tensor:
    """`linear_readout` written into ``out`` (a strided (..., N, d) view in the compute dtype), without autograd.

    For one (batch, head) pair the numerator phi(q) KV and the denominator phi(q) z are separate products
    (a d-wide product and a matrix-vector product ran ~1.4x faster on this CPU than one (d + 1)-wide product,
    an odd width the GEMM kernels finish in a slow remainder loop); for several pairs the joined product of
    `linear_readout` (a batched matrix-vector product is the slow one). The division writes ``out``.
    """
    blocks = _as_blocks(phi_q)
    if math.prod(blocks[0].shape[:-2]) > 1:
        total = None
        for block_q, (kv, normaliser) in zip(blocks, state, strict=True):
            total = _accumulate(
                total, matmul_fp32(block_q, torch.cat((kv, normaliser), -1).to(block_q.dtype))
            )
        return torch.div(total[..., :-1], total[..., -1:], out=out)
    numerator = denominator = None
    for block_q, (kv, normaliser) in zip(blocks, state, strict=True):
        numerator = _accumulate(numerator, matmul_fp32(block_q, kv.to(block_q.dtype)))
        denominator = _accumulate(denominator, matmul_fp32(block_q, normaliser.to(block_q.dtype)))
    return torch.div(numerator, denominator, out=out)


def _accumulate(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    if total is None:
        return term
    return total.add_(term) if not (total.requires_grad or term.requires_grad) else total + term


def needs_autograd(module: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` records a graph: grad mode on and an input or a parameter that wants one."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def head_groups(
    batch: int, heads: int, per_head: int, budget: int = FEATURE_CHUNK_ELEMENTS
) -> list[tuple[slice, slice]]:
    """(batch slice, head slice) groups that cover a batch x heads grid in order, each holding up to ``budget``
    // ``per_head`` (batch, head) pairs, or one pair where ``per_head`` is an eighth of ``budget`` or more:
    whole batch items of all heads where several fit, else runs of heads of one item."""
    # One pair per group once a pair alone fills an eighth of the budget: its features then stay in cache
    # between the passes, and the read-out takes the single-pair path of `linear_readout_into`.
    pairs = budget // per_head if 8 * per_head < budget else 1
    if pairs >= batch * heads:
        return [(ALL_HEADS, ALL_HEADS)]
    if pairs >= heads:
        step = pairs // heads
        return [(slice(b, min(b + step, batch)), ALL_HEADS) for b in range(0, batch, step)]
    return [
        (slice(b, b + 1), slice(h, min(h + pairs, heads)))
        for b in range(batch)
        for h in range(0, heads, pairs)
    ]


def add_scalar(x: torch.Tensor, value: float) -> torch.Tensor:
    """x + value, in place when autograd does not need x (saves one (B, H, N, m) buffer)."""
    return x.add_(value) if not x.requires_grad else x + value


def kernel_core_counts(n: int, d: int, m: int) -> OpCounts:
    """One (batch, head) of the linear core on m features: the key state phi(k)^T [v, 1] (m x (d + 1)), the
    read-out phi(q) [KV | z] and N d divisions."""
    return matmul_ops(m, n, d + 1) + matmul_ops(n, m, d + 1) + OpCounts(mul=n * d)


class KernelAttention(EfficientAttention):
    """Base for attentions of the form phi(q) phi(k)^T, row-normalised.

    Subclasses give ``query_features`` and ``key_features`` (tensors, or tuples of blocks that
    the forward path never concatenates; the map path does).

    Folding (inference): where phi starts with a linear map of q or k (Hedgehog's W, Performer's random
    projection), that map is linear in the block's input x too, so a subclass may give it (`fold_maps`):
    x -> [u_q, u_k] is then one linear layer whose rows are qkv's q/k rows times the map
    (`folded_projection`), and `folded_query_features` / `folded_key_features` finish phi from u. A forward without autograd, in
    fp32 or float64 without autocast, and with nothing between q/k and phi (no q/k norm, rope, mask or
    transfer capture) then projects once, at the cost of ``qkv`` alone when u is as wide as q, and the
    map's own (N, d) x (d, m) products are gone. Every other call takes the plain path, with which it agrees
    to rounding.
    """

    map_kind = MapKind.ROW_STOCHASTIC
    rope_keeps_map_kind = True
    rope_why = (
        "keeps row_stochastic: the features phi are non-negative for every input and rope rotates q, k "
        "before phi (rope applied after phi would lose the sign)"
    )

    def query_features(self, q: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(q), non-negative, in the compute dtype; ``q`` holds the heads ``heads`` (per-head parameters
        are sliced to them)."""
        raise NotImplementedError

    def key_features(self, k: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(k), non-negative, in the compute dtype; ``k`` holds the heads ``heads``."""
        raise NotImplementedError

    def readout_query_features(self, q: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(q) up to a positive factor per query row (the read-out's normaliser cancels it), what the
        inference core reads: `query_features` unless a class saves work by leaving the factor out."""
        return self.query_features(q, heads)

    def feature_blocks(self, q: torch.Tensor, k: torch.Tensor) -> tuple[FeatureBlocks, FeatureBlocks]:
        return self.query_features(q), self.key_features(k)

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q), phi(k) (B, H, N, m) as single tensors."""
        return tuple(torch.cat(_as_blocks(f), dim=-1) for f in self.feature_blocks(q, k))

    def feature_counts(self, num_tokens: int) -> tuple[OpCounts, int] | None:
        """Operations of one (batch, head)'s q and k features, and the feature width m; None: not counted."""
        return None

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts | None:
        """Per (batch, head): the features (``feature_counts``), the key state phi(k)^T [v, 1] (m x (d + 1)),
        the read-out phi(q) [KV | z] and N d divisions."""
        counted = self.feature_counts(num_tokens)
        if counted is None:
            return None
        features, m = counted
        return (features + kernel_core_counts(num_tokens, self.head_dim, m)) * (batch * self.num_heads)

    #: Feature entries per group of the inference core (`head_groups`).
    feature_chunk_elements: int = FEATURE_CHUNK_ELEMENTS

    def feature_width(self) -> int:
        """m, the width of phi (sizes the inference core's head groups); the head dim where uncounted."""
        counted = self.feature_counts(1)
        return counted[1] if counted is not None else self.head_dim

    def _attend(self, q, k, v):
        graph = needs_autograd(self, q, k, v) or torch.compiler.is_compiling()  # a compiler fuses batched ops
        query_features = self.query_features if graph else self.readout_query_features
        return self._linear_core(q, k, v, self.key_features, query_features, graph=graph)

    def _linear_core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_features: Callable[[torch.Tensor, slice], FeatureBlocks],
        query_features: Callable[[torch.Tensor, slice], FeatureBlocks],
        *,
        graph: bool,
    ) -> torch.Tensor:
        """The O(N) core on whatever ``key_features`` / ``query_features`` make of k and q (each called with a
        slice of heads): one batched pass, or without a ``graph`` head groups (`head_groups`)."""
        # Keys first: their features reduce to (m x d) sums and (without autograd) are freed
        # before the query features exist, so only one feature tensor is live.
        B, H, N, d = v.shape
        groups = [] if graph else head_groups(B, H, N * self.feature_width(), self.feature_chunk_elements)
        if len(groups) <= 1:  # one batched pass (whole-model runs were no faster with the buffer below here)
            state = linear_state(key_features(k, ALL_HEADS), v)
            return linear_readout(query_features(q, ALL_HEADS), state)
        # (B, N, H, d) memory: the caller's head merge (transpose + reshape) is then a view
        out = v.new_empty(B, N, H, d, dtype=compute_dtype(v)).transpose(1, 2)
        for batch, heads in groups:
            state = linear_state(key_features(k[batch, heads], heads), v[batch, heads])
            linear_readout_into(query_features(q[batch, heads], heads), state, out[batch, heads])
        return out

    def _map_context(self, q, k):
        return self.features(q, k)

    def _map_rows(self, context, rows):
        phi_q, phi_k = context
        scores = phi_q[:, :, rows] @ phi_k.transpose(-2, -1)
        return scores / scores.sum(dim=-1, keepdim=True)

    # ----------------------------------------------------------------- folded inference
    def forward(self, x, attn_mask=None, is_causal=False, *, rope=None):
        if rope is None and attn_mask is None and not is_causal and self._folds(x):
            return self._output(x, self._folded_attend(x).to(x.dtype))
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope)

    def folds(self) -> bool:
        """Whether this attention has a folded path for plain inference calls (`fold_maps`; the subclass's
        own conditions, e.g. that folding saves work); False unless a subclass gives one."""
        return False

    def fold_maps(self, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (H or 1, m, d) and c (H or 1, m) with u = A q + c per head: the linear start of phi for q
        (``which`` 0) or k (1), which `folded_projection` multiplies into qkv's rows."""
        raise NotImplementedError

    def _folds(self, x: torch.Tensor) -> bool:
        # the subclass's own check last: Performer's looks at its projection (tensor work a compiler would
        # break its graph on, and the plain path is what a compiled graph runs anyway)
        return (
            not torch.compiler.is_compiling()
            and self.io is None
            and type(self.qkv) is nn.Linear
            and isinstance(self.q_norm, nn.Identity)
            and isinstance(self.k_norm, nn.Identity)
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and not needs_autograd(self, x)
            and self.folds()
        )

    #: The folded layer and the `snapshot` of the weights it was made from.
    _folded: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def fold_sources(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors `fold_maps` reads (the fold is remade when one of them changes)."""
        return ()

    def folded_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (2 H m + H d, C), bias) of the layer x -> [u_q, u_k, v]: per head A W_q,k and A b_q,k + c,
        then qkv's v rows. Kept between calls until qkv or a `fold_sources` tensor changes, compared by value
        (`snapshot`: a fused AdamW step bumps no version counter, and a stale fold once gave a converted
        student the features it had before stage 1)."""
        sources = (self.qkv.weight, self.qkv.bias, *self.fold_sources())
        if self._folded is not None and unchanged(self._folded[0], sources):
            return self._folded[1]
        H, d = self.num_heads, self.head_dim
        weight = self.qkv.weight.detach().view(3, H, d, -1)
        bias = self.qkv.bias.detach().view(3, H, d) if self.qkv.bias is not None else None
        with torch.no_grad():
            rows, biases = [], []
            for which in (0, 1):
                a, c = self.fold_maps(which)  # (H or 1, m, d), (H or 1, m)
                rows.append(torch.matmul(a, weight[which]).flatten(0, 1))
                folded_bias = c if bias is None else (a @ bias[which].unsqueeze(-1)).squeeze(-1) + c
                biases.append(folded_bias.expand(H, -1).flatten())
            rows.append(weight[2].flatten(0, 1))
            biases.append(bias[2].flatten() if bias is not None else weight.new_zeros(H * d))
            result = torch.cat(rows), torch.cat(biases)
        self._folded = (snapshot(sources), result)
        return result

    def folded_query_features(self, u: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(q) (up to a positive factor per row, as `readout_query_features`) from the folded u_q."""
        raise NotImplementedError

    def folded_key_features(self, u: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(k) from the folded u_k."""
        raise NotImplementedError

    @torch.no_grad()
    def _folded_attend(self, x: torch.Tensor) -> torch.Tensor:
        # One layer for u_q, u_k and v, as qkv is one: at 4,097 tokens the core's head groups then read each
        # head's u while it is in cache (separate contiguous outputs, activated whole, were 15 % slower there).
        y = F.linear(x, *self.folded_projection())
        width = (y.shape[-1] - self.attn_dim) // 2
        u_q, u_k, v = (
            t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for t in y.split((width, width, self.attn_dim), -1)
        )
        return self._linear_core(
            u_q, u_k, v, self.folded_key_features, self.folded_query_features, graph=False
        )


class ReLUFeatures(nn.Module):
    """phi(x) = relu(x) + eps. ReLU is positively homogeneous, so no d^-1/4 scaling is needed."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_scalar(F.relu(x), self.eps)


class ELUFeatures(nn.Module):
    """phi(x) = elu(x) + 1 (+ eps, so it cannot underflow to zero for very negative x).

    Computed as exp(min(x, 0)) + max(x, 0) + eps: the same function (x + 1 above 0, e^x below), without
    torch's CPU ``elu`` kernel (~9 ns an entry here: 3.6 ms of a ViT-S block at 1,025 tokens, most of the
    attention's cost; these passes take ~1 ms) and without elu(x) + 1's cancellation: in bf16, elu(x) rounds
    to -1 below x = -5.5 and elu(x) + 1 loses every digit (x = -6: 0.0039 or 0 instead of 0.0025), while e^x
    keeps one rounding. `FEATURE_MAPS` still evaluates it in fp32: the d^-1/4 scaling before it, rounded to
    bf16, would move e^x by |x| 2^-9."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below = x.clamp(max=0.0).exp_() if not x.requires_grad else x.clamp(max=0.0).exp()
        return add_scalar(
            below.add_(x.clamp(min=0.0)) if not below.requires_grad else below + x.clamp(min=0.0), self.eps
        )


class HedgehogFeatures(nn.Module):
    """Learnable per-head feature map with both signs: [softmax(xW + b), softmax(-(xW + b))].

    W (H, d, m) starts as the identity (m = d) so the map starts from the raw q/k directions;
    the two softmaxes keep features positive while letting negative similarities count
    (Zhang et al. 2024, "The Hedgehog & the Porcupine"). Output dimension 2m.
    Plain parameters, not nn.Linear, so timm's ViT init does not overwrite the identity.
    """

    def __init__(
        self, num_heads: int, head_dim: int, feature_dim: int | None = None, device=None, dtype=None
    ):
        super().__init__()
        feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        return 2 * self.weight.shape[-1]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            H, d, m = self.weight.shape
            self.weight.copy_(torch.eye(d, m, dtype=self.weight.dtype).expand(H, d, m))
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.blocks(x), dim=-1)

    def blocks(
        self, x: torch.Tensor, eps: float = 0.0, heads: slice = ALL_HEADS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two signs as separate blocks (+ eps), for `linear_state` / `linear_readout` without a concatenation; ``x``
        holds the heads ``heads``. (One product with [W, -W] and one softmax over a (2, m) view ran 1.1-1.2x
        slower here: two m-wide products beat one 2m-wide one on this CPU.)"""
        # bf16 x: u feeds the softmaxes' exponentials, so it is computed at fp32 accuracy (W split into two
        # bf16 halves, `matmul_split`; a bf16-rounded W moves u by |u| 2^-8); the softmaxes run in fp32 and
        # the features are rounded once to x's dtype.
        u = matmul_split(x, self.weight[heads])
        u = u + self.bias[heads].to(u.dtype)[:, None, :]  # (B, H, N, m)
        return self.activate(u, eps, x.dtype)

    def activate(
        self, u: torch.Tensor, eps: float = 0.0, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two signs' softmaxes (+ eps) of the map's logits u = x W + b, rounded to ``dtype`` (two blocks:
        one joined (N, 2m) tensor measured no faster in the kernel core). Without autograd u is negated in
        place for the second sign (one (N, m) buffer fewer)."""
        positive = add_scalar(u.softmax(dim=-1), eps)
        negative = add_scalar((u.neg_() if not u.requires_grad else -u).softmax(dim=-1), eps)
        dtype = dtype or u.dtype
        return positive.to(dtype), negative.to(dtype)


@dataclass(frozen=True)
class FeatureMapKind:
    """A named feature map: how to build its (q, k) pair, and whether it is learned.

    ``learned`` maps (Hedgehog) are separate modules for q and k that read raw q/k and yield blocks;
    the others are one parameter-free module shared by q and k, applied to d^-1/4-scaled inputs.
    """

    build: Callable[..., tuple[nn.Module, nn.Module]]
    learned: bool
    #: (tokens, head dim, feature dim or None) -> (operations of the q and k features, their width)
    counts: Callable[[int, int, int | None], tuple[OpCounts, int]] | None = None
    #: True: evaluated on bf16 inputs in bf16 (accurate to the last rounding); False: evaluated in fp32 and
    #: rounded once (`evaluate_features`). Learned maps handle their own dtypes (Hedgehog: bf16 projection
    #: operands, fp32 softmax).
    bf16_evaluation: bool = False


def _shared(module: type[nn.Module]) -> Callable[..., tuple[nn.Module, nn.Module]]:
    def build(num_heads, head_dim, feature_dim=None, device=None, dtype=None):
        f = module()
        return f, f

    return build


def _hedgehog_pair(num_heads, head_dim, feature_dim=None, device=None, dtype=None):
    return tuple(HedgehogFeatures(num_heads, head_dim, feature_dim, device=device, dtype=dtype) for _ in "qk")


def _relu_counts(n: int, d: int, m: int | None = None) -> tuple[OpCounts, int]:
    """relu (other) and + eps (add) on the N d entries of q and of k; width d."""
    return OpCounts(add=2 * n * d, other=2 * n * d), d


def _elu_counts(n: int, d: int, m: int | None = None) -> tuple[OpCounts, int]:
    """d^-1/4 scaling (mul), elu (other) and + 1 + eps (add) on the N d entries of q and of k; width d."""
    return OpCounts(mul=2 * n * d, add=2 * n * d, other=2 * n * d), d


def _hedgehog_counts(n: int, d: int, m: int | None = None) -> tuple[OpCounts, int]:
    """Per q and k: x W + b (N d m multiply-adds), softmax of both signs over m, + eps; width 2m."""
    m = m or d
    softmax = OpCounts(mul=n * m, add=n * m + n * (m - 1) + n * m, other=n * m + n * (m - 1))
    one = matmul_ops(n, d, m) + OpCounts(add=n * m) + 2 * softmax
    return 2 * one, 2 * m


#: The feature maps an attention can name (e.g. the window+linear hybrid's ``kernel`` option).
FEATURE_MAPS: dict[str, FeatureMapKind] = {
    # relu(x) of a bf16 value is exact; + eps rounds at most 2^-9 relative.
    "relu": FeatureMapKind(_shared(ReLUFeatures), learned=False, counts=_relu_counts, bf16_evaluation=True),
    # the d^-1/4 scaling before elu, rounded to bf16, would move e^x by |x| 2^-9 (`ELUFeatures`).
    "elu": FeatureMapKind(_shared(ELUFeatures), learned=False, counts=_elu_counts, bf16_evaluation=False),
    "hedgehog": FeatureMapKind(_hedgehog_pair, learned=True, counts=_hedgehog_counts),
}


def feature_map_kind(name: str) -> FeatureMapKind:
    if name not in FEATURE_MAPS:
        raise InputError(f"unknown feature map {name!r}; choose one of {', '.join(map(repr, FEATURE_MAPS))}")
    return FEATURE_MAPS[name]


def evaluate_features(kind: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for the feature map named ``kind``, in x's dtype: evaluated directly where the map declares
    ``bf16_evaluation``, else in fp32 and rounded once (no-op casts for fp32 inputs)."""
    return fn(x) if feature_map_kind(kind).bf16_evaluation else in_compute_dtype(fn, x)


def scaled_for_kernel(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x * d^-1/4: q' . k' then equals the softmax logit q . k / sqrt(d)."""
    return x * head_dim**-0.25
