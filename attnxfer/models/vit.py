"""Students and teachers as timm ViTs with transfer-aware attention (same parameter names, so timm/MAE
checkpoints load unchanged), and the demo's micro models."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import _create_vision_transformer

from .attention import TransferAttention


def create_vit(
    name: str, pretrained: bool = False, optional: tuple[str, ...] = (), **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with `TransferAttention` in every block (architectures that build their own
    attention get timm's); kwargs named in ``optional`` are left out where the architecture takes none."""
    if not isinstance(name, str):  # timm fails on `name.partition`
        raise TypeError(
            f"create_vit takes a timm architecture name, got {type(name).__name__}; for a student shaped like a "
            "model you have, attnxfer.student_like(model)"
        )
    kwargs.setdefault("attn_layer", TransferAttention)
    return create_dropping(name, pretrained, kwargs, optional=("attn_layer", *optional))


def create_dropping(
    name: str, pretrained: bool, kwargs: dict[str, Any], optional: tuple[str, ...]
) -> nn.Module:
    """``timm.create_model`` without the ``optional`` kwargs the architecture does not take: PVTv2 takes no
    ``img_size`` or ``attn_layer``, which the training app passes to every model."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        dropped = [k for k in optional if k in kwargs and f"keyword argument '{k}'" in str(e)]
        if not dropped:
            raise
        return create_dropping(
            name, pretrained, {k: v for k, v in kwargs.items() if k != dropped[0]}, optional
        )


_MICRO_CFG = dict(
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
)


# timm's register_model reads `default_cfgs` from the defining module.
default_cfgs = generate_default_cfgs(
    {
        "vit_micro_patch4_28": dict(_MICRO_CFG),
        "vit_nano_patch4_28": dict(_MICRO_CFG),
        "pvt_v2_micro_56": {**_MICRO_CFG, "input_size": (1, 56, 56)},
    }
)


@register_model
def vit_micro_patch4_28(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT for 28×28 single-channel images: 7×7 patches of 4 px, width 96, 6 blocks, 3 heads."""
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_micro_patch4_28", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_nano_patch4_28(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A wider 28×28 ViT (width 192, 6 blocks, 3 heads) than the demo's `vit_micro_patch4_28`."""
    args = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_nano_patch4_28", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def pvt_v2_micro_56(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """PVTv2 for 56×56 single-channel images (animal-mnist up-sampled): 4 stages of 14², 7², 4², 2² tokens,
    widths 32-64-96-128, sr_ratio 1 everywhere (full attention: the hierarchical demo's convertible teacher)."""
    from timm.models.pvt_v2 import _create_pvt2

    args = dict(
        in_chans=1,
        embed_dims=(32, 64, 96, 128),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        sr_ratios=(1, 1, 1, 1),
        mlp_ratios=(4.0, 4.0, 4.0, 4.0),
    )
    return _create_pvt2("pvt_v2_micro_56", pretrained=pretrained, **dict(args, **kwargs))
