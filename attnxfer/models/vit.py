"""Building students and teachers as timm ViTs with transfer-aware attention.

Every model is a plain timm `VisionTransformer` whose attention is
`TransferAttention` (same parameter names), so timm/MAE checkpoints load
unchanged and a softmax student exports to plain timm.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import _create_vision_transformer

from .attention import TransferAttention

__all__ = ["create_vit", "vit_micro_patch4_28", "vit_nano_patch4_28"]


def create_vit(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with `TransferAttention` in every block.

    ``name`` is any timm ViT name (``vit_small_patch16_224``, ``vit_base_patch16_224.mae``,
    ``hf-hub:...``); kwargs go to timm (``img_size``, ``depth``, ``num_classes``, ...).
    """
    kwargs.setdefault("attn_layer", TransferAttention)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _micro_cfg(**kwargs: Any) -> dict:
    return dict(
        url="",
        num_classes=10,
        input_size=(1, 28, 28),
        pool_size=None,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(0.5,),
        std=(0.5,),
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
        **kwargs,
    )


# timm's register_model reads `default_cfgs` from the defining module.
default_cfgs = generate_default_cfgs(
    {
        "vit_micro_patch4_28": _micro_cfg(),
        "vit_nano_patch4_28": _micro_cfg(),
    }
)


@register_model
def vit_micro_patch4_28(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT for 28×28 single-channel images: 7×7 patches of 4 px, width 96, 6 blocks, 3 heads."""
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_micro_patch4_28", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_nano_patch4_28(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A wider 28×28 ViT (width 192, 6 blocks, 3 heads): the demo's teacher."""
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_nano_patch4_28", pretrained=pretrained, **dict(args, **kwargs))
