"""q/k/v projections shared by the adapters of timm's non-``Attention`` classes.

timm keeps q/k/v in two layouts: a fused ``qkv`` linear (its bias either its own, or the separate
``q_bias`` / zero ``k_bias`` buffer / ``v_bias`` of BEiT and EVA), or three ``q_proj`` / ``k_proj`` /
``v_proj`` linears (k and v may have fewer heads: grouped-query attention). These helpers compute heads
exactly as timm does and freeze chunks (copied layers) without renaming anything. `fused_rows` and
`freeze_fused` are the two operations on any fused linear of row blocks (timm's ``qkv``; PVTv2/Twins' ``kv``,
used by `_reduced_keys`); `FusedQKVDims` gives the head sizes of the timm classes that keep only a fused
``qkv`` (and ``num_heads``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from ..interface import QKV, PartialQKV


class FusedQKVDims:
    """``head_dim`` and ``attn_dim`` read off a fused ``qkv`` linear (3·H·d outputs), for the timm attentions
    that keep neither (BEiT, Swin, Swin V2, CaiT's talking heads): the sizes the interface reshapes by. For
    talking heads, d is one head's size, not the H·d its mixed q' and k' have (`project` builds those)."""

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
    """(weight, bias) of row block ``name`` of a fused ``linear`` whose blocks are ``chunks`` (an
    ``nn.Linear`` or a `PartialQKV`)."""
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
    """Make ``attn.<attr>`` (a fused linear of ``chunks`` row blocks) a `PartialQKV` with ``frozen`` blocks,
    keeping the blocks it froze already; returns every frozen block, or None when all were frozen before
    (the module is then left as it is)."""
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
    """(weight, bias) of chunk ``name`` of a fused ``qkv`` (bias: the separate ``<name>_bias`` if any)."""
    w, b = fused_rows(attn.qkv, name)
    separate = getattr(attn, f"{name}_bias", None)
    return w, (separate if separate is not None else b)


def project_heads(attn: nn.Module, x: torch.Tensor, which: str, head_dim: int) -> dict[str, torch.Tensor]:
    """The requested chunks of ``which`` as (B, heads, N, head_dim), as timm's forward computes them
    (one fused linear when all three are asked for); no norms, no rope."""
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
    """timm's rotary embedding on the patch tokens of ``t`` (B, H, N, d), prefix tokens left as they are."""
    if rope is None:
        return t
    npt = num_prefix_tokens
    rotated = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)
    return torch.cat([t[:, :, :npt, :], rotated], dim=2).to(t.dtype)


def merged_heads_output(attn: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The core's (B, H, N, d) output as timm's classes without an output norm or gate finish it: heads
    merged, ``proj``, ``proj_drop`` (an adapter's ``_output``)."""
    B, N, _ = x.shape
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, -1)))


def _to_buffer(module: nn.Module, name: str) -> None:
    """Parameter ``name`` of ``module`` becomes a (persistent) buffer of the same name: no gradient, no
    optimizer slot, same ``state_dict`` key."""
    p = module._parameters.get(name)
    if p is None:
        return
    del module._parameters[name]
    module.register_buffer(name, p.detach().clone())


def freeze_chunks(attn: nn.Module, chunks: Iterable[str]) -> None:
    """Freeze the q/k/v projections ``chunks`` of either layout (copied layers do not use them): fused
    rows become a `PartialQKV`, separate linears' and biases' parameters become buffers of the same name,
    q/k norms stop taking gradients."""
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
