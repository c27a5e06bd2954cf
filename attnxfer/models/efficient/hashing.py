"""EcoFormer-style hashing attention (Liu et al., NeurIPS 2022): kernel attention on b-bit codes sign(W x),
A_ij ∝ b + h_q,i . h_k,j + eps (twice the agreeing bits): row-stochastic, O(N), additions only. W starts as
SimHash (keys weighed by angle); training relaxes codes to tanh(W x / (temperature |x|)), an exact gradient
unlike a straight-through one. Stage 1: EcoFormer's objective (`fit_loss`; docs/conversion.md, "Hashing (EcoFormer)")."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...errors import InputError
from ..attention.numerics import PrecisionPolicy, fp32_section, row_chunk, row_slices, upcast
from ..attention.opcount import OpCounts, matmul_ops, sign_matmul_ops
from ..attention.registry import register_attention
from .kernels import ALL_HEADS, KernelAttention

HASHING_FP32 = PrecisionPolicy(
    fp32=("the whole core",),
    why="codes are signs of x W: a bf16 product flips every bit whose |x w| is within its rounding of zero, "
    "and a flipped bit moves the map by 2 / b of a row, far more than rounding",
)


def _pairs_error(logits: torch.Tensor, inner: torch.Tensor, pairs: int, dissimilar: float) -> torch.Tensor:
    """EcoFormer's: +1 on each row's ``pairs`` most attended keys (the extreme logits), ``dissimilar``
    on its least attended."""
    top = logits.topk(pairs, dim=-1).indices
    bottom = logits.topk(pairs, dim=-1, largest=False).indices
    chosen = torch.gather(inner, -1, torch.cat((top, bottom), dim=-1))  # (B, H, rows, 2 pairs)
    target = torch.cat((logits.new_ones(pairs), logits.new_full((pairs,), dissimilar)))
    return (chosen - target).pow(2).sum()


def _graded_error(logits: torch.Tensor, inner: torch.Tensor, pairs: int, dissimilar: float) -> torch.Tensor:
    """2 P_ij / max_j P_ij - 1 on every pair (codes meeting it reproduce P exactly), weighted to count
    as 2 ``pairs`` keys per row, like the pairs target."""
    target = 2 * (logits - logits.amax(-1, keepdim=True)).exp() - 1
    return (inner - target).pow(2).sum() * (2 * pairs / logits.shape[-1])


#: What the stage-1 objective asks of the normalised code inner product h_q . h_k / b, by name: a function
#: (teacher logits, inner products, pairs per row, dissimilar target) -> summed squared error of the rows.
SIMILARITY_TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]] = {
    "pairs": _pairs_error,
    "graded": _graded_error,
}


def hash_codes(x: torch.Tensor, weight: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """(B, H, N, d) x (H, d, b) -> sign(x W) in {-1, +1} (zero counts as +1), or with a ``temperature``
    tanh(x W / (temperature |x|))."""
    u = x @ weight.to(x.dtype)
    if temperature is None:
        return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)
    scale = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) * temperature
    return torch.tanh(u / scale)


@register_attention("hashing")
class HashingAttention(KernelAttention):
    """Options: ``bits`` (default head_dim), ``temperature`` (0.1), ``hash_seed`` (0); for stage 1
    ``similarity`` (`SIMILARITY_TARGETS`), ``pair_fraction`` (0.1) and ``dissimilar_target`` (-1)."""

    eps: float = 1e-6
    rope_why = "keeps row_stochastic: the Hamming affinity of the rotated q, k's binary codes is non-negative"
    fit_objective = "kernelized_hashing"
    precision = HASHING_FP32
    repr_options = ("bits", "temperature")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        bits: int | None = None,
        temperature: float = 0.1,
        hash_seed: int = 0,
        pair_fraction: float = 0.1,
        dissimilar_target: float = -1.0,
        similarity: str = "pairs",
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.bits = int(self.head_dim if bits is None else bits)  # 0 is refused, not read as the default
        if self.bits < 1:
            raise InputError(f"bits must be >= 1, got {bits}")
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        if not 0 < pair_fraction <= 0.5:
            raise InputError(f"pair_fraction must be in (0, 0.5], got {pair_fraction}")
        self.temperature = float(temperature)
        self.hash_seed = int(hash_seed)
        self.pair_fraction = float(pair_fraction)
        if not -1.0 <= dissimilar_target < 1.0:
            raise InputError(f"dissimilar_target must be in [-1, 1), got {dissimilar_target}")
        self.dissimilar_target = float(dissimilar_target)
        if similarity not in SIMILARITY_TARGETS:
            raise InputError(f"similarity must be one of {', '.join(SIMILARITY_TARGETS)}, got {similarity!r}")
        self.similarity = similarity
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        # Plain parameters, not nn.Linear, so timm's ViT init leaves the SimHash draw alone.
        self.hash_q = nn.Parameter(torch.empty(num_heads, self.head_dim, self.bits, **dd))
        self.hash_k = nn.Parameter(torch.empty(num_heads, self.head_dim, self.bits, **dd))
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        generator = torch.Generator().manual_seed(self.hash_seed)
        draw = torch.randn(self.num_heads, self.head_dim, self.bits, generator=generator)
        with torch.no_grad():
            self.hash_q.copy_(draw)
            self.hash_k.copy_(draw)

    def codes(
        self, x: torch.Tensor, which: str, relaxed: bool | None = None, heads: slice = ALL_HEADS
    ) -> torch.Tensor:
        """±1 codes of q or k in eval mode, relaxed in training mode (or as asked)."""
        weight = (self.hash_q if which == "q" else self.hash_k)[heads]
        relaxed = self.training if relaxed is None else relaxed
        return hash_codes(x, weight, self.temperature if relaxed else None)

    def query_features(self, q, heads=ALL_HEADS):
        codes = self.codes(q, "q", heads=heads)
        return codes.new_ones(*codes.shape[:-1], 1), codes

    def key_features(self, k, heads=ALL_HEADS):
        codes = self.codes(k, "k", heads=heads)
        return codes.new_full((*codes.shape[:-1], 1), self.bits + self.eps), codes

    def fit_loss(self, q, k, q_t, k_t):
        """Mean of (c_q . c_k / b - S)^2 over the selected pairs (relaxed codes c, target S of ``similarity``)."""
        with fp32_section(q.device.type):
            q, k, q_t, k_t = upcast(q, k, q_t.detach(), k_t.detach())
            c_q, c_k = self.codes(q, "q", relaxed=True), self.codes(k, "k", relaxed=True)
            B, H, N, _ = q.shape
            n_k = k.shape[-2]
            pairs = max(1, min(n_k // 2, round(self.pair_fraction * n_k)))  # most (and least) attended keys
            error = SIMILARITY_TARGETS[self.similarity]
            total = q.new_zeros(())
            for rows in row_slices(0, N, row_chunk(q, k.shape[-2], live_tensors=2)):
                logits = (q_t[:, :, rows] * q_t.shape[-1] ** -0.5) @ k_t.transpose(-2, -1)
                inner = (c_q[:, :, rows] @ c_k.transpose(-2, -1)) / self.bits  # (B, H, rows, N)
                total = total + error(logits, inner, pairs, self.dissimilar_target)
            return total / (B * H * N * 2 * pairs)

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): hashing q and k, the ±1-code state and read-out (additions), N d divisions."""
        n, d, b = num_tokens, self.head_dim, self.bits
        hashing = 2 * matmul_ops(n, d, b) + OpCounts(other=2 * n * b)
        state = sign_matmul_ops(b, n, d + 1)  # sum_j h_k,j [v_j, 1]
        constant = OpCounts(mul=d + 1, add=(n - 1) * d)  # (b + eps) * [sum_j v_j, N]
        readout = sign_matmul_ops(n, b, d + 1) + OpCounts(add=n * (d + 1), mul=n * d)
        return (hashing + state + constant + readout) * (batch * self.num_heads)
