"""2-D window attention, and the LoLCATs-style window + linear hybrid with one shared normaliser.

Window: grid queries take a softmax over their window plus the prefix tokens; prefix queries, exact softmax
rows. Hybrid: exp(s q.k - c_i) inside the window, gamma_h phi(q).phi(k) outside (the total kernel sum minus
the window's), one normaliser, so rows sum to 1 exactly. Precision: `WINDOW_BF16`, `WINDOW_LINEAR_BF16`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ..attention.interface import MapKind, as_grid
from ..attention.numerics import PrecisionPolicy, compute_dtype, in_compute_dtype, matmul_fp32, sum_fp32
from ..attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..attention.registry import register_attention
from .base import EfficientAttention
from .kernels import FEATURE_MAPS, KernelAttention, scaled_for_kernel
from .tokens import window_ids, window_merge, window_partition, window_valid

WINDOW_BF16 = PrecisionPolicy(
    bf16=("q, k, v of every window and of the prefix rows (SDPA)",),
    fp32=("SDPA's running max, row sums and accumulator (its own, as for the softmax teacher)",),
    why="the core is softmax attention through SDPA: the same numerics as the bf16 softmax teacher",
)
WINDOW_LINEAR_BF16 = PrecisionPolicy(
    bf16=(
        "q, k of the window logits; exp weights and v (local product)",
        "kernel features (stored) and v (window states)",
        "read-out operands phi(q), outside state [KV | z]",
        "q, k, v of the prefix rows (SDPA)",
    ),
    fp32=(
        "window logits' accumulation and scale, their max and exp",
        "kernel feature evaluation (fp32, rounded once)",
        "per-window states, their total and total minus own",
        "the shared normaliser (local sum + gamma phi(q) z), gamma and the division",
    ),
    why="one row mixes exp(logit - max) and gamma phi(q).phi(k) weights: every weight is non-negative and "
    "rounded at most once per factor, every sum (local row, window states, their totals and differences, the "
    "shared normaliser) accumulates in fp32, and exp sees fp32 logits, so the error stays a few 2^-8 "
    "sum_j A_ij |v_j| at any N, as flash attention's",
)


@register_attention("window")
class WindowAttention(EfficientAttention):
    """Option: ``window_size`` (int or (h, w) in tokens, default 7)."""

    map_kind = MapKind.ROW_STOCHASTIC
    needs_token_layout = True
    rope_keeps_map_kind = True
    rope_why = (
        "keeps row_stochastic: an exact softmax of the rotated q, k over each window's keys (the teacher's "
        "own rope logits, restricted to the window)"
    )
    precision = WINDOW_BF16
    repr_options = ("window_size",)
    grid_sized = (("window_size", "grid"),)  # a window over the whole grid is full attention

    def __init__(
        self, dim: int, num_heads: int = 8, *, window_size: int | Sequence[int] = 7, **kwargs
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.window_size: tuple[int, int] = as_grid(window_size, "window_size")

    def grid_fit_error(self, built_grid: tuple[int, ...] = ()) -> InputError | None:
        """The base refusal, whose largest fitting window covers the grid (`covers_grid`): it names the local one."""
        error = super().grid_fit_error(built_grid)
        if error is None:
            return None
        h, w = self.grid_at(built_grid)
        return type(error)(
            f"{error}; at {h}x{w} the window is softmax computed another way, and one of at most {min(h, w) - 1} "
            "on a side is local"
        )

    def covers_grid(self, built_grid: tuple[int, ...] = ()) -> str | None:
        grid = self.grid_at(built_grid)
        if grid is None or self.window_on(grid) != tuple(grid):
            return None
        h, w = grid
        return (
            f"window_size {self.window_size[0]}x{self.window_size[1]} covers the whole {h}x{w} token grid: window "
            f"is softmax there, computed another way and slower; a window of at most {min(h, w) - 1} on a side is local"
        )

    def window_on(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The window on ``grid``, no larger than it (as Swin clamps its window to the resolution): a window
        wider than the image is one window of the whole grid, the same attention without padded tokens."""
        return min(self.window_size[0], grid[0]), min(self.window_size[1], grid[1])

    def _windows(self, q, k, v):
        """Grid queries per window, keys/values = prefix tokens + the window, and the key mask."""
        B, H, N, d = q.shape
        p, grid = self.token_layout(N)
        window = self.window_on(grid)
        qw, kw, vw = (window_partition(t[:, :, p:], grid, window) for t in (q, k, v))  # (B, nW, H, L, d)
        nW = qw.shape[1]
        if p:
            kw = torch.cat([k[:, None, :, :p].expand(B, nW, H, p, d), kw], dim=-2)
            vw = torch.cat([v[:, None, :, :p].expand(B, nW, H, p, d), vw], dim=-2)
        valid = window_valid(grid, window, device=q.device)
        if valid is not None:
            valid = F.pad(valid, (p, 0), value=True)[None, :, None, None, :]  # (1, nW, 1, 1, p + L)
        return p, grid, qw, kw, vw, valid

    def _prefix_rows(self, q, k, v, p, dropout_p=0.0):
        return F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p)

    def _attend(self, q, k, v):
        dropout_p = self.attn_drop.p if self.training else 0.0
        p, grid, qw, kw, vw, valid = self._windows(q, k, v)
        B, nW, H, L, d = qw.shape
        mask = None if valid is None else valid.expand(B, nW, 1, 1, kw.shape[-2]).reshape(B * nW, 1, 1, -1)
        out = F.scaled_dot_product_attention(
            qw.reshape(B * nW, H, L, d),
            kw.reshape(B * nW, H, -1, d),
            vw.reshape(B * nW, H, -1, d),
            attn_mask=mask,
            dropout_p=dropout_p,
        )
        out = window_merge(out.reshape(B, nW, H, L, d), grid, self.window_on(grid))
        if p:
            out = torch.cat([self._prefix_rows(q, k, v, p, dropout_p), out], dim=-2)
        return out

    def _window_shape(self, num_tokens: int) -> tuple[int, int, int]:
        p, (gh, gw) = self.token_layout(num_tokens)
        wh, ww = self.window_on((gh, gw))
        return p, math.ceil(gh / wh) * math.ceil(gw / ww), wh * ww

    def _softmax_counts(self, queries: int, keys: int) -> OpCounts:
        """Exact softmax rows of ``queries`` over ``keys``: scaling, logits, softmax, product with v."""
        d = self.head_dim
        return (
            OpCounts(mul=queries * d)
            + matmul_ops(queries, d, keys)
            + softmax_ops(queries, keys)
            + matmul_ops(queries, keys, d)
        )

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): each padded window's queries against prefix + window keys; the prefix rows."""
        p, windows, L = self._window_shape(num_tokens)
        prefix_rows = self._softmax_counts(p, num_tokens)
        return (windows * self._softmax_counts(L, p + L) + prefix_rows) * (batch * self.num_heads)

    def _local_mask(self, ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """True where key j is in query i's window, a prefix token, or i is a prefix token."""
        query_ids = ids[rows][:, None]
        return (query_ids == ids[None, :]) | (ids[None, :] < 0) | (query_ids < 0)

    def _map_context(self, q, k):
        p, grid = self.token_layout(q.shape[-2])
        return q * self.scale, k, window_ids(p, grid, self.window_on(grid), device=q.device)

    def _map_rows(self, context, rows):
        q, k, ids = context
        logits = q[:, :, rows] @ k.transpose(-2, -1)
        return logits.masked_fill(~self._local_mask(ids, rows), float("-inf")).softmax(dim=-1)


@register_attention("window_linear")
class WindowLinearAttention(WindowAttention):
    """Options: ``window_size`` (7), ``kernel`` outside the window ('hedgehog' (default), 'elu', 'relu'),
    ``feature_dim`` (hedgehog features per sign)."""

    eps: float = 1e-6
    rope_why = (
        "keeps row_stochastic: window softmax weights and gamma phi(q).phi(k) weights of the rotated q, k "
        "are non-negative, with one shared normaliser"
    )
    precision = WINDOW_LINEAR_BF16
    repr_options = ("window_size", "kernel")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        window_size: int | Sequence[int] = 7,
        kernel: str = "hedgehog",
        feature_dim: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, window_size=window_size, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        if kernel not in FEATURE_MAPS:
            raise InputError(
                f"unknown feature map {kernel!r}; choose one of {', '.join(map(repr, FEATURE_MAPS))}"
            )
        self.kernel, self.feature_kind = kernel, FEATURE_MAPS[kernel]
        learned_dim = self.head_dim if feature_dim is None else int(feature_dim)
        self.feature_dim = learned_dim if self.feature_kind.learned else feature_dim
        self.feature_map_q, self.feature_map_k = self.feature_kind.build(
            num_heads, self.head_dim, feature_dim, **dd
        )
        self.linear_log_weight = nn.Parameter(torch.empty(num_heads, **dd))
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            self.linear_log_weight.zero_()
            for fm in (self.feature_map_q, self.feature_map_k):
                if hasattr(fm, "reset_parameters"):
                    fm.reset_parameters()

    def feature_blocks(self, q, k):
        """Kernel features in q's dtype, any leading shape. Fixed maps run in fp32 with their d^-1/4 scale
        (not a power of two: bf16 would round twice) and round once."""
        if self.feature_kind.learned:
            return self.feature_map_q.blocks(q, self.eps), self.feature_map_k.blocks(k, self.eps)
        d = self.head_dim
        return (
            (in_compute_dtype(lambda x: self.feature_map_q(scaled_for_kernel(x, d)), q),),
            (in_compute_dtype(lambda x: self.feature_map_k(scaled_for_kernel(x, d)), k),),
        )

    features = KernelAttention.features  # the blocks above, each side joined

    def _linear_weight(self, dtype):
        return self.linear_log_weight.to(dtype).exp()

    def shared_sums(self, qw, kw, vw, valid, p):
        """Numerator and shared normaliser of the grid rows, fp32, in window layout."""
        # softmax-style scores inside the window (+ prefix keys): bf16 q k products are exact in fp32, and
        # scaled in place (matmul's backward keeps q and k, not its result)
        logits = matmul_fp32(qw, kw.transpose(-2, -1)).mul_(self.scale)
        if valid is not None:
            logits = logits.masked_fill(~valid, float("-inf"))
        weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # (0, 1], fp32
        numerator = matmul_fp32(weights.to(vw.dtype), vw)
        denominator = sum_fp32(weights, dim=-1, keepdim=True)
        # kernel scores for the grid keys outside the window (prefix keys are always local),
        # computed in window layout: total over all windows minus the query's own window, in fp32.
        k_grid, v_grid = kw[..., p:, :], vw[..., p:, :]
        phi_q, phi_k = self.feature_blocks(qw, k_grid)
        if valid is not None:
            keep = valid[..., p:].transpose(-2, -1).to(qw.dtype)  # (1, nW, 1, L, 1)
            phi_k = tuple(block * keep for block in phi_k)
        gamma = self._linear_weight(compute_dtype(qw))[None, None, :, None, None]
        for block_q, block_k in zip(phi_q, phi_k):
            kv_window = matmul_fp32(block_k.transpose(-2, -1), v_grid)  # (B, nW, H, m, d)
            z_window = sum_fp32(block_k, dim=-2).unsqueeze(-1)  # (B, nW, H, m, 1)
            kv_outside = kv_window.sum(dim=1, keepdim=True) - kv_window
            z_outside = (z_window.sum(dim=1, keepdim=True) - z_window).clamp_min(0)  # >= 0 up to rounding
            # two read-outs, the states rounded once to the features' dtype: joining [KV | z] into one product
            # (as `linear_readout`) measured 1.16x the core's peak memory here for no speed-up on the CPU
            dtype = block_q.dtype
            numerator = numerator + gamma * matmul_fp32(block_q, kv_outside.to(dtype))
            denominator = denominator + gamma * matmul_fp32(block_q, z_outside.to(dtype))
        return numerator, denominator

    def _attend(self, q, k, v):
        p, grid, qw, kw, vw, valid = self._windows(q, k, v)  # (B, nW, H, L | p + L, d)
        numerator, denominator = self.shared_sums(qw, kw, vw, valid, p)
        out = window_merge(numerator / denominator, grid, self.window_on(grid))
        if p:
            out = torch.cat([self._prefix_rows(q, k, v, p).to(out.dtype), out], dim=-2)
        return out

    def _map_context(self, q, k):
        scaled_q, k_, ids = super()._map_context(q, k)
        phi_q, phi_k = self.features(q, k)
        return scaled_q, k_, ids, phi_q, phi_k

    def _map_rows(self, context, rows):
        q, k, ids, phi_q, phi_k = context
        local = self._local_mask(ids, rows)
        logits = (q[:, :, rows] @ k.transpose(-2, -1)).masked_fill(~local, float("-inf"))
        local_weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        gamma = self._linear_weight(q.dtype)[None, :, None, None]
        kernel_weights = gamma * (phi_q[:, :, rows] @ phi_k.transpose(-2, -1))
        weights = torch.where(local, local_weights, kernel_weights)
        return weights / weights.sum(dim=-1, keepdim=True)

    def feature_counts(self, num_tokens: int) -> tuple[OpCounts, int]:
        """Operations of one (batch, head)'s q and k features, and the width m (as a `KernelAttention`'s)."""
        return self.feature_kind.counts(num_tokens, self.head_dim, self.feature_dim)

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): the window softmax (division deferred), kernel features, per-window states
        and their totals minus own, the read-outs, one division per output entry, the prefix rows."""
        p, windows, L = self._window_shape(num_tokens)
        d, keys = self.head_dim, p + L
        local = OpCounts(mul=L * d) + matmul_ops(L, d, keys) + matmul_ops(L, keys, d)
        local = local + OpCounts(add=L * keys + L * (keys - 1), other=L * (keys - 1) + L * keys)
        features, m = self.feature_counts(windows * L)
        per_window = matmul_ops(m, L, d + 1) + OpCounts(mul=L * m, add=m * (d + 1))  # state, key mask
        per_window = per_window + matmul_ops(L, m, d + 1) + OpCounts(mul=L * (d + 1) + L * d, add=L * (d + 1))
        totals = OpCounts(add=(windows - 1) * m * (d + 1))
        per_head = windows * (local + per_window) + features + totals + self._softmax_counts(p, num_tokens)
        return per_head * (batch * self.num_heads)
