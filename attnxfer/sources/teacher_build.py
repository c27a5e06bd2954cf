"""Building a teacher's timm model, at the size its weights were made for or at another one.

A teacher asked for at another ``img_size`` than its weights' is rebuilt the way its family declares
(`attnxfer.models.attention.ImageSizes`): timm's checkpoint filter resamples at creation, or the model is
loaded at its own size and its weights fitted to a twin built at the new one. A size the family cannot run
at is refused before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn

from ..errors import InputError
from ..models.attention import ImageSizes
from ..models.image_input import as_pair, check_image_size, image_input
from ..models.vit import create_vit
from .resolve import Resolved

# pretrained_cfg entries that say where weights live; a teacher's weights arrive as a state dict.
SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")


def create_teacher_model(
    arch: str, pretrained: bool, cfg: dict[str, Any], kwargs: dict[str, Any]
) -> nn.Module:
    """A ViT with `TransferAttention`, or a family with its own attention classes (EVA, BEiT, PVTv2, ...)
    that its adapter makes transfer-aware afterwards."""
    try:
        return create_vit(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    except TypeError as e:
        if "attn_layer" not in str(e) and "'img_size'" not in str(e):
            raise
        return create_family(arch, pretrained, cfg, kwargs)


@dataclass(frozen=True)
class OtherSize:
    """A teacher asked for at another size than its weights were made for: the side, the weights' size and
    how its family rebuilds it."""

    side: int
    native: tuple[int, int] | None
    sizes: ImageSizes


def other_size(
    res: Resolved, timm_kwargs: dict[str, Any], img_size: int | tuple[int, int] | None
) -> OtherSize | None:
    """What building at ``img_size`` takes, None where it is the weights' own size (or not given); a size the
    family cannot run at is refused here (`ImageSizeError`). The architecture at its own size is built on the
    meta device to ask (no memory, no weights)."""
    if img_size is None:
        return None
    pair = as_pair(img_size)
    if pair is None or pair[0] != pair[1]:
        raise InputError(f"img_size={img_size!r}: attnxfer runs square images; give one side in pixels")
    cfg = {k: v for k, v in res.pretrained_cfg.items() if k not in SOURCE_KEYS}
    with torch.device("meta"):  # the weights' own size: their recorded img_size, else the arch's
        native = create_family(res.architecture, False, cfg, {**res.model_args, **timm_kwargs})
    own_size = image_input(native).img_size
    if own_size == pair:
        return None
    return OtherSize(pair[0], own_size, check_image_size(native, pair[0]))


def rebuilt(
    model: nn.Module,
    arch: str,
    cfg: dict[str, Any],
    kwargs: dict[str, Any],
    resize: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]],
) -> nn.Module:
    """``model`` (loaded at its own size) rebuilt at ``kwargs["img_size"]``: the same architecture built
    there, its weights fitted by the family's ``resize`` and loaded strictly."""
    twin = create_teacher_model(arch, False, cfg, kwargs)
    twin.load_state_dict(resize(model.state_dict(), twin), strict=True)
    twin.pretrained_cfg = dict(model.pretrained_cfg)
    return twin


def create_family(arch: str, pretrained: bool, cfg: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` for a family with its own attention classes. A family whose constructor takes
    no ``img_size`` (PVTv2: any input its strides divide) is built without it."""
    try:
        return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
    except TypeError as e:
        if "'img_size'" not in str(e) or "img_size" not in kwargs:
            raise
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    return timm.create_model(arch, pretrained=pretrained, pretrained_cfg=cfg, **kwargs)
