"""Agent attention (Han et al. 2024): n agent tokens pooled from the queries relay attention.

    A = avgpool_grid(q)              (n agents, adaptive 2-D pooling of the grid queries)
    V_A = softmax(A k^T s + b_ak) v  (agents aggregate from all keys)
    out = softmax(q A^T s + b_qa) V_A
so the implicit map softmax(q A^T s + b_qa) softmax(A k^T s + b_ak) is a product of two
row-stochastic matrices: row-stochastic, O(N n). Agents are pooled from grid tokens only;
prefix tokens still attend through the agents and are attended by them (their position biases
are zero). The learnable position biases b (per head and agent, on a small base grid
bilinearly resized to the token grid) are the new parameters; they start at zero.

bf16-safe on GPU (`AGENT_BF16`): both maps are softmaxes, so the core has the numerics of two small
flash attentions. The agents are fp32 means of the queries; the logits q (A s)^T and k (A s)^T take
q and k as bf16 operands and the scaled agents as two bf16 halves (`matmul_split`, `matmul_split_left`: a bf16-rounded
agent would move a logit of size L by L 2^-8), the biases and both softmaxes run in fp32, and only the
probabilities (in [0, 1]), v and the agent values V_A are rounded to bf16 for the two products, which
accumulate in fp32 (V_A sums over all N keys).
"""

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
        """(B, H, n, d) agent tokens: adaptive average pooling of the grid queries.

        The grid is pooled as a channels-last image (tokens as pixels, the head dim as channels): the
        queries' rows are copied once as they lie, where a channels-first image is a transposing gather
        (measured 11x slower at 64 x 64 tokens)."""
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
        """The agents -> keys bias (H, n, N) and the queries -> agents bias (H, N, n), both contiguous.

        They depend on the parameters and the grid only, not on the batch: without autograd they are kept
        for the next call (keyed by the token layout and the dtype, and rebuilt when the small bias tables
        differ from the copies kept with them), since resizing them costs as much as the rest of the core at
        64 x 64 tokens."""
        params = (self.agent_key_bias, self.query_agent_bias)
        if needs_autograd(self) or torch.compiler.is_compiling():  # a compiled graph recomputes them
            return (
                self._position_bias(params[0].to(dtype), num_tokens),
                self._position_bias(params[1].to(dtype), num_tokens).transpose(-2, -1),
            )
        key = (num_tokens, self.token_layout(num_tokens), dtype)
        cached = getattr(self, "_bias_cache", None)
        if cached is None or cached[0] != key or not unchanged(cached[1], params):
            biases = (
                self._position_bias(params[0].to(dtype), num_tokens).contiguous(),
                self._position_bias(params[1].to(dtype), num_tokens).transpose(-2, -1).contiguous(),
            )
            self._bias_cache = cached = (key, snapshot(params), biases)
        return cached[2]

    def _relay(self, q, k):
        """softmax(q A^T s + b_qa) (B,H,N,n) and softmax(A k^T s + b_ak) (B,H,n,N), fp32 (float64 kept).

        For bf16 q, k: the agents are pooled in fp32 and scaled there (s = d^-1/2 is not a power of two, so
        a bf16 q s would be rounded); each logit is a bf16 q or k against the agents' two bf16 halves, so
        it has fp32 accuracy."""
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
        queries_to_agents, agent_to_keys = self._relay(q, k)
        # Products of [0, 1] probabilities with v (bf16 operands on GPU), each accumulated in fp32.
        agent_values = matmul_fp32(agent_to_keys.to(v.dtype), v)  # (B, H, n, d): sums over N keys
        return matmul_fp32(queries_to_agents.to(v.dtype), agent_values.to(v.dtype))

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
