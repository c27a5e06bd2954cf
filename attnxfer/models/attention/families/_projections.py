"""q/k/v projections shared by the adapters of timm's non-``Attention`` classes, computed exactly as timm does
from either layout (a fused ``qkv``, with BEiT's and EVA's separate biases, or separate projections with
grouped k/v heads), and frozen for copied layers without renaming anything."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from ..partial_qkv import QKV, fused_rows


class FusedQKVDims:
    """``head_dim`` and ``attn_dim`` read off a fused ``qkv``, for the timm attentions that keep neither."""

    qkv: nn.Module
    num_heads: int

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // 3 // self.num_heads

    @property
    def attn_dim(self) -> int:
        return self.qkv.out_features // 3


class HeadsAttnDim:
    """``attn_dim`` for the timm attentions that keep ``num_heads`` and ``head_dim`` but not their product."""

    num_heads: int
    head_dim: int

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


def project_heads(attn: nn.Module, x: torch.Tensor, which: str, head_dim: int) -> dict[str, torch.Tensor]:
    """The requested chunks as (B, heads, N, head_dim), as timm's forward computes them; no norms, no rope."""
    B, N, _ = x.shape
    which = "".join(c for c in QKV if c in which)
    fused = getattr(attn, "qkv", None) is not None
    if fused and which == "qkv":
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # BEiT's and EVA's separate q / zero k / v biases
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
        return dict(zip(QKV, qkv.reshape(B, N, 3, -1, head_dim).permute(2, 0, 3, 1, 4).unbind(0)))
    out = {}
    for name in which:
        if fused:
            w, b = fused_rows(attn.qkv, name)
            separate = getattr(attn, f"{name}_bias", None)
            y = F.linear(x, w, separate if separate is not None else b)
        else:
            y = getattr(attn, f"{name}_proj")(x)
        out[name] = y.reshape(B, N, -1, head_dim).transpose(1, 2)
    return out


def apply_rope(
    t: torch.Tensor, rope: torch.Tensor | None, num_prefix_tokens: int, half: bool
) -> torch.Tensor:
    if rope is None:
        return t
    rotated = apply_rot_embed_cat(t[:, :, num_prefix_tokens:, :], rope, half=half)
    return torch.cat([t[:, :, :num_prefix_tokens, :], rotated], dim=2).to(t.dtype)


def merged_heads_output(attn: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An adapter's ``_output`` for timm classes without an output norm or gate: (B, H, N_q, d) heads merged."""
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(x.shape[0], out.shape[2], -1)))
