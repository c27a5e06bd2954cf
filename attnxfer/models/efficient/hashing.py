"""EcoFormer-style hashing attention (Liu et al., NeurIPS 2022): kernel attention on b-bit binary codes.

Queries and keys are hashed per head to codes h(x) = sign(W x) in {-1, +1}^b (W: d x b, one for q and one
for k). Two codes agree on (b + h_q . h_k) / 2 bits, b minus their Hamming distance: a non-negative
similarity, so

    A_ij = (b + h_q,i . h_k,j + eps) / sum_j' (b + h_q,i . h_k,j' + eps)

is row-stochastic and, as a kernel with features [1, h_q] and [b + eps, h_k], runs in O(N): the key
state sum_j h_k,j v_j^T (b x d) and the query read-out h_q . state are sums and differences of rows,
no multiplications (see ``operation_counts``). eps keeps a row defined when every key disagrees on
every bit.

Initialisation: W_q = W_k = one Gaussian draw per head (``hash_seed``). That is SimHash: bits of q and k
agree with probability 1 - angle(q, k) / pi, so the untrained student already weighs keys by their angle
to the query, the part of the teacher's logit q . k a sign can keep.

Surrogate: sign has no useful gradient. In training mode (and in the stage-1 objective) the codes are
relaxed to tanh(W x / (temperature |x|)), dividing by |x| so one temperature fits every layer's scale
(sign(W x) does not depend on |x|). We chose the relaxation over a straight-through estimator because
its gradient is the exact gradient of the function the training forward computes (checked against finite
differences like every zoo core), while a straight-through gradient belongs to no function; the price is
that training sees codes in (-1, 1), which tend to the eval-mode ±1 codes as the temperature falls.
Evaluation uses exact ±1 codes.

Stage 1 (``fit_objective = "kernelized_hashing"``): the map of binary codes gives no gradient, so the
attention brings its own objective, EcoFormer's: on the pairs the teacher attends to most (target +1)
and least (target -1) in each row, the normalised code inner product h_q . h_k / b should equal the
target (`fit_loss`). On the demo teacher this lowers the objective and top-1 after stage 1 rises, but
the map KL rises in most blocks (docs/conversion.md, "Hashing (EcoFormer)"); ``similarity="graded"``
regresses every pair onto 2 P_ij / max_j P_ij - 1 instead, the target whose codes reproduce P exactly.
"""

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
    """EcoFormer's: +1 on each row's ``pairs`` most attended keys, ``dissimilar`` on its least attended.
    Softmax is monotone in the logit, so the most / least attended keys are the extreme logits."""
    top = logits.topk(pairs, dim=-1).indices
    bottom = logits.topk(pairs, dim=-1, largest=False).indices
    chosen = torch.gather(inner, -1, torch.cat((top, bottom), dim=-1))  # (B, H, rows, 2 pairs)
    target = torch.cat((logits.new_ones(pairs), logits.new_full((pairs,), dissimilar)))
    return (chosen - target).pow(2).sum()


def _graded_error(logits: torch.Tensor, inner: torch.Tensor, pairs: int, dissimilar: float) -> torch.Tensor:
    """2 P_ij / max_j P_ij - 1 on every pair: P_ij / max_j P_ij = exp(logit_ij - max_j logit_ij), and codes
    whose h.h / b meet it agree on b P_ij / max P bits, which makes the map equal P exactly. Weighted to
    count as 2 ``pairs`` keys per row, like the pairs target."""
    target = 2 * (logits - logits.amax(-1, keepdim=True)).exp() - 1
    return (inner - target).pow(2).sum() * (2 * pairs / logits.shape[-1])


#: What the stage-1 objective asks of the normalised code inner product h_q . h_k / b, by name: a function
#: (teacher logits, inner products, pairs per row, dissimilar target) -> summed squared error of the rows.
SIMILARITY_TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]] = {
    "pairs": _pairs_error,
    "graded": _graded_error,
}


def hash_codes(x: torch.Tensor, weight: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """(B, H, N, d) x (H, d, b) -> codes (B, H, N, b): sign(x W) in {-1, +1} (zero counts as +1), or with a
    ``temperature`` the relaxation tanh(x W / (temperature |x|))."""
    u = x @ weight.to(x.dtype)
    if temperature is None:
        return torch.where(u >= 0, 1.0, -1.0).to(u.dtype)
    scale = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) * temperature
    return torch.tanh(u / scale)


@register_attention("hashing")
class HashingAttention(KernelAttention):
    """Binary-code kernel attention. Options: ``bits`` (b, default head_dim), ``temperature`` (of the
    tanh relaxation, default 0.1), ``hash_seed`` (the Gaussian init, default 0); for the stage-1 objective
    ``similarity`` ('pairs', EcoFormer's, or 'graded': `SIMILARITY_TARGETS`), ``pair_fraction`` (share of
    each row's keys taken as most / least attended pairs, 0.1) and ``dissimilar_target`` (the target of
    the least attended pairs, -1)."""

    eps: float = 1e-6
    rope_why = "keeps row_stochastic: the Hamming affinity of the rotated q, k's binary codes is non-negative"
    fit_objective = "kernelized_hashing"
    precision = HASHING_FP32

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
        self.bits = int(bits or self.head_dim)
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

    # ------------------------------------------------------------------ codes and features
    def codes(
        self, x: torch.Tensor, which: str, relaxed: bool | None = None, heads: slice = ALL_HEADS
    ) -> torch.Tensor:
        """Codes of q (``which="q"``) or k: ±1 in eval mode, relaxed in training mode (or as asked); ``x``
        holds the heads ``heads``."""
        weight = (self.hash_q if which == "q" else self.hash_k)[heads]
        relaxed = self.training if relaxed is None else relaxed
        return hash_codes(x, weight, self.temperature if relaxed else None)

    def query_features(self, q, heads=ALL_HEADS):
        codes = self.codes(q, "q", heads=heads)
        return codes.new_ones(*codes.shape[:-1], 1), codes

    def key_features(self, k, heads=ALL_HEADS):
        codes = self.codes(k, "k", heads=heads)
        return codes.new_full((*codes.shape[:-1], 1), self.bits + self.eps), codes

    # ------------------------------------------------------------------ stage 1: EcoFormer's objective
    def fit_loss(self, q, k, q_t, k_t):
        """Mean over (batch, head, query, selected key) of (c_q . c_k / b - S)^2 with relaxed codes c and the
        target S of ``similarity`` (`SIMILARITY_TARGETS`; EcoFormer's: +1 on the share ``pair_fraction`` of
        each row's keys the teacher attends most, ``dissimilar_target`` on those it attends least)."""
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

    # ------------------------------------------------------------------ cost
    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): hashing q and k (2 N d b multiply-adds, 2 N b signs); the key state
        [sum h_k v^T | sum h_k] and the query read-out h_q . state with ±1 codes (additions only); the
        (b + eps) sum v and (b + eps) N terms; N d divisions."""
        n, d, b = num_tokens, self.head_dim, self.bits
        hashing = 2 * matmul_ops(n, d, b) + OpCounts(other=2 * n * b)
        state = sign_matmul_ops(b, n, d + 1)  # sum_j h_k,j [v_j, 1]
        constant = OpCounts(mul=d + 1, add=(n - 1) * d)  # (b + eps) * [sum_j v_j, N]
        readout = sign_matmul_ops(n, b, d + 1) + OpCounts(add=n * (d + 1), mul=n * d)
        return (hashing + state + constant + readout) * (batch * self.num_heads)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, temperature={self.temperature}"
