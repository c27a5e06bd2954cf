"""transformers' ViT and DeiT as timm's VisionTransformer / VisionTransformerDistilled.

``DeiTForImageClassificationWithTeacher`` averages its class and distillation heads, as timm's distilled
model does in eval; ``DeiTForImageClassification`` classifies from the class token alone, which timm's
distilled model cannot, so that classifier is dropped (features only), as are ViT's unused pooler and the
masked-image-modelling decoder.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    VIT_BASE,
    Taker,
    activation,
    base_prefix,
    head_classes,
    linear,
    mlp_ratio,
    norm_layer,
    pair,
    timm_name,
    under,
    vit_dims,
    vit_layer,
)

MODEL_TYPES: tuple[str, ...] = ("vit", "deit")

# transformers' defaults for keys a config.json may leave out (ViTConfig / DeiTConfig).
DEFAULTS: dict[str, Any] = dict(
    VIT_BASE,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    patch_size=16,
    qkv_bias=True,
)

_DEIT_HEADS = ("DeiTForImageClassificationWithTeacher",)


def vit_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The timm VisionTransformer arguments every transformers ViT-layer model shares (ViT, DeiT, ViT-MAE,
    I-JEPA)."""
    c = {**DEFAULTS, **config}
    return dict(
        **vit_dims(c),
        mlp_ratio=mlp_ratio(int(c["intermediate_size"]), int(c["hidden_size"])),
        qkv_bias=bool(c["qkv_bias"]),
        act_layer=activation(c),
        **norm_layer(c["layer_norm_eps"]),
    )


def vit_name(
    kwargs: dict[str, Any], template: str = "vit_{size}_patch{p}_{i}", default: str = "vit_base_patch16_224"
) -> str:
    """timm's name for a ViT of these arguments (``vit_base_patch16_224``; others with their template)."""
    patch, img = pair(kwargs["patch_size"])[0], pair(kwargs["img_size"])[0]
    return timm_name(template, default, kwargs["embed_dim"], p=patch, i=img)


def _classes(config: dict[str, Any]) -> int:
    return head_classes(config, _DEIT_HEADS) if config["model_type"] == "deit" else head_classes(config)


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = vit_kwargs(config)
    kwargs.update(num_classes=_classes(config), global_pool="token")
    if config["model_type"] == "deit":
        return vit_name(
            kwargs, "deit_{size}_distilled_patch{p}_{i}", "deit_base_distilled_patch16_224"
        ), kwargs
    return vit_name(kwargs), kwargs


def encoder(
    t: Taker, config: dict[str, Any], prefix_tokens: tuple[str, ...] = ("cls_token",)
) -> dict[str, torch.Tensor]:
    """transformers' ViT encoder: patch embedding, prefix tokens, position embeddings, every layer and the
    final LayerNorm."""
    c = {**DEFAULTS, **config}
    timm_names = {"cls_token": "cls_token", "distillation_token": "dist_token"}
    out = {timm_names[n]: t.take(f"embeddings.{n}") for n in prefix_tokens}
    out["pos_embed"] = t.take("embeddings.position_embeddings")
    out.update(under("patch_embed.proj", linear(t, "embeddings.patch_embeddings.projection")))
    for i in range(int(c["num_hidden_layers"])):
        out.update(vit_layer(t, i, bool(c["qkv_bias"])))
    out.update(under("norm", linear(t, "layernorm")))
    return out


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.projection.weight", "ViT"))
    deit = config["model_type"] == "deit"
    out = encoder(t, config, ("cls_token", "distillation_token") if deit else ("cls_token",))
    if _classes(config):
        head = t.at("")
        if deit:
            out.update(under("head", linear(head, "cls_classifier")))
            out.update(under("head_dist", linear(head, "distillation_classifier")))
        else:
            out.update(under("head", linear(head, "classifier")))
    # what a ViT / DeiT checkpoint may carry that the timm encoder does not use: the pooler, the mask token
    # and decoder of masked image modelling, DeiT's class-token-only classifier
    unused = (f"{t.prefix}pooler.", f"{t.prefix}embeddings.mask_token", "decoder.", "classifier.")
    return t.finish(out, lambda k: k.startswith(unused))
