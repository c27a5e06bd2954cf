"""SAM ViT's ``Attention`` as a softmax `TransferableAttention`. Windowed blocks hand it a batch of padded
windows (padding tokens kept as timm keeps them). Its logit bias is MViTv2's decomposed relative-position
bias, built from the unscaled q, so it depends on the input and takes a gradient through q; archs built
with rope instead rotate q and k and have no bias."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import Attention as SamAttention, get_decomposed_rel_pos_bias

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..softmax import SoftmaxCore
from ._projections import HeadsAttnDim, merged_heads_output, project_heads


@register_adapter(SamAttention)
class TransferSamAttention(HeadsAttnDim, SoftmaxCore, SamAttention):
    """SAM ViT's ``Attention``; takes and returns timm's (B', h, w, C) grids."""

    has_logit_bias = True

    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        # A windowed block (timm's ``Block.window_size`` > 0) attends within padded windows that it cuts
        # itself, so its query and key sets are not a global layer's: the plan must refuse pairing it with
        # a global layer or another window size, which otherwise failed at run time on the batch of windows.
        window = int(getattr(block, "window_size", 0) or 0)
        return {"window_size": window} if window else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return SamAttention.forward(self, x)
        B, H, W, C = x.shape
        out = self.transfer_forward(x.reshape(B, H * W, C), hw=(H, W))
        return out.view(B, H, W, -1)

    def project(
        self, x: torch.Tensor, which: str = "qkv", hw: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        out = project_heads(self, x, which, self.head_dim)
        rope = self.rope.get_embed() if self.rope is not None and not self.use_rel_pos else None
        for c, norm in (("q", self.q_norm), ("k", self.k_norm)):
            if c in out:
                out[c] = norm(out[c])
                if rope is not None:
                    out[c] = apply_rot_embed_cat(out[c], rope).type_as(out[c])
        return out

    def logit_bias(
        self, q: torch.Tensor, k: torch.Tensor, hw: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        if not self.use_rel_pos:
            return None
        B, H, N, d = q.shape
        bias = get_decomposed_rel_pos_bias(q.reshape(B * H, N, d), self.rel_pos_h, self.rel_pos_w, hw, hw)
        return bias.view(B, H, N, -1)

    _output = merged_heads_output


def resize_sam_weights(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """SAM's weights at another size, as timm's SAM forward adapts them at run time: the position embedding
    resampled, global blocks' decomposed tables interpolated linearly (windowed blocks keep theirs)."""
    out = dict(state_dict)
    if state_dict.get("pos_embed") is not None and model.pos_embed is not None:
        out["pos_embed"] = resample_abs_pos_embed_nhwc(state_dict["pos_embed"], model.pos_embed.shape[1:3])
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("rel_pos_h", "rel_pos_w") and name in state_dict:
            table = state_dict[name]
            if table.shape[0] != param.shape[0]:
                rows = F.interpolate(
                    table.reshape(1, table.shape[0], -1).permute(0, 2, 1), param.shape[0], mode="linear"
                )
                out[name] = rows.reshape(-1, param.shape[0]).permute(1, 0)
    return out


FAMILY = register_family(
    Family(
        name="sam",
        title="SAM ViT",
        modules=(ModuleCoverage("vision_transformer_sam", 3, 3, 3, ("inspect", "export")),),
        sizes=ImageSizes(
            resize_weights=resize_sam_weights,
            how="position embedding and global blocks' position tables resized as timm's SAM forward does "
            "at run time (windows padded as timm pads them at any size)",
        ),
    )
)
