"""What one attention layer attended with on a batch of images (`LayerSignals`): q, k and logit bias as they
enter its logits, never a map, so rows of the map can be built a chunk at a time. A bias gathered from a
relative-position table stays `BiasRows` (never held whole).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..models.attention import AttentionIO, MapKind, TransferableAttention, attention_layers, run_with_ios
from ..models.attention.bias_rows import BiasRows, bias_block
from ..models.attention.numerics import fp32_section, upcast
from .metrics import renormalise


@dataclass
class LayerSignals:
    """Logits ``scale · q kᵀ + bias``: q (B', H, N_q, d), k (B', H, N_k, d) after q/k norms and rope (B':
    images, or images × windows); ``bias`` holds the model's attention mask too. ``borrowed``: q and k are a
    teacher's (attention copy), so the map is a softmax one whatever the layer's own kind."""

    name: str
    attn: TransferableAttention
    q: torch.Tensor
    k: torch.Tensor
    bias: torch.Tensor | BiasRows | None = None
    borrowed: bool = False

    def __getitem__(self, key: str) -> torch.Tensor | None:
        if key not in ("q", "k", "bias"):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self[key] if key in ("q", "k", "bias") else None
        return default if value is None else value

    @property
    def kind(self) -> MapKind:
        return MapKind.SOFTMAX if self.borrowed else self.attn.map_kind

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B', N_q, N_k): rows of a batch, queries, keys."""
        return self.q.shape[0], self.q.shape[-2], self.k.shape[-2]

    def map_rows(self, rows: slice | None = None) -> torch.Tensor | None:
        """Rows of the layer's map, (B', H, len(rows), N_k) in fp32 (float64 stays); signed maps clipped at 0
        and renormalised; None for an attention without a map."""
        kind = self.kind
        if not kind.has_map:
            return None
        if kind is MapKind.SOFTMAX:
            # softmax(scale · q[rows] kᵀ + bias[rows]); a bias broadcasts over batch, heads or queries where it
            # has size 1 there, `BiasRows` hand out only the chunk's rows
            scale = self.attn.logit_scale(self.q)
            rows = rows or slice(0, self.q.shape[-2])
            with fp32_section(self.q.device.type):
                q, k = upcast(self.q[:, :, rows], self.k)
                logits = (q * scale) @ k.transpose(-2, -1)
                if self.bias is not None:
                    logits = logits + _bias_rows(self.bias, rows).to(logits.dtype)
                a = logits.softmax(-1)
        else:
            a = self.attn.attention_map(self.q, self.k, rows)
        return renormalise(a.clamp_min(0)) if kind is MapKind.SIGNED else a


def _bias_rows(bias: torch.Tensor | BiasRows, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of a bias (a tensor with size 1 over queries broadcasts: it is returned whole)."""
    return bias if isinstance(bias, torch.Tensor) and bias.shape[-2] == 1 else bias_block(bias, rows)


def _with_mask(
    bias: torch.Tensor | BiasRows | None, mask: torch.Tensor | None
) -> torch.Tensor | BiasRows | None:
    """The logit bias with the model's attention mask folded in, `BiasRows` staying row-chunked."""
    if mask is None or bias is None:
        return bias if mask is None else mask
    if isinstance(bias, torch.Tensor):
        return bias + mask
    shape = tuple(torch.broadcast_shapes(bias.shape, mask.shape))

    def rows_fn(rows: slice, *inputs: torch.Tensor) -> torch.Tensor:
        *own, mask_in = inputs
        return bias.rows_fn(rows, *own) + _bias_rows(mask_in, rows)

    return BiasRows(rows_fn, (*bias.inputs, mask), shape)


@torch.no_grad()
def layer_qk(
    model: nn.Module, x: torch.Tensor, borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None
) -> list[LayerSignals]:
    """Per attention layer what it attends with on ``x``: its own q/k and bias, or ``borrow[layer]``
    (attention copy). One run of the forward, stopped inside the last attention layer once it has captured."""
    layers = attention_layers(model)
    borrow = borrow or {}
    ios: dict[int, AttentionIO] = {}
    for i in range(len(layers)):
        given = {c: t for c, t in (borrow.get(i) or {}).items() if c in "qk" and t is not None}
        io = AttentionIO(capture="" if len(given) == 2 else "qk", **given)
        if len(given) == 2:
            io.bias = (borrow.get(i) or {}).get("bias")
        ios[i] = io
    if ios:  # nothing after the last attention is read: its core, MLP, neck and head are skipped
        ios[len(layers) - 1].stop = True
    masks: dict[int, torch.Tensor] = {}
    dtype = next(model.parameters()).dtype
    run_with_ios(model, x.to(dtype), ios, masks=masks)
    out = []
    for i, (name, attn) in enumerate(layers):
        io = ios[i]
        if not io.captured and io.q is None:
            raise RuntimeError(f"{name} did not run in {type(model).__name__}'s forward: nothing to inspect")
        q = io.q if io.q is not None else io.captured["q"]
        k = io.k if io.k is not None else io.captured["k"]
        # a captured bias comes as `BiasRows`: kept so, the maps take it a row chunk at a time
        bias = io.bias if io.q is not None and io.k is not None else io.captured.get("bias")
        mask = masks.get(i)
        # timm's attn_mask (True = attend) as an additive term
        if mask is not None and mask.dtype == torch.bool:
            mask_dtype = q.dtype if q.is_floating_point() else torch.float32
            mask = torch.zeros(mask.shape, dtype=mask_dtype, device=mask.device).masked_fill(
                ~mask, float("-inf")
            )
        bias = _with_mask(bias, mask)
        out.append(LayerSignals(name, attn, q, k, bias, borrowed=io.q is not None or io.k is not None))
    return out


def borrowed_signals(
    borrow: Mapping[int, tuple[int, str]], t_sig: Sequence[LayerSignals]
) -> dict[int, dict[str, torch.Tensor]]:
    """The teacher q/k (and, with both, its bias) a copy student's layers attend with."""
    out = {}
    for i, (t, chunks) in borrow.items():
        given = {c: t_sig[t][c] for c in chunks if c in "qk"}
        if len(given) == 2:
            given["bias"] = t_sig[t].bias
        out[i] = given
    return out
