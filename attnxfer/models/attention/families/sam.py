"""`TransferSamAttention`: the ``Attention`` of timm's SAM ViT (``samvit_*``,
``timm.models.vision_transformer_sam``) as a softmax `TransferableAttention`.

SAM's blocks are windowed (``window_size`` > 0: the block pads the H×W grid to whole windows and hands
the attention a batch of windows) or global (``global_attn_indexes``). The attention sees a (B', h, w, C)
grid — windows already rows of its batch — so the token partition needs nothing here: a windowed
layer's q/k/v are (B·windows, H, h·w, d), padding tokens included as timm keeps them (they are keys of
the windows' rows; their own rows are dropped after the layer, and the CE averages them like every row).

Its logits are s·q kᵀ + B with the decomposed relative-position bias of MViTv2 (``use_rel_pos``):
B_ij = q_i·R^h[h_i−h_j] + q_i·R^w[w_i−w_j], built by timm's ``get_decomposed_rel_pos_bias`` from the
*unscaled* q (after q norm), so it depends on the input and the student's bias takes a gradient through q
too. Archs built with rope instead (``use_rope``) rotate q and k and have no bias.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import Attention as SamAttention, get_decomposed_rel_pos_bias

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import freeze_chunks, merged_heads_output, project_heads


@register_adapter(SamAttention)
class TransferSamAttention(SoftmaxCore, SamAttention):
    """SAM ViT's ``Attention`` meeting `TransferableAttention`; without an `AttentionIO` its forward is
    timm's. Takes and returns timm's (B', h, w, C) grids."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class
    has_logit_bias = True

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.io is None:
            return SamAttention.forward(self, x)
        B, H, W, C = x.shape
        out = self.transfer_forward(x.reshape(B, H * W, C), hw=(H, W))
        return out.view(B, H, W, -1)

    def project(
        self, x: torch.Tensor, which: str = "qkv", hw: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """q/k/v of the (B', N, C) tokens (``hw`` the grid they came from): q/k norms, rope if built with it."""
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
        """(B', H, N, N): timm's decomposed relative-position bias for queries ``q`` on the ``hw`` grid."""
        if not self.use_rel_pos:
            return None
        B, H, N, d = q.shape
        bias = get_decomposed_rel_pos_bias(q.reshape(B * H, N, d), self.rel_pos_h, self.rel_pos_w, hw, hw)
        return bias.view(B, H, N, -1)

    _output = merged_heads_output

    freeze_projections = freeze_chunks


def resize_sam_weights(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """SAM's weights for ``model`` at another size, as timm's SAM forward adapts them at run time (its patch
    embedding takes any size): the (1, H, W, C) position embedding resampled by timm's
    `resample_abs_pos_embed_nhwc`, and each global block's decomposed tables (2·grid − 1 rows) interpolated
    linearly as timm's ``get_rel_pos`` does; windowed blocks keep theirs (the window is unchanged)."""
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
