"""transformers' CLIP vision tower as timm's CLIP VisionTransformer (``vit_*_clip_*``), as timm builds
OpenAI's towers: ``pre_layrnorm`` as ``norm_pre``, ``post_layernorm`` as the final ``norm``, the image
projection as the head (no bias).

timm's final norm runs over every token, so ``forward_features`` is ``post_layernorm(last_hidden_state)``
(its class token is ``pooler_output``) and ``forward`` is ``get_image_features`` where the checkpoint has
the projection. The text tower and ``CLIPForImageClassification``'s classifier (it averages patch tokens
before ``post_layernorm``) are dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    VIT_BASE,
    Taker,
    activation,
    architectures,
    base_prefix,
    clip_layer,
    linear,
    mlp_ratio,
    norm_layer,
    under,
    vision_tower,
    vit_dims,
)
from .vit_deit import vit_name

MODEL_TYPES: tuple[str, ...] = ("clip", "clip_vision_model")

DEFAULTS: dict[str, Any] = dict(
    VIT_BASE,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    patch_size=32,
    projection_dim=512,
)

# classes whose checkpoints hold the image projection
_PROJECTED = ("CLIPModel", "CLIPVisionModelWithProjection")


def _projection(config: dict[str, Any]) -> int:
    saved = architectures(config)
    projected = any(a in _PROJECTED for a in saved) if saved else config["model_type"] == "clip"
    if not projected:
        return 0
    return int(config.get("projection_dim") or vision_tower(config, DEFAULTS)["projection_dim"])


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    c = vision_tower(config, DEFAULTS)
    kwargs = dict(
        **vit_dims(c),
        mlp_ratio=mlp_ratio(int(c["intermediate_size"]), int(c["hidden_size"])),
        pre_norm=True,
        act_layer=activation(c),
        global_pool="token",
        num_classes=_projection(config),
        **norm_layer(c["layer_norm_eps"], timm_default=1e-5),
    )
    return vit_name(kwargs, "vit_{size}_patch{p}_clip_{i}", "vit_base_patch16_clip_224"), kwargs


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    c = vision_tower(config, DEFAULTS)
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embedding.weight", "CLIP vision tower"))
    out = {
        "cls_token": t.take("embeddings.class_embedding").reshape(1, 1, -1),
        "pos_embed": t.take("embeddings.position_embedding.weight").unsqueeze(0),
        "patch_embed.proj.weight": t.take("embeddings.patch_embedding.weight"),
        **under("norm_pre", linear(t, "pre_layrnorm")),
    }
    for i in range(int(c["num_hidden_layers"])):
        out.update(clip_layer(t, i))
    out.update(under("norm", linear(t, "post_layernorm")))
    if _projection(config):
        proj = t.at("").take("visual_projection.weight")
        out.update({"head.weight": proj, "head.bias": torch.zeros(proj.shape[0], dtype=proj.dtype)})
    tower = t.prefix
    return t.finish(
        out,
        lambda k: (
            not k.startswith(tower)  # the text tower, logit_scale, text_projection, a classifier
            or k == f"{tower}embeddings.position_ids"  # a buffer older checkpoints saved
        ),
    )
