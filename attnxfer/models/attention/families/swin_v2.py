"""Swin V2's ``WindowAttention`` as a softmax `TransferableAttention`: Swin's windows, with cosine logits
τ_h·normalize(q)·normalize(k)ᵀ (τ_h = exp(min(logit_scale_h, log 100))) plus the continuous position bias.
τ is folded into q, so the logits are q kᵀ + B at scale 1 and every path of the interface applies. timm
names the parameter ``logit_scale``, which the interface's method hides: the adapter reads it as
``_parameters["logit_scale"]`` and computes timm's forward itself (it keeps its name in ``state_dict``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import WindowAttention

from ..adapters import register_adapter
from ..family import Family, ModuleCoverage, register_family
from ..softmax import SoftmaxCore
from ._projections import project_heads
from .swin import SWIN_SIZES, SwinWindowParts

#: timm's clamp of the learned log scale: τ ≤ 1 / 0.01.
_MAX_LOG_SCALE = math.log(1.0 / 0.01)


class CosineWindowCore(SwinWindowParts, SoftmaxCore):
    """Cosine window attention with τ folded into q, shared by Swin V2 and V2-CR."""

    has_logit_bias = True

    def head_scales(self) -> torch.Tensor:
        log_tau = self._parameters["logit_scale"].reshape(self.num_heads, 1, 1)
        return torch.clamp(log_tau, max=_MAX_LOG_SCALE).exp()

    def logit_scale(self, q: torch.Tensor) -> float:
        return 1.0  # τ is in q (`project`)

    def reset_parameters(self) -> None:
        nn.init.constant_(self._parameters["logit_scale"], math.log(10))
        if getattr(self, "q_bias", None) is not None:  # Swin V2's separate q/v biases (V2-CR has none)
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without an `AttentionIO`, timm's arithmetic in timm's order (timm's forward would read the method
        ``logit_scale`` for the parameter), bit for bit."""
        if self.io is not None:
            return self.transfer_forward(x, mask=mask)
        B_, N, _ = x.shape
        qkv = project_heads(self, x, "qkv", self.head_dim)
        attn = F.normalize(qkv["q"], dim=-1) @ F.normalize(qkv["k"], dim=-1).transpose(-2, -1)
        attn = attn * self.head_scales() + self._position_bias()
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ qkv["v"]).transpose(1, 2).reshape(B_, N, -1)))

    def project(
        self, x: torch.Tensor, which: str = "qkv", mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = project_heads(self, x, which, self.head_dim)
        if "q" in out:
            out["q"] = F.normalize(out["q"], dim=-1) * self.head_scales().to(out["q"].dtype)
        if "k" in out:
            out["k"] = F.normalize(out["k"], dim=-1)
        return out


@register_adapter(WindowAttention)
class TransferSwinV2Attention(CosineWindowCore, WindowAttention):
    """Swin V2's ``WindowAttention``; (B·nW, N, C) windows in and out."""

    def _position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias).unsqueeze(0)


FAMILY = register_family(
    Family(
        name="swin_v2",
        title="Swin V2",
        hierarchical=True,
        modules=(ModuleCoverage("swin_transformer_v2", 12, 12, 12, ("inspect", "export")),),
        sizes=SWIN_SIZES,
    )
)
