"""Kernel (linear) attention: the O(N) core phi(q) (sum_j phi(k_j) [v_j, 1]), its implicit map and feature maps.

Feature maps add ``eps`` inside phi, not to the denominator, so the map is exactly row-stochastic and
``A @ v`` equals the core. Precision: `KERNEL_BF16`; speed: `head_groups`."""

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


#: The policy of kernel attentions whose features are safe in bf16.
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
    """Per feature block: sum_j phi(k_j) v_j^T and sum_j phi(k_j), accumulated and returned in fp32."""
    return tuple(
        (matmul_fp32(block.transpose(-2, -1), v), sum_fp32(block, dim=-2).unsqueeze(-1))
        for block in _as_blocks(phi_k)
    )


def linear_readout(phi_q: FeatureBlocks, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """phi(q_i)^T KV / phi(q_i)^T z, summed over feature blocks, in fp32 (float64 kept); with ``out`` (no
    autograd) written into it.

    KV and z are joined into one (m, d + 1) matrix so each block is read once (~25% faster on CPU). Into
    ``out``, one (batch, head) pair takes separate numerator and denominator products instead (~1.4x faster on
    this CPU than one odd (d + 1)-wide product; batched, the matrix-vector product is the slow one)."""
    blocks = _as_blocks(phi_q)
    if out is not None and math.prod(blocks[0].shape[:-2]) == 1:
        numerator = denominator = None
        for block_q, (kv, normaliser) in zip(blocks, state, strict=True):
            numerator = _accumulate(numerator, matmul_fp32(block_q, kv.to(block_q.dtype)))
            denominator = _accumulate(denominator, matmul_fp32(block_q, normaliser.to(block_q.dtype)))
        return torch.div(numerator, denominator, out=out)
    total = None
    for block_q, (kv, normaliser) in zip(blocks, state, strict=True):
        joined = torch.cat((kv, normaliser), dim=-1).to(block_q.dtype)
        total = _accumulate(total, matmul_fp32(block_q, joined))
    numerator, denominator = total[..., :-1], total[..., -1:]
    if out is not None:
        return torch.div(numerator, denominator, out=out)
    # In place without autograd: the result is a strided view of ``total``, no second (N, d) buffer.
    return numerator.div_(denominator) if not total.requires_grad else numerator / denominator


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
    """(batch slice, head slice) groups covering batch x heads in order, each up to ``budget`` // ``per_head``
    pairs, or one pair when a pair fills an eighth of ``budget``: its features then stay in cache between
    passes and the read-out takes `linear_readout`'s single-pair path (inference only; measured faster from
    4097 tokens on)."""
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


class KernelAttention(EfficientAttention):
    """Base for phi(q) phi(k)^T, row-normalised; subclasses give ``query_features`` / ``key_features``.

    Folding (inference): where phi starts with a linear map (`fold_maps`), it is multiplied into qkv's q/k rows
    (`folded_projection`), so plain fp32 calls without autograd, norms or rope project once and skip the
    map's own (N, d) x (d, m) products; every other call takes the plain path, equal to rounding."""

    map_kind = MapKind.ROW_STOCHASTIC
    rope_keeps_map_kind = True
    rope_why = (
        "keeps row_stochastic: the features phi are non-negative for every input and rope rotates q, k "
        "before phi (rope applied after phi would lose the sign)"
    )

    def query_features(self, q: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(q), non-negative, in the compute dtype; ``q`` holds the heads ``heads``."""
        raise NotImplementedError

    def key_features(self, k: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        raise NotImplementedError

    def readout_query_features(self, q: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
        """phi(q) up to a positive factor per row (the normaliser cancels it)."""
        return self.query_features(q, heads)

    def feature_blocks(self, q: torch.Tensor, k: torch.Tensor) -> tuple[FeatureBlocks, FeatureBlocks]:
        return self.query_features(q), self.key_features(k)

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(_as_blocks(f), dim=-1) for f in self.feature_blocks(q, k))

    def feature_counts(self, num_tokens: int) -> tuple[OpCounts, int] | None:
        """Operations of one (batch, head)'s q and k features, and the width m; None: not counted."""
        return None

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts | None:
        counted = self.feature_counts(num_tokens)
        if counted is None:
            return None
        features, m = counted
        n, d = num_tokens, self.head_dim
        # per (batch, head): the key state, the read-out and N d divisions
        core = matmul_ops(m, n, d + 1) + matmul_ops(n, m, d + 1) + OpCounts(mul=n * d)
        return (features + core) * (batch * self.num_heads)

    #: Feature entries per group of the inference core (`head_groups`).
    feature_chunk_elements: int = FEATURE_CHUNK_ELEMENTS

    def feature_width(self) -> int:
        """m (sizes the head groups); the head dim where uncounted."""
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
        """The O(N) core: one batched pass, or without a ``graph`` head groups (`head_groups`)."""
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
            linear_readout(query_features(q[batch, heads], heads), state, out[batch, heads])
        return out

    def _map_context(self, q, k):
        return self.features(q, k)

    def _map_rows(self, context, rows):
        phi_q, phi_k = context
        scores = phi_q[:, :, rows] @ phi_k.transpose(-2, -1)
        return scores / scores.sum(dim=-1, keepdim=True)

    def forward(self, x, attn_mask=None, is_causal=False, *, rope=None):
        if rope is None and attn_mask is None and not is_causal and self._folds(x):
            return self._output(x, self._folded_attend(x).to(x.dtype))
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope)

    def folds(self) -> bool:
        """Whether a subclass's folded path applies (e.g. folding saves work)."""
        return False

    def fold_maps(self, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (H or 1, m, d) and c (H or 1, m) with u = A q + c: phi's linear start for q (0) or k (1)."""
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
        return ()

    def folded_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of x -> [u_q, u_k, v], kept until qkv or a `fold_sources` tensor changes by
        value (`snapshot`: a fused AdamW step bumps no version counter, and a stale fold once gave a converted
        student its pre-stage-1 features)."""
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
        """phi(q), up to a positive factor per row, from the folded u_q."""
        raise NotImplementedError

    def folded_key_features(self, u: torch.Tensor, heads: slice = ALL_HEADS) -> FeatureBlocks:
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

    eps: float = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_scalar(F.relu(x), self.eps)


class ELUFeatures(nn.Module):
    """phi(x) = elu(x) + 1 + eps, computed as exp(min(x, 0)) + max(x, 0) + eps.

    Avoids torch's CPU ``elu`` kernel (~9 ns an entry: 3.6 ms of a ViT-S block at 1,025 tokens; these passes
    take ~1 ms) and elu(x) + 1's cancellation in bf16 (x = -6: 0.0039 or 0 instead of 0.0025)."""

    eps: float = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below = x.clamp(max=0.0).exp_() if not x.requires_grad else x.clamp(max=0.0).exp()
        return add_scalar(
            below.add_(x.clamp(min=0.0)) if not below.requires_grad else below + x.clamp(min=0.0), self.eps
        )


class HedgehogFeatures(nn.Module):
    """Hedgehog's learnable per-head map [softmax(xW + b), softmax(-(xW + b))] (Zhang et al. 2024).

    W starts as the identity; plain parameters, not nn.Linear, so timm's ViT init leaves it alone."""

    def __init__(
        self, num_heads: int, head_dim: int, feature_dim: int | None = None, device=None, dtype=None
    ):
        super().__init__()
        feature_dim = head_dim if feature_dim is None else feature_dim
        if feature_dim < 1:
            raise InputError(f"feature_dim must be >= 1, got {feature_dim}")
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
        """The two signs as separate blocks (+ eps); ``x`` holds the heads ``heads``. (One [W, -W]
        product ran 1.1-1.2x slower here than two m-wide ones.)"""
        # bf16 x: u feeds the softmaxes' exponentials, so it is computed at fp32 accuracy (W split into two
        # bf16 halves, `matmul_split`; a bf16-rounded W moves u by |u| 2^-8); the softmaxes run in fp32 and
        # the features are rounded once to x's dtype.
        u = matmul_split(x, self.weight[heads])
        u = u + self.bias[heads].to(u.dtype)[:, None, :]  # (B, H, N, m)
        return self.activate(u, eps, x.dtype)

    def activate(
        self, u: torch.Tensor, eps: float = 0.0, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two signs' softmaxes (+ eps) of u = x W + b, rounded to ``dtype`` (u negated in place
        without autograd)."""
        positive = add_scalar(u.softmax(dim=-1), eps)
        negative = add_scalar((u.neg_() if not u.requires_grad else -u).softmax(dim=-1), eps)
        dtype = dtype or u.dtype
        return positive.to(dtype), negative.to(dtype)


@dataclass(frozen=True)
class FeatureMapKind:
    """A named feature map: its (q, k) builder (learned maps: one per q and k, reading raw q/k;
    others: one shared module on d^-1/4-scaled inputs)."""

    build: Callable[..., tuple[nn.Module, nn.Module]]
    learned: bool
    #: (tokens, head dim, feature dim or None) -> (operations of the q and k features, their width)
    counts: Callable[[int, int, int | None], tuple[OpCounts, int]]


def _shared(module: type[nn.Module]) -> Callable[..., tuple[nn.Module, nn.Module]]:
    def build(num_heads, head_dim, feature_dim=None, device=None, dtype=None):
        f = module()
        return f, f

    return build


def _hedgehog_pair(num_heads, head_dim, feature_dim=None, device=None, dtype=None):
    return tuple(HedgehogFeatures(num_heads, head_dim, feature_dim, device=device, dtype=dtype) for _ in "qk")


def _relu_counts(n: int, d: int, m: int | None = None) -> tuple[OpCounts, int]:
    return OpCounts(add=2 * n * d, other=2 * n * d), d


def _elu_counts(n: int, d: int, m: int | None = None) -> tuple[OpCounts, int]:
    return OpCounts(mul=2 * n * d, add=2 * n * d, other=2 * n * d), d


def _hedgehog_counts(n: int, d: int, m: int | None = None) -> tuple[OpCounts, int]:
    """Per q and k: x W + b (N d m multiply-adds), softmax of both signs over m, + eps; width 2m."""
    m = m or d
    softmax = OpCounts(mul=n * m, add=n * m + n * (m - 1) + n * m, other=n * m + n * (m - 1))
    one = matmul_ops(n, d, m) + OpCounts(add=n * m) + 2 * softmax
    return 2 * one, 2 * m


#: The feature maps an attention can name (e.g. the window+linear hybrid's ``kernel`` option).
FEATURE_MAPS: dict[str, FeatureMapKind] = {
    "relu": FeatureMapKind(_shared(ReLUFeatures), learned=False, counts=_relu_counts),
    "elu": FeatureMapKind(_shared(ELUFeatures), learned=False, counts=_elu_counts),
    "hedgehog": FeatureMapKind(_hedgehog_pair, learned=True, counts=_hedgehog_counts),
}


def scaled_for_kernel(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x * d^-1/4: q' . k' then equals the softmax logit q . k / sqrt(d)."""
    return x * head_dim**-0.25
