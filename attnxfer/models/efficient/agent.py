"""Agent attention (Han et al. 2024): n agents pooled from the grid queries relay attention, so the
map softmax(q A^T s + b_qa) softmax(A k^T s + b_ak) is row-stochastic at O(N n). Prefix tokens are no
agents but attend through them; the position biases (zero at first) are the new parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.interface import MapKind, as_grid
from ..attention.numerics import PrecisionPolicy, compute_dtype, matmul_fp32, matmul_split, matmul_split_left
from ..attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..attention.registry import register_attention
from .base import EfficientAttention, snapshot, unchanged
from .kernels import needs_autograd

AGENT_BF16 = PrecisionPolicy(
    bf16=(
        "q, k (logits, against the scaled agents as hi + lo halves)",
        "both softmax maps, v and V_A (the two products)",
    ),
    fp32=(
        "agent pooling (means of grid queries)",
        "logit accumulation, position biases and both softmaxes",
        "V_A = softmax(A k^T s) v accumulated over N keys",
        "read-out accumulation",
    ),
    why="two softmaxes of logits, so flash attention's numerics twice: logits at fp32 accuracy (fp32 agents "
    "split into two bf16 halves; a bf16-rounded agent moves a logit of size L by L 2^-8), fp32 softmaxes, "
    "and only probabilities in [0, 1], v and V_A rounded for products that accumulate in fp32",
)


@register_attention("agent")
class AgentAttention(EfficientAttention):
    """Options: ``agent_grid`` (agents per side, default 7 -> 49 agents), ``bias_grid`` (base grid of
    the position biases, default 7)."""

    map_kind = MapKind.ROW_STOCHASTIC
    needs_token_layout = True
    rope_keeps_map_kind = True
    rope_why = (
        "keeps row_stochastic: softmax(q A^T) softmax(A k^T) of rotated q, k is a product of two "
        "row-stochastic maps for any input (agents average rotated queries)"
    )
    precision = AGENT_BF16
    grid_sized = (("agent_grid", "grid"),)  # more agents than tokens cost more than softmax

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        agent_grid: int | Sequence[int] = 7,
        bias_grid: int | Sequence[int] = 7,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.agent_grid = as_grid(agent_grid, "agent_grid")
        num_agents = self.agent_grid[0] * self.agent_grid[1]
        self.bias_grid = as_grid(bias_grid, "bias_grid")
        self.agent_key_bias = nn.Parameter(torch.empty(num_heads, num_agents, *self.bias_grid, **dd))
        self.query_agent_bias = nn.Parameter(torch.empty(num_heads, num_agents, *self.bias_grid, **dd))
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            self.agent_key_bias.zero_()
            self.query_agent_bias.zero_()

    def agents(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) agents: the grid queries average-pooled as a channels-last image (a channels-first
        image is a transposing gather, measured 11x slower at 64 x 64 tokens)."""
        B, H, N, d = q.shape
        p, grid = self.token_layout(N)
        image = q[:, :, p:].reshape(B * H, *grid, d).contiguous().permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(image, self.agent_grid)  # (B H, d, a, a), channels last
        return pooled.permute(0, 2, 3, 1).reshape(B, H, -1, d)

    def _position_bias(self, bias: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(H, n, bh, bw) -> (H, n, N): resized to the grid, zero for prefix tokens."""
        p, grid = self.token_layout(num_tokens)
        H, n = bias.shape[:2]
        resized = F.interpolate(bias, size=grid, mode="bilinear", align_corners=False).reshape(H, n, -1)
        return F.pad(resized, (p, 0))

    def _position_biases(self, num_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The agents -> keys (H, n, N) and queries -> agents (H, N, n) biases, contiguous; without
        autograd kept for the next call while layout, dtype and tables are unchanged (resizing costs as much as the
        rest of the core at 64 x 64 tokens)."""
        params = (self.agent_key_bias, self.query_agent_bias)
        graph = needs_autograd(self) or torch.compiler.is_compiling()  # a compiled graph recomputes them
        key = (num_tokens, self.token_layout(num_tokens), dtype)
        cached = getattr(self, "_bias_cache", None)
        if graph or cached is None or cached[0] != key or not unchanged(cached[1], params):
            biases = (
                self._position_bias(params[0].to(dtype), num_tokens),
                self._position_bias(params[1].to(dtype), num_tokens).transpose(-2, -1),
            )
            if graph:
                return biases
            cached = (key, snapshot(params), tuple(b.contiguous() for b in biases))
            self._bias_cache = cached
        return cached[2]

    def _map_context(self, q, k):
        """The two softmax maps in fp32; the agents pooled and scaled in fp32 (s = d^-1/2 would round in
        bf16) and taken as two bf16 halves, so each logit has fp32 accuracy."""
        N, dtype = q.shape[-2], compute_dtype(q)
        scaled_agents = self.agents(q.to(dtype)) * self.scale  # (B, H, n, d)
        key_bias, query_bias = self._position_biases(N, dtype)
        # biases added in place (a matmul's backward keeps its operands, not its result): one (n, N) and one
        # (N, n) buffer per map, as many as the softmaxes need
        agent_logits = matmul_split_left(scaled_agents, k.transpose(-2, -1))  # (B, H, n, N)
        agent_to_keys = agent_logits.add_(key_bias).softmax(dim=-1)
        del agent_logits
        query_logits = matmul_split(q, scaled_agents.transpose(-2, -1))  # (B, H, N, n)
        return query_logits.add_(query_bias).softmax(dim=-1), agent_to_keys

    def _attend(self, q, k, v):
        queries_to_agents, agent_to_keys = self._map_context(q, k)
        # Products of [0, 1] probabilities with v (bf16 operands on GPU), each accumulated in fp32.
        agent_values = matmul_fp32(agent_to_keys.to(v.dtype), v)  # (B, H, n, d): sums over N keys
        return matmul_fp32(queries_to_agents.to(v.dtype), agent_values.to(v.dtype))

    def _map_rows(self, context, rows):
        queries_to_agents, agent_to_keys = context
        return queries_to_agents[:, :, rows] @ agent_to_keys

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): pooling, logits plus biases, two softmaxes, two products (bias resize left out)."""
        n_tok, d = num_tokens, self.head_dim
        _, (gh, gw) = self.token_layout(num_tokens)
        n = self.agent_grid[0] * self.agent_grid[1]
        pooling = OpCounts(add=(gh * gw - n) * d, mul=n * d)
        to_keys = OpCounts(mul=n * d, add=n * n_tok) + matmul_ops(n, d, n_tok) + softmax_ops(n, n_tok)
        to_agents = OpCounts(mul=n_tok * d, add=n_tok * n) + matmul_ops(n_tok, d, n) + softmax_ops(n_tok, n)
        products = matmul_ops(n, n_tok, d) + matmul_ops(n_tok, n, d)
        return (pooling + to_keys + to_agents + products) * (batch * self.num_heads)
