"""Agent attention (Han et al. 2024): n agent tokens pooled from the queries relay attention.

    A = avgpool_grid(q)              (n agents, adaptive 2-D pooling of the grid queries)
    V_A = softmax(A k^T s + b_ak) v  (agents aggregate from all keys)
    out = softmax(q A^T s + b_qa) V_A
so the implicit map softmax(q A^T s + b_qa) softmax(A k^T s + b_ak) is a product of two
row-stochastic matrices: row-stochastic, O(N n). Agents are pooled from grid tokens only;
prefix tokens still attend through the agents and are attended by them (their position biases
are zero). The learnable position biases b (per head and agent, on a small base grid
bilinearly resized to the token grid) are the new parameters; they start at zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.interface import MapKind, as_grid
from ..attention.numerics import PrecisionPolicy
from ..attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..attention.registry import register_attention
from .base import EfficientAttention
from .tokens import grid_to_image

__all__ = ["AGENT_FP32", "AgentAttention"]

AGENT_FP32 = PrecisionPolicy(
    fp32=("the whole core",),
    why="not shown safe yet: two softmaxes through pooled agents with resized position biases; fp32 until a "
    "test covers them",
)


@register_attention("agent")
class AgentAttention(EfficientAttention):
    """Options: ``agent_grid`` (agents per side, default 7 -> 49 agents), ``bias_grid`` (base grid of
    the position biases, default 7)."""

    map_kind = MapKind.ROW_STOCHASTIC
    needs_token_layout = True
    precision = AGENT_FP32

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
        self.agent_grid = as_grid(agent_grid)
        num_agents = self.agent_grid[0] * self.agent_grid[1]
        self.bias_grid = as_grid(bias_grid)
        bh, bw = self.bias_grid
        self.agent_key_bias = nn.Parameter(torch.empty(num_heads, num_agents, bh, bw, **dd))
        self.query_agent_bias = nn.Parameter(torch.empty(num_heads, num_agents, bh, bw, **dd))
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            self.agent_key_bias.zero_()
            self.query_agent_bias.zero_()

    def agents(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) agent tokens: adaptive average pooling of the grid queries."""
        B, H, N, d = q.shape
        p, grid = self.token_layout(N)
        pooled = F.adaptive_avg_pool2d(grid_to_image(q[:, :, p:], grid), self.agent_grid)
        return pooled.reshape(B, H, d, -1).transpose(-2, -1)

    def _position_bias(self, bias: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(H, n, bh, bw) -> (H, n, N): resized to the grid, zero for prefix tokens."""
        p, grid = self.token_layout(num_tokens)
        H, n = bias.shape[:2]
        resized = F.interpolate(bias, size=grid, mode="bilinear", align_corners=False).reshape(H, n, -1)
        return F.pad(resized, (p, 0))

    def _relay(self, q, k):
        """softmax(q A^T s + b_qa) (B,H,N,n) and softmax(A k^T s + b_ak) (B,H,n,N)."""
        N = q.shape[-2]
        agents = self.agents(q)
        key_bias = self._position_bias(self.agent_key_bias.to(q.dtype), N)
        query_bias = self._position_bias(self.query_agent_bias.to(q.dtype), N).transpose(-2, -1)
        agent_to_keys = (agents * self.scale @ k.transpose(-2, -1) + key_bias).softmax(dim=-1)
        queries_to_agents = (q * self.scale @ agents.transpose(-2, -1) + query_bias).softmax(dim=-1)
        return queries_to_agents, agent_to_keys

    def _attend(self, q, k, v):
        queries_to_agents, agent_to_keys = self._relay(q, k)
        return queries_to_agents @ (agent_to_keys @ v)

    def _map_context(self, q, k):
        return self._relay(q, k)

    def _map_rows(self, context, rows):
        queries_to_agents, agent_to_keys = context
        return queries_to_agents[:, :, rows] @ agent_to_keys

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head), n agents: pooled from the grid queries (segment sums and means); scaled agents
        and queries; agents -> keys and queries -> agents logits plus their position biases, two softmaxes;
        the two products with v. (Resizing the biases to the grid does not depend on the batch: left out.)"""
        n_tok, d = num_tokens, self.head_dim
        _, (gh, gw) = self.token_layout(num_tokens)
        n = self.agent_grid[0] * self.agent_grid[1]
        pooling = OpCounts(add=(gh * gw - n) * d, mul=n * d)
        to_keys = OpCounts(mul=n * d, add=n * n_tok) + matmul_ops(n, d, n_tok) + softmax_ops(n, n_tok)
        to_agents = OpCounts(mul=n_tok * d, add=n_tok * n) + matmul_ops(n_tok, d, n) + softmax_ops(n_tok, n)
        products = matmul_ops(n, n_tok, d) + matmul_ops(n_tok, n, d)
        return (pooling + to_keys + to_agents + products) * (batch * self.num_heads)
