"""The EVA family (EVA-02, DINOv3, Perception Encoder): timm's ``EvaAttention`` and ``AttentionRope`` as
softmax `TransferableAttention`s. Logits s·q kᵀ after the q/k norms and the rope timm applies to the patch
tokens only; grouped k/v heads are repeated after the rope, as timm does. Both convert: a zoo attention
rotates q and k by the block's rope, as the teacher's layer did, before its feature map."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from timm.layers import AttentionRope
from timm.models.eva import EvaAttention

from ....errors import InputError
from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..slots import TokenLayout
from ..softmax import SoftmaxCore
from ._projections import HeadsAttnDim, apply_rope, project_heads
from ._rope import RopeSlot


class EvaRopeSlot(RopeSlot):
    """A zoo attention in an EVA-style rope layer, with the teacher's rope layout and unrotated prefix."""

    @classmethod
    def finish(cls, new: nn.Module, old: nn.Module, layout: TokenLayout | None, where: str) -> None:
        new.rotate_half = bool(getattr(old, "rotate_half", False))
        prefix = layout.prefix if layout is not None else 0
        if int(getattr(old, "num_prefix_tokens", prefix)) != prefix:
            raise InputError(
                f"{where}.attn leaves {old.num_prefix_tokens} tokens unrotated but the model has "
                f"{prefix} prefix tokens"
            )


class RopeProjection(SoftmaxCore):
    """q/k/v and the call of timm's rope attentions (``EvaAttention``, ``AttentionRope``)."""

    timm_class: ClassVar[type[nn.Module]]
    conversion_slot = EvaRopeSlot

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if self.io is None:
            return self.timm_class.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return self.transfer_forward(x, attn_mask=attn_mask, is_causal=is_causal, rope=rope)

    def project(
        self, x: torch.Tensor, which: str = "qkv", rope: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = project_heads(self, x, which, self.head_dim)
        half = bool(getattr(self, "rotate_half", False))
        for c, norm in (("q", self.q_norm), ("k", self.k_norm)):
            if c in out:
                out[c] = apply_rope(norm(out[c]), rope, self.num_prefix_tokens, half)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            for c in ("k", "v"):
                if c in out:
                    out[c] = out[c].repeat_interleave(groups, dim=1)
        return out


@register_adapter(EvaAttention)
class TransferEvaAttention(HeadsAttnDim, RopeProjection, EvaAttention):
    timm_class = EvaAttention


@register_adapter(AttentionRope)
class TransferAttentionRope(RopeProjection, AttentionRope):
    timm_class = AttentionRope


FAMILY = register_family(
    Family(
        name="eva",
        title="EVA-02 / DINOv3 / PE",
        rope=True,
        modules=(ModuleCoverage("eva", 65, 65, 65, ("inspect", "convert", "export")),),
        sizes=ImageSizes(
            how="position embeddings resampled by timm's checkpoint filter; the rope built for the new patch grid"
        ),
    )
)
