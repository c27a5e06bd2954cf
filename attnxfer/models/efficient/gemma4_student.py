"""A zoo attention in a Gemma4-ViT block: q, k and v exactly as timm's ``Gemma4Attention`` computes them,
the zoo attention's own feature map / kernel after.

Gemma4's logits are q kᵀ at scale 1 (q and k RMS-normalised with a gain, then rotated by a 2-D rope whose
cos/sin the block passes per call; v RMS-normalised without a gain; grouped k/v heads repeated). The zoo
attentions build their maps around timm's scale d^-1/2, so the scale is folded into q and k: q·d^1/4 and
k·d^1/4 give (q d^1/4)·(k d^1/4)·d^-1/2 = q·k, the teacher's logits, for every kernel. Stage 1 compares the
student's map with the teacher's at the teacher's scale (``teacher_logit_scale``).
"""

from __future__ import annotations

import torch
from timm.models.gemma4_vit import Gemma4Attention
from torch import nn

from ...errors import InputError
from ..attention.families.gemma4 import gemma4_heads
from .base import EfficientAttention, rope_refusal

__all__ = ["gemma4_student_attention"]


class Gemma4Projections:
    """Mixin before a zoo attention class: Gemma4's call signature and projections (see the module doc)."""

    #: The teacher layer's logit scale (Gemma4: 1); stage 1 builds the teacher's maps with it.
    teacher_logit_scale = 1.0
    rope_cos_sin_call = True  # Gemma4Block calls attn(x, cos, sin): capture stacks them

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gemma4Block's call ``attn(x, rope_cos, rope_sin, attn_mask=)``; ``rope`` is cos and sin stacked
        (as stage 1 captures them)."""
        if rope is None and rope_cos is not None:
            rope = torch.stack((rope_cos, rope_sin))
        call = {} if rope is None else {"rope": rope}
        return self.transfer_forward(x, attn_mask=attn_mask, **call)

    def project(
        self, x: torch.Tensor, which: str = "qkv", rope: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """q, k (scale folded in) and v heads (B, H, N, d) as ``Gemma4Attention.forward`` makes them."""
        if rope is not None and not self.rope_keeps_map_kind:
            raise InputError(rope_refusal(type(self)))
        cos, sin = (None, None) if rope is None else (rope[0], rope[1])
        fold = self.head_dim**0.25
        return {c: t * fold if c != "v" else t for c, t in gemma4_heads(self, x, which, cos, sin).items()}


_CLASSES: dict[type, type] = {}


def _with_gemma4_projections(cls: type[EfficientAttention]) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Gemma4{cls.__name__}", (Gemma4Projections, cls), {"__module__": __name__})
    return _CLASSES[cls]


def gemma4_student_attention(
    old: Gemma4Attention, cls: type[EfficientAttention], config: dict
) -> EfficientAttention:
    """``cls`` built with ``config`` (token layout, options) and the shapes of ``old``, whose projections and
    norms (the teacher copy's own modules) move in unchanged."""
    weight = old.q_proj.linear.weight
    new = cls(
        dim=weight.shape[1],
        num_heads=old.num_heads,
        attn_head_dim=old.head_dim,
        qkv_bias=False,
        proj_bias=old.o_proj.linear.bias is not None,
        attn_drop=old.attn_drop.p,
        proj_drop=old.proj_drop.p,
        **config,
    ).to(device=weight.device, dtype=weight.dtype)
    del new.qkv
    for name in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "v_norm"):
        setattr(new, name, getattr(old, name))
    new.proj = old.o_proj
    new.norm = nn.Identity()
    new.num_kv_heads, new.num_kv_groups = old.num_kv_heads, old.num_kv_groups
    new.__class__ = _with_gemma4_projections(cls)
    new.train(old.training)
    return new
