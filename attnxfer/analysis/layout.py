"""What tokens a model makes of an image (input size, prefix tokens, patch grid and pitch) and whether it can
be inspected. The pitch is the patch conv's stride (PVTv2's overlapping 7x7 convs step by 4), so distances in
pixels are where the patches sit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from timm.models import get_model_traits

from ..errors import InputError
from ..models.attention import TransferableAttention, attention_layers
from ..models.image_input import as_pair, find_patch_embedding


class NotInspectable(InputError, TypeError):
    """A model (or a teacher/student pair) that cannot be inspected: the message says why and what to do."""


def inspectable_layers(model: nn.Module) -> list[tuple[str, TransferableAttention]]:
    """The model's attention layers, or `NotInspectable` saying what has no adapter or why."""
    try:
        return attention_layers(model)
    except TypeError as err:
        raise NotInspectable(f"cannot inspect {type(model).__name__}: {err}") from None


def _stem(model: nn.Module) -> nn.Module | None:
    """The module that cuts images into patch tokens, or None for a model without one attnxfer knows."""
    found = find_patch_embedding(model)
    return None if found is None else found[1]


def input_size(model: nn.Module) -> tuple[tuple[int, int], int]:
    """((height, width), channels) of the images ``model`` takes: its stem's, else its pretrained config's."""
    stem = _stem(model)
    cfg = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    stem_size = getattr(stem, "img_size", None) or getattr(stem, "default_img_size", None)
    # timm's traits before its pretrained config: a NaFlexViT built at 32 px keeps input_size 384 there
    size = as_pair(stem_size) or as_pair(get_model_traits(model).get("img_size")) or as_pair(cfg[1:])
    proj = getattr(stem, "proj", None)
    chans = getattr(stem, "in_chans", None) or getattr(proj, "in_channels", None) or cfg[0]
    return size, int(chans)


def token_layout(model: nn.Module, image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Prefix tokens, patch grid and patch size (px) for images of ``image_size`` (default: the model's);
    ``grid`` is empty where the stem has none to read."""
    inspectable_layers(model)
    stem = _stem(model)
    proj = getattr(stem, "proj", None)
    # a conv stem's stride is the patch pitch (overlapping patch embeddings: PVTv2's 7x7 convs of stride 4)
    patch = as_pair(proj.stride if isinstance(proj, nn.Conv2d) else getattr(stem, "patch_size", None))
    grid = as_pair(getattr(stem, "grid_size", None))
    if (
        image_size is not None
        and patch is not None
        and (grid is None or getattr(stem, "dynamic_img_size", 0))
    ):
        grid = (int(image_size[0]) // patch[0], int(image_size[1]) // patch[1])
    elif grid is None and patch is not None:
        (h, w), _ = input_size(model)
        grid = (h // patch[0], w // patch[1])
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if grid is None or patch is None:
        return {"prefix": prefix, "grid": [], "patch": [], "tokens": None}
    return {"prefix": prefix, "grid": list(grid), "patch": list(patch), "tokens": prefix + math.prod(grid)}
