"""Focused linear attention (FLatten; Han et al. 2023): kernel attention with the focusing function
f_p(x) = |x'| x'^p / |x'^p|, x' = (relu(x) + eps) / softplus(s), plus a depthwise conv of v over the grid
outside the map (zero at first; prefix tokens get no local term)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from ..attention.numerics import PrecisionPolicy, compute_dtype, in_compute_dtype
from ..attention.opcount import OpCounts
from ..attention.registry import register_attention
from .kernels import ALL_HEADS, KERNEL_BF16, KernelAttention, needs_autograd

FOCUSED_BF16 = PrecisionPolicy(
    bf16=KERNEL_BF16.bf16,
    fp32=("focusing function (norms, x / max, x^p)", *KERNEL_BF16.fp32, "depthwise conv of v"),
    why="the focusing function divides by norms and raises to the p-th power: evaluated in fp32 and rounded "
    "once, its non-negative features are as safe as ReLU's",
)


def depthwise_grid_conv(
    v: torch.Tensor,
    dwc: nn.Conv2d,
    num_prefix: int,
    grid: tuple[int, int],
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dwc`` over v's grid tokens, zeros at prefix tokens: (B, H, N, d) -> (B, H, N, d). ``keep``
    (B, 1, N, N, True where two tokens share a region of a shifted Swin window): each token's taps only
    within its region, zero padded at its edges as at the grid's."""
    B, H, _, d = v.shape
    grid_tokens = v[:, :, num_prefix:]
    if keep is None:
        conv = _grid_conv(grid_tokens, dwc, grid)
    else:  # Σ over regions r of mask_r · conv(v · mask_r); each token in one region, so one bias each
        regions = _region_masks(keep[..., num_prefix:, num_prefix:])
        conv = sum(m * _grid_conv(grid_tokens * m, dwc, grid) for m in regions)
    return torch.cat([v.new_zeros(B, H, num_prefix, d), conv], dim=-2)


def _region_masks(keep: torch.Tensor, count: int = 4) -> list[torch.Tensor]:
    """(B, 1, N, 1) masks of the regions of a same-region mask (B, 1, N, N), in raster order of their first
    tokens: Swin's shift cuts a window at most once per axis, so ``count`` 4 takes every region."""
    first = keep.to(torch.uint8).argmax(-1)  # each token's region named by its first token
    starts = first == torch.arange(keep.shape[-1], device=keep.device)
    rank = starts.cumsum(-1).gather(-1, first) - 1  # the region's number: starts up to its first token
    return [(rank == r).unsqueeze(-1) for r in range(count)]


def _grid_conv(grid_tokens: torch.Tensor, dwc: nn.Conv2d, grid: tuple[int, int]) -> torch.Tensor:
    """``dwc`` over (B, H, G, d) grid tokens as a channels-last image (a channels-first one costs a
    transposing gather each way, ~11x slower at 64 x 64)."""
    B, H, _, d = grid_tokens.shape
    image = grid_tokens.reshape(B * H, *grid, d).contiguous().permute(0, 3, 1, 2)
    conv = F.conv2d(
        image, dwc.weight.to(image.dtype), dwc.bias.to(image.dtype), padding=dwc.padding, groups=d
    )
    return conv.permute(0, 2, 3, 1).reshape(B, H, -1, d)  # (B·H, d, h, w) -> (B, H, h·w, d)


def grid_conv_counts(num_tokens: int, grid: Sequence[int], d: int, kernel_size: int) -> OpCounts:
    """One (batch, head) of `depthwise_grid_conv`: taps, bias, and the addition to the output."""
    taps, cells = kernel_size**2, grid[0] * grid[1]
    return OpCounts(mul=cells * d * taps, add=cells * d * (taps - 1) + cells * d + num_tokens * d)


@register_attention("focused_linear")
class FocusedLinearAttention(KernelAttention):
    """Options: ``focusing_factor`` (p, default 3), ``kernel_size`` of the depthwise conv (default 5)."""

    needs_token_layout = True
    eps: float = 1e-6
    precision = FOCUSED_BF16
    grid_sized = (("kernel_size", "odd side"),)  # taps beyond the grid see only zero padding

    def __init__(
        self, dim: int, num_heads: int = 8, *, focusing_factor: float = 3.0, kernel_size: int = 5, **kwargs
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if focusing_factor <= 0:  # x**p of p <= 0 unfocuses (or, at 0, flattens) the map
            raise InputError(f"focusing_factor must be > 0, got {focusing_factor}")
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise InputError(f"kernel_size must be odd and >= 1 (a same-size conv), got {kernel_size}")
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        d = self.head_dim
        self.focusing_factor = float(focusing_factor)
        self.kernel_size = int(kernel_size)
        self.focus_scale = nn.Parameter(torch.empty(num_heads, 1, d, **dd))
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d, **dd)
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            self.focus_scale.zero_()
            self.dwc.weight.zero_()
            self.dwc.bias.zero_()

    def focus(self, x: torch.Tensor, heads: slice = ALL_HEADS, row_scaled: bool = False) -> torch.Tensor:
        """f_p(x) for x holding the heads ``heads``; ``row_scaled``: up to a positive factor per row
        (what a read-out needs). Without autograd in place on one buffer."""
        graph = needs_autograd(self, x)
        x = F.relu(x)
        scale = F.softplus(self.focus_scale[heads].to(x.dtype))
        x = (x + self.eps) / scale if graph else x.add_(self.eps).div_(scale)
        norm = None if row_scaled else x.norm(dim=-1, keepdim=True)
        # x / max(x) first: the power is then bounded by 1 and cannot overflow.
        peak = x.amax(dim=-1, keepdim=True)
        powered = (x / peak).pow(self.focusing_factor) if graph else x.div_(peak).pow_(self.focusing_factor)
        if row_scaled:
            return powered
        factor = norm / powered.norm(dim=-1, keepdim=True)
        return powered * factor if graph else powered.mul_(factor)

    def query_features(self, q, heads=ALL_HEADS):
        return in_compute_dtype(lambda x: self.focus(x, heads), q)

    def readout_query_features(self, q, heads=ALL_HEADS):
        return in_compute_dtype(lambda x: self.focus(x, heads, row_scaled=True), q)

    key_features = query_features

    def local_term(self, v: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise conv of v over the grid, zeros at prefix tokens (within ``keep``'s regions: see
        `depthwise_grid_conv`): (B, H, N, d)."""
        layout = self.token_layout(v.shape[-2])
        return depthwise_grid_conv(v.to(compute_dtype(v)), self.dwc, *layout, keep)

    def _attend_mapped(self, q, k, v):
        return super()._attend(q, k, v)

    def _attend(self, q, k, v):
        out = self._attend_mapped(q, k, v)
        if needs_autograd(self, q, k, v) or torch.compiler.is_compiling():
            return out + self.local_term(v)
        # the inference core's own buffer: the conv is added in place, to the grid rows only
        p, grid = self.token_layout(v.shape[-2])
        out[:, :, p:] += _grid_conv(v[:, :, p:].to(out.dtype), self.dwc, grid)
        return out

    def feature_counts(self, num_tokens):
        """Per q and k: relu + eps, / softplus(s), the norm, / max, ^p, renormalised; m = d."""
        n, d = num_tokens, self.head_dim
        norm = OpCounts(mul=n * d, add=n * (d - 1), other=n)
        one = OpCounts(mul=4 * n * d, add=n * d, other=2 * n * d + n * (d - 1)) + 2 * norm
        return 2 * one, d

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        core = super().operation_counts(num_tokens, batch)
        _, grid = self.token_layout(num_tokens)
        conv = grid_conv_counts(num_tokens, grid, self.head_dim, self.kernel_size)
        return core + conv * (batch * self.num_heads)
