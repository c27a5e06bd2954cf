"""transformers' SigLIP vision tower as timm's SigLIP VisionTransformer (``vit_*_siglip_*``): no class
token, and the attention-pooling head as timm's ``global_pool='map'`` (the probe's packed ``in_proj``
split into ``q``, its first third, and ``kv``), so ``forward`` is ``get_image_features``.

A tower without the head (``vision_use_head: false``) and ``SiglipForImageClassification`` pool by
averaging ``last_hidden_state`` (``global_pool='avg'`` after the final norm); the classifier's unused
attention-pooling weights, the text tower, ``logit_scale`` and ``logit_bias`` are dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    VIT_BASE,
    Taker,
    activation,
    base_prefix,
    clip_layer,
    has_head,
    head_classes,
    linear,
    mlp_ratio,
    norm_layer,
    under,
    vision_tower,
    vit_dims,
)
from .vit_deit import vit_name

MODEL_TYPES: tuple[str, ...] = ("siglip", "siglip_vision_model")

DEFAULTS: dict[str, Any] = dict(
    VIT_BASE,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    patch_size=16,
    vision_use_head=True,
)


def _pools_by_attention(config: dict[str, Any]) -> bool:
    return bool(vision_tower(config, DEFAULTS)["vision_use_head"]) and not has_head(config)


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    c = vision_tower(config, DEFAULTS)
    pool = {"global_pool": "map"} if _pools_by_attention(config) else {"global_pool": "avg", "fc_norm": False}
    kwargs = dict(
        **vit_dims(c),
        mlp_ratio=mlp_ratio(int(c["intermediate_size"]), int(c["hidden_size"])),
        class_token=False,
        act_layer=activation(c),
        num_classes=head_classes(config),
        **pool,
        **norm_layer(c["layer_norm_eps"]),
    )
    return vit_name(kwargs, "vit_{size}_patch{p}_siglip_{i}", "vit_base_patch16_siglip_224"), kwargs


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    c = vision_tower(config, DEFAULTS)
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embedding.weight", "SigLIP vision tower"))
    out = {
        **under("patch_embed.proj", linear(t, "embeddings.patch_embedding")),
        "pos_embed": t.take("embeddings.position_embedding.weight").unsqueeze(0),
    }
    for i in range(int(c["num_hidden_layers"])):
        out.update(clip_layer(t, i))
    out.update(under("norm", linear(t, "post_layernorm")))
    if _pools_by_attention(config):
        # timm's ``attn_pool`` from transformers' ``head``: the probe, the packed q/k/v projection split into
        # ``q`` and ``kv``, the output projection, the LayerNorm and the MLP
        dim = int(c["hidden_size"])
        w, b = t.take("head.attention.in_proj_weight"), t.take("head.attention.in_proj_bias")
        pool = {
            "latent": t.take("head.probe"),
            "q.weight": w[:dim],
            "q.bias": b[:dim],
            "kv.weight": w[dim:],
            "kv.bias": b[dim:],
            **under("proj", linear(t, "head.attention.out_proj")),
            **under("norm", linear(t, "head.layernorm")),
            **under("mlp.fc1", linear(t, "head.mlp.fc1")),
            **under("mlp.fc2", linear(t, "head.mlp.fc2")),
        }
        out.update(under("attn_pool", pool))
    if has_head(config):
        out.update(under("head", linear(t.at(""), "classifier")))
    tower = t.prefix
    return t.finish(
        out,
        lambda k: (
            not k.startswith(tower)  # the text tower, logit_scale, logit_bias
            or k.startswith(f"{tower}head.")  # attention pooling a classifier does not use
            or k == f"{tower}embeddings.position_ids"
        ),
    )
