"""`TransferSwinV2Attention`: timm's Swin V2 ``WindowAttention`` (``timm.models.swin_transformer_v2``) as a
softmax `TransferableAttention`.

Windows, shifts, the mask and padding are Swin's (`attnxfer.models.attention.families.swin`). The logits are
cosine attention, τ_h · normalize(q)·normalize(k)ᵀ with τ_h = exp(min(logit_scale_h, log 100)) learned per
head, plus the continuous position bias 16·sigmoid(cpb_mlp(relative coordinates)) gathered to (1, H, N, N),
plus the shifted-window mask. The per-head τ is folded into the queries: ``project`` hands out
q = τ_h·normalize(q) and k = normalize(k), so the logits are q kᵀ + B at scale 1 (``logit_scale(q)`` = 1) and
every path of the interface (copy by SDPA, the biased CE with gradients into τ and ``cpb_mlp``) applies.

timm names the per-head parameter ``logit_scale``, the interface's method of the same name wins on the
adapter's class: the adapter reads the parameter as ``_parameters["logit_scale"]`` and, without an
`AttentionIO`, computes timm's forward itself, in timm's order (bit for bit: ``tests/families/test_adapters.py``);
the parameter keeps timm's name in ``state_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import WindowAttention

from ..adapters import register_adapter
from ..family import Family, ModuleCoverage, register_family
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import project_heads
from .swin import SWIN_SIZES, SwinWindowParts

#: timm's clamp of the learned log scale: τ ≤ 1 / 0.01.
_MAX_LOG_SCALE = math.log(1.0 / 0.01)


class CosineWindowCore(SwinWindowParts, SoftmaxCore):
    """Cosine window attention with a per-head learned τ (timm's ``logit_scale`` parameter, log-space,
    clamped at log 100), shared by Swin V2 and Swin V2-CR: τ is folded into q (``project``), the logit scale
    is 1. Subclasses give ``_position_bias``."""

    attention_name = SOFTMAX
    has_logit_bias = True

    def head_scales(self) -> torch.Tensor:
        """τ per head, (H, 1, 1): exp of timm's ``logit_scale`` parameter clamped at log 100."""
        log_tau = self._parameters["logit_scale"].reshape(self.num_heads, 1, 1)
        return torch.clamp(log_tau, max=_MAX_LOG_SCALE).exp()

    def logit_scale(self, q: torch.Tensor) -> float:
        return 1.0  # τ is in q (`project`)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """With an `AttentionIO`: `transfer_forward`. Without: timm's arithmetic in timm's order (timm's own
        forward reads ``self.logit_scale`` as the parameter, which the interface's method hides here), so
        the swapped model's outputs are timm's bit for bit."""
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
        """q (times τ) and k L2-normalised per head, v as projected."""
        out = project_heads(self, x, which, self.head_dim)
        if "q" in out:
            out["q"] = F.normalize(out["q"], dim=-1) * self.head_scales().to(out["q"].dtype)
        if "k" in out:
            out["k"] = F.normalize(out["k"], dim=-1)
        return out


@register_adapter(WindowAttention)
class TransferSwinV2Attention(CosineWindowCore, WindowAttention):
    """Swin V2's ``WindowAttention`` meeting `TransferableAttention`. Takes and returns timm's (B·nW, N, C)
    windows."""

    def reset_parameters(self) -> None:
        nn.init.constant_(self._parameters["logit_scale"], math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def _position_bias(self) -> torch.Tensor:
        """(1, H, N, N) continuous position bias, 16·sigmoid(cpb_mlp(relative coordinates))."""
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
