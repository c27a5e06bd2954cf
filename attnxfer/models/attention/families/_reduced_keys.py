"""Spatial-reduction attention's projections, shared by PVTv2's ``Attention`` and Twins' ``GlobalSubSampleAttn``.

Both compute queries from every token with a ``q`` linear and keys/values with one fused ``kv`` linear from
a *reduced* token set (a strided conv + norm, or PVTv2-linear's pooling), so N_k < N_q. These helpers give
q (B, H, N_q, d) and k/v (B, H, N_k, d) exactly as timm's forward does, computing the reduction only when
k or v is asked for, and freeze chunks for copied layers without renaming anything (``q`` becomes buffers,
``kv`` a `PartialQKV` over its ``("k", "v")`` row blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..interface import QKV
from ._projections import _to_buffer, freeze_fused, fused_rows

__all__ = ["KV_CHUNKS", "freeze_q_kv", "project_q_kv"]

#: The row blocks of a fused ``kv`` linear, in timm's order.
KV_CHUNKS = ("k", "v")


def project_q_kv(
    attn: nn.Module,
    x: torch.Tensor,
    which: str,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    num_heads: int,
    head_dim: int,
) -> dict[str, torch.Tensor]:
    """The requested chunks of ``which``: q of ``x`` (B, N_q, C) and k/v of ``reduce(x)`` (B, N_k, C), each as
    (B, num_heads, tokens, head_dim)."""
    out: dict[str, torch.Tensor] = {}
    if "q" in which:
        B, N, _ = x.shape
        out["q"] = attn.q(x).reshape(B, N, num_heads, head_dim).transpose(1, 2)
    wanted = [c for c in KV_CHUNKS if c in which]
    if not wanted:
        return out
    r = reduce(x)
    B, M, _ = r.shape
    if len(wanted) == 2:
        k, v = attn.kv(r).reshape(B, M, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return {**out, "k": k, "v": v}
    c = wanted[0]
    w, b = fused_rows(attn.kv, c, KV_CHUNKS)
    out[c] = F.linear(r, w, b).reshape(B, M, num_heads, head_dim).transpose(1, 2)
    return out


def freeze_q_kv(attn: nn.Module, chunks: Iterable[str]) -> None:
    """Freeze the projections ``chunks`` (a subset of q, k, v): ``q``'s parameters become buffers of the same
    names; k/v become frozen row blocks of a `PartialQKV` ``kv`` (``kv.weight``/``kv.bias`` in the state dict)."""
    chunks = set(chunks) & set(QKV)
    if "q" in chunks:
        for name in ("weight", "bias"):
            _to_buffer(attn.q, name)
    frozen = chunks & set(KV_CHUNKS)
    if frozen:
        freeze_fused(attn, "kv", frozen, KV_CHUNKS)
