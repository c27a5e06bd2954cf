"""transformers' ViT-MAE encoder as timm's VisionTransformer (as timm builds MAE's own encoders); the
decoder is dropped and reported, and a teacher sees every patch, as ``ViTMAEModel`` with ``mask_ratio=0``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import Taker, base_prefix
from .vit_deit import encoder, vit_kwargs, vit_name

MODEL_TYPES: tuple[str, ...] = ("vit_mae",)
#: the statistics facebook/vit-mae-* are published with (ImageNet's, as timm's .mae tags): the guess for a folder
#: without its preprocessor_config.json, where the architecture's default tag's (0.5) are another model's
GUESSED_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = vit_kwargs(config)
    kwargs.update(num_classes=0, global_pool="token")
    return vit_name(kwargs), kwargs


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.projection.weight", "ViT-MAE"))
    return t.finish(encoder(t, config), lambda k: k.startswith("decoder."))
