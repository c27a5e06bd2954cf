"""transformers' I-JEPA encoder as timm's VisionTransformer without a class token:
``IJepaForImageClassification`` classifies the mean of the normalised tokens, timm's ``global_pool='avg'``
with ``fc_norm=False``. The optional pooler is dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import Taker, base_prefix, head_classes, linear, under
from .vit_deit import encoder, vit_kwargs, vit_name

MODEL_TYPES: tuple[str, ...] = ("ijepa",)


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = vit_kwargs(config)
    kwargs.update(num_classes=head_classes(config), class_token=False, global_pool="avg", fc_norm=False)
    return vit_name(kwargs), kwargs


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.projection.weight", "I-JEPA"))
    out = encoder(t, config, prefix_tokens=())
    if head_classes(config):
        out.update(under("head", linear(t.at(""), "classifier")))
    return t.finish(out, lambda k: k.startswith((f"{t.prefix}pooler.", f"{t.prefix}embeddings.mask_token")))
