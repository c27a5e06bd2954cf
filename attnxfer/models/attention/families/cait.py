"""The CaiT family (``cait``): its two attentions as softmax `TransferableAttention`s.

`TransferTalkingHeadAttn`: ``TalkingHeadAttn`` (the self-attention blocks).

Talking heads mix heads twice: before the softmax (``proj_l``: L'_h = Σ_g W^l_hg·s·q_g k_gᵀ + b^l_h) and
after it (``proj_w``: P''_h = Σ_g W^w_hg·P'_g + b^w_h). The softmax map of head h is P'_h = softmax(L'_h):
a distribution, and the map this adapter transfers. The pre-softmax mix is still one dot product per
head: with q'_h = [W^l_h1·q_1, …, W^l_hH·q_H] and k' = [k_1, …, k_H] (head dim H·d, k' shared by every
head), L'_h = s·q'_h k'ᵀ + b^l_h, and b^l_h is constant along a row, so it drops out of the softmax.
So ``project`` hands out q' and k' and every softmax path applies unchanged: copy is SDPA with the
teacher's q', k'; distillation is the exact O(N) CE between the teacher's and student's P' maps.

The post-softmax mix P'' is not a distribution (its weights are signed), so it is not what is distilled;
it stays the layer's own: ``attend`` applies the *student's* ``proj_w`` to the (teacher's, in copy) P'
without building it — P''_h v_h = Σ_g W^w_hg·(P'_g v_h) + b^w_h·Σ_j v_hj, with P'_g v for every h from one
SDPA against all heads' values. With the teacher's own weights, copy reproduces the teacher exactly.
Attention dropout (0 in every pretrained CaiT) falls on P', not on P'' as in timm.

`TransferClassAttn`: ``ClassAttn`` (the class-attention blocks in ``blocks_token_only``).

One query row: the class token's q (B, H, 1, d) against the keys of the class token and every patch
token (B, H, 1 + N, d). Its map is one distribution per head — what copy borrows (SDPA with the
teacher's q, k) and what distillation's CE averages over (batch, head, that one row).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.cait import ClassAttn, TalkingHeadAttn

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import FusedQKVDims, _to_buffer, freeze_chunks, merged_heads_output, project_heads


@register_adapter(TalkingHeadAttn)
class TransferTalkingHeadAttn(FusedQKVDims, SoftmaxCore, TalkingHeadAttn):
    """``TalkingHeadAttn`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return TalkingHeadAttn.forward(self, x)
        return self.transfer_forward(x)

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        """q' (B, H, N, H·d): each head's pre-softmax mix of every head's q; k' (B, H, N, H·d): all heads'
        keys side by side (the same for each head); v (B, H, N, d) as timm's."""
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
        """Σ_g W^w_hg·P'_g v_h + b^w_h·Σ_j v_hj for P' = softmax(s·q kᵀ): the post-softmax head mix."""
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
        """Copied chunks' rows of ``qkv`` stop training; borrowing q (and k) also freezes ``proj_l``, which
        only shapes the logits the teacher now gives."""
        freeze_chunks(self, chunks)
        if "q" in set(chunks):
            self.proj_l.requires_grad_(False)


@register_adapter(ClassAttn)
class TransferClassAttn(SoftmaxCore, ClassAttn):
    """``ClassAttn`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class

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
        """q of the class token only (B, H, 1, d); k, v of every token (B, H, N, d)."""
        B = x.shape[0]
        out = {}
        for c in "qkv":
            if c in which:
                rows = x[:, :1] if c == "q" else x
                out[c] = getattr(self, c)(rows).reshape(B, rows.shape[1], self.num_heads, -1).transpose(1, 2)
        return out

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, 1, -1)))

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        """Copied chunks' linears (``q``/``k``/``v``) become buffers of the same names."""
        for c in set(chunks):
            for name in ("weight", "bias"):
                _to_buffer(getattr(self, c), name)


def resize_cait_weights(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """CaiT's weights for ``model`` at another size: its position embedding (patch tokens only: the class
    token joins in the class-attention blocks) resampled on the patch grid by timm's `resample_abs_pos_embed`
    (bicubic, antialiased), as timm's ViT filter does; timm's CaiT filter does not resample."""
    out = dict(state_dict)
    out["pos_embed"] = resample_abs_pos_embed(
        state_dict["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=0
    )
    return out


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
