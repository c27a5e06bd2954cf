"""Softmax attention for timm ViTs: `TransferAttention` (registered as ``"softmax"``) is timm's `Attention`
meeting the interface; with a teacher's q and k it is ``SDPA(q_t, k_t, v_s)``, the teacher's map applied to
the student's values without ever building the map."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

from .adapters import attention_layers
from .interface import MapKind, TransferableAttention, _merge_masks
from .lse import LSEBackend, flex_attention_with_lse, lse_backend_for, row_logsumexp
from .opcount import OpCounts, matmul_ops, softmax_ops
from .registry import register_attention
from .slots import ConversionSlot

#: The registry name of softmax attention (`TransferAttention`; plain timm ``Attention`` is softmax too).
SOFTMAX = "softmax"

_TIMM_OPTIONS = frozenset(p for p in inspect.signature(Attention.__init__).parameters if p != "self")


class SoftmaxCore(TransferableAttention):
    """The softmax core every softmax layer shares (timm's ``Attention`` and the family adapters): ``attend``
    by SDPA (a logit bias arrives as ``attn_mask``), its log-sum-exp, explicit map and operation counts."""

    map_kind = MapKind.SOFTMAX
    attention_name = SOFTMAX  # every softmax adapter is timm's own class: it exports as plain timm

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        return sdpa(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout(),
            is_causal=is_causal,
            scale=self.logit_scale(q),
        )

    def attention_dropout(self) -> float:
        """timm's ``attn_drop`` in training, else 0 (Hiera's layer, which has none, overrides this)."""
        return self.attn_drop.p if self.training else 0.0

    def attend_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's own ``attend`` and the lse of its logits at its own scale (Gemma4's 1, CaiT's one-head
        d^-0.5): a layer that mixes after the softmax (talking heads) keeps its output, its lse the twin's."""
        scale = self.logit_scale(q)
        if type(self).attend is not SoftmaxCore.attend:
            return self.attend(q, k, v), row_logsumexp(q, k, scale)
        return attention_with_lse(q, k, v, dropout_p=self.attention_dropout(), scale=scale)

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): q / sqrt(d), q k^T, the row softmax and P v."""
        n, d = num_tokens, self.head_dim
        per_head = OpCounts(mul=n * d) + matmul_ops(n, d, n) + softmax_ops(n, n) + matmul_ops(n, n, d)
        return per_head * (batch * self.num_heads)

    def _map_context(self, q, k):
        return q * self.logit_scale(q), k

    def _map_rows(self, context, rows):
        q, k = context
        return (q[:, :, rows] @ k.transpose(-2, -1)).softmax(dim=-1)

    def _io_map(self, q, k, attn_mask):
        return explicit_attention_map(q, k, attn_mask=attn_mask, scale=self.logit_scale(q))


@register_attention(SOFTMAX)
class TransferAttention(SoftmaxCore, Attention):
    """timm `Attention` that can hand out, take in, and show its q/k/v, with timm's parameter names."""

    conversion_slot = ConversionSlot

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_prefix_tokens: int | None = None,
        grid_size: int | Sequence[int] | None = None,
        depth: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if num_prefix_tokens is not None or grid_size is not None:
            self.set_token_layout(num_prefix_tokens or 0, grid_size)

    @classmethod
    def accepts_option(cls, name: str) -> bool:
        return name in _TIMM_OPTIONS or super().accepts_option(name)

    def new_parameter_names(self):
        return []  # every parameter is timm's own


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` that stays on the fused kernels (which need one head dim, else the
    math path keeps the N×N map) when v's head dim differs from q's: zero-padding is exact."""
    dq, dv = q.shape[-1], v.shape[-1]
    scale = dq**-0.5 if scale is None else scale
    if dq != dv:
        d = max(dq, dv)
        q, k = F.pad(q, (0, d - dq)), F.pad(k, (0, d - dq))
        v = F.pad(v, (0, d - dv))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
    return out[..., :dv] if dq != dv else out


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    backend: LSEBackend | str | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s·q kᵀ) v and the rows' log-sum-exp of s·q kᵀ (fp32), both differentiable (s: ``scale``, default
    d^-0.5); ``backend`` defaults to FlexAttention on CUDA, SDPA and the chunked `row_logsumexp` elsewhere."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = lse_backend_for(q.device, dropout_p) if backend is None else LSEBackend(backend)
    if backend is LSEBackend.FLEX:
        if dropout_p:
            raise ValueError("FlexAttention has no attention dropout: use the 'twin' backend")
        out, lse = flex_attention_with_lse(q, k, v, scale=scale)
        return out, lse if lse.dtype == torch.float64 else lse.float()
    return sdpa(q, k, v, dropout_p=dropout_p, scale=scale), row_logsumexp(q, k, scale)


def explicit_attention_map(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale · q kᵀ) in fp32: the oracle, never the data path."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    return _merge_masks(logits, attn_mask).softmax(dim=-1)


def make_transfer_aware(model: nn.Module) -> nn.Module:
    """Let every attention layer in ``model`` take part in transfer (a class swap, in place)."""
    attention_layers(model)
    return model
