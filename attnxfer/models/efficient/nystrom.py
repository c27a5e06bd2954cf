"""Nystrom attention (Xiong et al. 2021): softmax through m segment-mean landmarks, out = F pinv(A) (B v),
a signed map with no new parameters. Always fp32: pinv's large signed entries cancel, and bf16 rounding is
amplified by A's condition number (`NYSTROM_FP32`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import InputError
from ..attention.interface import MapKind
from ..attention.numerics import PrecisionPolicy
from ..attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..attention.registry import register_attention
from .base import EfficientAttention

NYSTROM_FP32 = PrecisionPolicy(
    fp32=("the whole core",),
    why="Newton-Schulz pseudo-inverse of the landmark kernel: bf16 rounding is amplified by its condition "
    "number, and F pinv(A) (B v) cancels large signed terms",
)


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Approximate Moore-Penrose inverse of a batch of square matrices (Razavi et al. 2014)."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    col = a.abs().sum(dim=-2).amax(dim=-1)
    row = a.abs().sum(dim=-1).amax(dim=-1)
    z = a.transpose(-2, -1) / (col * row)[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register_attention("nystrom")
class NystromAttention(EfficientAttention):
    """Options: ``num_landmarks`` (m, default 32; capped at N), ``pinv_iterations`` (default 6)."""

    map_kind = MapKind.SIGNED
    rope_keeps_map_kind = True
    rope_why = "keeps signed: landmark softmaxes of rotated q, k and a pseudo-inverse, signed for any input"
    precision = NYSTROM_FP32
    grid_sized = (("num_landmarks", "tokens"),)  # N landmarks: softmax through an N x N pseudo-inverse

    def __init__(
        self, dim: int, num_heads: int = 8, *, num_landmarks: int = 32, pinv_iterations: int = 6, **kwargs
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if num_landmarks < 1:
            raise InputError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if pinv_iterations < 0:
            raise InputError(f"pinv_iterations must be >= 0, got {pinv_iterations}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations

    def landmarks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, m, d) means of m contiguous segments, pooled as a channels-last column image (a (d, N)
        transpose is a gather, measured 8x slower at 4097 tokens)."""
        B, H, N, d = x.shape
        m = min(self.num_landmarks, N)
        image = x.reshape(B * H, N, 1, d).contiguous().permute(0, 3, 1, 2)  # (B H, d, N, 1), channels last
        pooled = F.adaptive_avg_pool2d(image, (m, 1))
        return pooled.permute(0, 2, 3, 1).reshape(B, H, m, d)

    def _factors(self, q, k):
        # The scale goes on the (m, d) landmarks instead of the (N, d) queries: pooling is linear, so the
        # query landmarks of s q are s times those of q, and q (s k~)^T = (s q) k~^T.
        q_land, k_land = self.landmarks(q) * self.scale, self.landmarks(k)
        queries_to_landmarks = (q @ (k_land * self.scale).transpose(-2, -1)).softmax(dim=-1)
        landmark_kernel = (q_land @ k_land.transpose(-2, -1)).softmax(dim=-1)
        landmarks_to_keys = (q_land @ k.transpose(-2, -1)).softmax(dim=-1)
        return queries_to_landmarks, iterative_pinv(landmark_kernel, self.pinv_iterations), landmarks_to_keys

    def _attend(self, q, k, v):
        left, pinv, right = self._factors(q, k)
        return left @ (pinv @ (right @ v))

    def _map_context(self, q, k):
        left, pinv, right = self._factors(q, k)
        return left, pinv @ right

    def _map_rows(self, context, rows):
        left, right = context
        return left[:, :, rows] @ right

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): scaling, landmarks, the three softmax factors, the pseudo-inverse, F (pinv (B v))."""
        n, d = num_tokens, self.head_dim
        m = min(self.num_landmarks, n)
        pooling = 2 * OpCounts(add=(n - m) * d, mul=m * d)
        factors = matmul_ops(n, d, m) + softmax_ops(n, m) + matmul_ops(m, d, m) + softmax_ops(m, m)
        factors = factors + matmul_ops(m, d, n) + softmax_ops(m, n)
        norms = OpCounts(add=2 * m * (m - 1), mul=m * m + 1, other=2 * m * m + 2 * (m - 1))
        iteration = 4 * matmul_ops(m, m, m) + OpCounts(add=3 * m * m, mul=m * m + 3 * m)
        pinv = norms + self.pinv_iterations * iteration
        product = matmul_ops(m, n, d) + matmul_ops(m, m, d) + matmul_ops(n, m, d)
        per_head = OpCounts(mul=n * d) + pooling + factors + pinv + product
        return per_head * (batch * self.num_heads)
