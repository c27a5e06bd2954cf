"""q/k/v projections shared by the adapters of timm's non-``Attention`` classes, computed exactly as timm does
from either layout (a fused ``qkv``, with BEiT's and EVA's separate biases, or ``q_proj``/``k_proj``/``v_proj``
with grouped k/v heads), and frozen for copied layers without renaming anything."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from ..interface import QKV, PartialQKV


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


def fused_rows(
    linear: nn.Module, name: str, chunks: Sequence[str] = QKV
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of row block ``name`` of a fused ``linear`` whose blocks are ``chunks``."""
    if isinstance(linear, PartialQKV):
        return linear.chunk(name)
    rows = linear.out_features // len(chunks)
    i = tuple(chunks).index(name)
    w = linear.weight[i * rows : (i + 1) * rows]
    b = linear.bias[i * rows : (i + 1) * rows] if linear.bias is not None else None
    return w, b


def freeze_fused(
    attn: nn.Module, attr: str, frozen: set[str], chunks: Sequence[str] = QKV
) -> set[str] | None:
    """Make ``attn.<attr>`` a `PartialQKV` with ``frozen`` (and the already frozen) blocks; returns every
    frozen block, or None when all were frozen before (the module is then left as it is)."""
    linear = getattr(attn, attr)
    if isinstance(linear, PartialQKV):
        if frozen <= set(linear.frozen):
            return None
        frozen = frozen | set(linear.frozen)
        linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.has_bias)
        linear.load_state_dict(getattr(attn, attr).state_dict())
    setattr(attn, attr, PartialQKV(linear, frozen, chunks=chunks))
    return frozen


def _fused_rows(attn: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = fused_rows(attn.qkv, name)
    separate = getattr(attn, f"{name}_bias", None)
    return w, (separate if separate is not None else b)


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
            w, b = _fused_rows(attn, name)
            y = F.linear(x, w, b)
        else:
            y = getattr(attn, f"{name}_proj")(x)
        out[name] = y.reshape(B, N, -1, head_dim).transpose(1, 2)
    return out


def apply_rope(
    t: torch.Tensor, rope: torch.Tensor | None, num_prefix_tokens: int, half: bool
) -> torch.Tensor:
    if rope is None:
        return t
    npt = num_prefix_tokens
    rotated = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)
    return torch.cat([t[:, :, :npt, :], rotated], dim=2).to(t.dtype)


def merged_heads_output(attn: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An adapter's ``_output`` for timm classes without an output norm or gate."""
    B, N, _ = x.shape
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, -1)))


def _to_buffer(module: nn.Module, name: str) -> None:
    """Parameter ``name`` becomes a buffer of the same name: no gradient, same ``state_dict`` key."""
    p = module._parameters.get(name)
    if p is None:
        return
    del module._parameters[name]
    module.register_buffer(name, p.detach().clone())


def freeze_chunks(attn: nn.Module, chunks: Iterable[str]) -> None:
    """Freeze the q/k/v projections ``chunks`` of either layout (copied layers do not use them)."""
    chunks = set(chunks)
    if not chunks:
        return
    if getattr(attn, "qkv", None) is not None:
        chunks = freeze_fused(attn, "qkv", chunks)
        if chunks is None:
            return
        for c in chunks:
            _to_buffer(attn, f"{c}_bias")
    else:
        for c in chunks:
            proj = getattr(attn, f"{c}_proj")
            for name in ("weight", "bias"):
                _to_buffer(proj, name)
    for c in chunks & {"q", "k"}:
        norm = getattr(attn, f"{c}_norm", None)
        if norm is not None:
            norm.requires_grad_(False)
