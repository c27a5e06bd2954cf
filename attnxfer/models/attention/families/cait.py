"""The CaiT family's two attentions as softmax `TransferableAttention`s.

Talking heads (`TransferTalkingHeadAttn`) mix heads before the softmax (``proj_l``) and after it
(``proj_w``). The pre-softmax mix is still one dot product per head: with q'_h = [W^l_h1·q_1, …, W^l_hH·q_H]
and k' = [k_1, …, k_H], L'_h = s·q'_h k'ᵀ + b^l_h, and b^l_h is constant along a row, so the distribution
P'_h = softmax(L'_h) is what every softmax path copies and distils. The post-softmax mix P'' is signed, so
it stays the layer's own: ``attend`` applies the student's ``proj_w`` to P' without building it (one SDPA
against all heads' values); with the teacher's weights copy reproduces the teacher exactly. Attention
dropout (0 in every pretrained CaiT) falls on P', not on P'' as in timm.

Class attention (`TransferClassAttn`) has one query row, the class token's, against every token."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.cait import ClassAttn, TalkingHeadAttn

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..partial_qkv import _to_buffer, freeze_chunks
from ..softmax import SoftmaxCore
from ._projections import FusedQKVDims, merged_heads_output, project_heads


@register_adapter(TalkingHeadAttn)
class TransferTalkingHeadAttn(FusedQKVDims, SoftmaxCore, TalkingHeadAttn):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return TalkingHeadAttn.forward(self, x)
        return self.transfer_forward(x)

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        """q' (B, H, N, H·d): each head's mix of every head's q; k': all heads' keys side by side."""
        out = project_heads(self, x, which, self.head_dim)
        B, H, N, d = next(iter(out.values())).shape
        if "q" in out:
            mixed = torch.einsum("hg,bgnd->bhngd", self.proj_l.weight, out["q"])
            out["q"] = mixed.reshape(B, H, N, H * d)
        if "k" in out:
            out["k"] = out["k"].transpose(1, 2).reshape(B, 1, N, H * d).expand(B, H, N, H * d)
        return out

    def logit_scale(self, q: torch.Tensor) -> float:
        return self.scale  # d^-0.5 of one head, not of q' (H·d)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, H, N, d = v.shape
        every_v = v.transpose(1, 2).reshape(B, 1, N, H * d).expand(B, H, N, H * d)
        # (B, G, N, H·d): P'_g v_h for every (g, h)
        per_map = SoftmaxCore.attend(self, q, k, every_v, attn_mask=attn_mask, is_causal=is_causal)
        mixed = torch.einsum("hg,bgnhd->bhnd", self.proj_w.weight.to(v.dtype), per_map.view(B, H, N, H, d))
        if self.proj_w.bias is not None:
            mixed = mixed + self.proj_w.bias.to(v.dtype).view(1, H, 1, 1) * v.sum(dim=2, keepdim=True)
        return mixed

    _output = merged_heads_output

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        """Borrowing q also freezes ``proj_l``, which only shapes the logits the teacher now gives."""
        freeze_chunks(self, chunks)
        if "q" in set(chunks):
            self.proj_l.requires_grad_(False)


@register_adapter(ClassAttn)
class TransferClassAttn(SoftmaxCore, ClassAttn):
    @property
    def head_dim(self) -> int:
        return self.q.out_features // self.num_heads

    @property
    def attn_dim(self) -> int:
        return self.q.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return ClassAttn.forward(self, x)
        return self.transfer_forward(x)

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        B = x.shape[0]
        out = {}
        for c in "qkv":
            if c in which:
                rows = x[:, :1] if c == "q" else x
                out[c] = getattr(self, c)(rows).reshape(B, rows.shape[1], self.num_heads, -1).transpose(1, 2)
        return out

    _output = merged_heads_output  # one row, the class token's

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        for c in set(chunks):
            _to_buffer(getattr(self, c), "weight", "bias")


def resize_cait_weights(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """CaiT's weights at another size: the position embedding resampled (timm's CaiT filter does not)."""
    pos_embed = resample_abs_pos_embed(
        state_dict["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=0
    )
    return {**state_dict, "pos_embed": pos_embed}


FAMILY = register_family(
    Family(
        name="cait",
        title="CaiT",
        modules=(ModuleCoverage("cait", 10, 10, 10, ("inspect", "export")),),
        sizes=ImageSizes(
            resize_weights=resize_cait_weights,
            how="position embedding resampled (timm's resample_abs_pos_embed; timm's CaiT filter does not)",
        ),
    )
)
