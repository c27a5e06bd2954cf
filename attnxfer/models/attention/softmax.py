"""Softmax attention for timm ViTs: `TransferAttention`, registered as ``"softmax"``.

`TransferAttention` is timm's `Attention` (same constructor, parameters and names) meeting the
`TransferableAttention` interface: through its per-call `AttentionIO` a caller can capture the
layer's ``(q, k, v)`` (after qk-norm), replace any of them (attention copy), or ask for the explicit
N×N map (visualisation and tests only). With a replaced ``q`` and ``k`` the layer is
``SDPA(q_t, k_t, v_s)``: the teacher's attention map applied to the student's values without ever
building the map. Only the projections the layer actually needs are computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

from .adapters import attention_layers
from .interface import MapKind, TransferableAttention
from .lse import LSEBackend, flex_attention_with_lse, lse_backend_for, row_logsumexp
from .opcount import OpCounts, matmul_ops, softmax_ops
from .registry import register_attention
from .slots import ConversionSlot

#: The registry name of softmax attention (`TransferAttention`; plain timm ``Attention`` is softmax too).
SOFTMAX = "softmax"

_TIMM_OPTIONS = frozenset(p for p in inspect.signature(Attention.__init__).parameters if p != "self")


class SoftmaxCore(TransferableAttention):
    """The softmax attention core every softmax layer shares (timm's ``Attention`` and the adapters of
    `attnxfer.models.attention.families`): ``attend`` by SDPA (an additive logit bias arrives as
    ``attn_mask``), its log-sum-exp, its explicit map (oracle) and its operation counts. The logits are
    ``logit_scale(q) · q kᵀ (+ logit_bias)``."""

    map_kind = MapKind.SOFTMAX

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """softmax(s · q kᵀ + mask) v by SDPA in the input dtype (flash/memory-efficient kernels: no
        N x N tensor), with timm's attention dropout in training; masks as timm's."""
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
        """The dropout probability on the map now: timm's ``attn_drop`` in training, else 0 (a layer
        without attention dropout, such as Hiera's, overrides this with 0)."""
        return self.attn_drop.p if self.training else 0.0

    def attend_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``attend`` plus the rows' log-sum-exp of its logits, both differentiable (`attention_with_lse`)."""
        return attention_with_lse(q, k, v, dropout_p=self.attention_dropout())

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        """Per (batch, head): q / sqrt(d) (N d), q k^T, the row softmax (max and exp as ``other``, the
        shift, the row sums, N^2 divisions), and P v."""
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
    """timm `Attention` that can hand out, take in, and show its q/k/v.

    Adds no parameters: a timm model built with it (``attn_layer=TransferAttention``)
    or converted with `make_transfer_aware` keeps timm's parameter names. Takes timm's
    ``Attention`` arguments, plus the zoo's token-layout keywords (ignored by softmax) so that
    per-layer attention lists can build it like any registered attention.
    """

    map_kind = MapKind.SOFTMAX
    #: A zoo attention takes a plain timm layer's place as the base slot has it: fused ``qkv``, the model's layout.
    conversion_slot = ConversionSlot

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        num_prefix_tokens: int | None = None,
        grid_size: int | Sequence[int] | None = None,
        depth: int = 0,
        **kwargs,
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
    """``F.scaled_dot_product_attention`` that stays on the fused kernels when v's head dim differs from q's.

    Fused kernels need one head dim for q, k and v; with a teacher's q/k (d_t) and a student's v (d_s)
    torch falls back to the math path, which builds and keeps the N×N map. Zero-padding the narrower
    side to the common dim is exact (zeros add nothing to q·k, and padded value columns are cut off),
    with the logit scale pinned to q's original dim.
    """
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s·q kᵀ) v and the rows' log-sum-exp of s·q kᵀ (s = d_q^-0.5; fp32), both differentiable.

    ``backend`` defaults to `lse_backend_for` the inputs' device: one FlexAttention kernel on CUDA, SDPA and
    the chunked `row_logsumexp` elsewhere (see `attnxfer.models.attention.lse`).
    """
    scale = q.shape[-1] ** -0.5
    backend = lse_backend_for(q.device, dropout_p) if backend is None else LSEBackend(backend)
    if backend is LSEBackend.FLEX:
        if dropout_p:
            raise ValueError("FlexAttention has no attention dropout: use the 'twin' backend")
        out, lse = flex_attention_with_lse(q, k, v, scale=scale)
        return out, lse if lse.dtype == torch.float64 else lse.float()
    return sdpa(q, k, v, dropout_p=dropout_p), row_logsumexp(q, k, scale)


def explicit_attention_map(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale · q kᵀ) in fp32: the oracle, never the data path."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if attn_mask is not None:
        logits = (
            logits + attn_mask
            if attn_mask.dtype != torch.bool
            else logits.masked_fill(~attn_mask, float("-inf"))
        )
    return logits.softmax(dim=-1)


def make_transfer_aware(model: nn.Module) -> nn.Module:
    """Let every attention layer in ``model`` take part in transfer, in place.

    timm's plain `Attention` becomes `TransferAttention` (the ViT family's adapter), and every timm attention
    class with an adapter (`attnxfer.models.attention.families`) its adapter, by a class swap (no state added: every tensor,
    name and hook is kept); attentions that already meet the interface are left as they are. An
    attention layer of a class with no adapter is an error naming it (`attention_layers`).
    """
    attention_layers(model)
    return model
