"""transformers' DINOv3 ViT as timm's EVA, as timm builds the ``vit_*_dinov3`` models (2-D rope on the
patch tokens: timm's ``rope_type='dinov3'`` with ``rope_rotate_half`` is the same function).

transformers' training-time rope augmentations are not carried: a teacher runs in eval, where they do not
apply. A key bias cannot be expressed (EVA's is a fixed zero) unless it is zero; a query, value, output or
MLP bias the config leaves out is zeros in timm.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    Taker,
    activation,
    base_prefix,
    linear,
    mlp_ratio,
    norm_layer,
    pair,
    timm_name,
    under,
    vit_dims,
)

MODEL_TYPES: tuple[str, ...] = ("dinov3_vit",)

DEFAULTS: dict[str, Any] = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    image_size=224,
    patch_size=16,
    num_channels=3,
    layerscale_value=1.0,
    num_register_tokens=0,
    rope_theta=100.0,
    query_bias=True,
    key_bias=False,
    value_bias=True,
    proj_bias=True,
    mlp_bias=True,
    use_gated_mlp=False,
)


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    c = {**DEFAULTS, **config}
    dim, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if (dim // heads) % 4:
        raise ValueError(f"head dim {dim // heads} is not a multiple of 4 (2-D rope splits it four ways)")
    gated = bool(c["use_gated_mlp"])
    act = activation(c)
    if act != ("silu" if gated else "gelu"):
        raise ValueError(
            f"hidden_act={c['hidden_act']!r} with use_gated_mlp={gated}: timm's EVA MLP is GELU, its SwiGLU SiLU"
        )
    kwargs: dict[str, Any] = dict(
        **vit_dims(c),
        qkv_bias=bool(c["query_bias"] or c["value_bias"]),
        mlp_ratio=mlp_ratio(int(c["intermediate_size"]), dim),
        swiglu_mlp=gated,
        init_values=float(c["layerscale_value"]),
        num_reg_tokens=int(c["num_register_tokens"]),
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_type="dinov3",
        rope_temperature=float(c["rope_theta"]),
        rope_rotate_half=True,
        dynamic_img_size=True,
        use_fc_norm=False,
        global_pool="token",
        num_classes=0,
        **norm_layer(c["layer_norm_eps"], timm_default=1e-5),
    )
    if gated:  # SwiGLU with separate gate / up projections (alignment 1: the width stays the config's)
        kwargs["swiglu_align_to"] = 1
    return timm_name(
        "vit_{size}_patch{p}_dinov3", "vit_small_patch16_dinov3", dim, p=pair(c["patch_size"])[0]
    ), kwargs


def _bias(t: Taker, name: str, present: bool, like: torch.Tensor) -> torch.Tensor:
    """A bias the config has is taken; one it leaves out is zeros (exactly no bias)."""
    if present:
        return t.take(f"{name}.bias")
    return torch.zeros(like.shape[0] if like.dim() else 0, dtype=like.dtype)


def _layer(t: Taker, i: int, c: dict[str, Any]) -> dict[str, torch.Tensor]:
    new = f"model.layer.{i}"
    b = f"layer.{i}" if t.has(f"layer.{i}.norm1.weight") else new  # saved, or transformers 5's in-memory name
    w = {n: t.take(f"{b}.attention.{n}_proj.weight") for n in "qkvo"}
    out = {
        **under("norm1", linear(t, f"{b}.norm1")),
        "attn.qkv.weight": torch.cat([w["q"], w["k"], w["v"]]),
        "attn.proj.weight": w["o"],
        "attn.proj.bias": _bias(t, f"{b}.attention.o_proj", bool(c["proj_bias"]), w["o"]),
        "gamma_1": t.take(f"{b}.layer_scale1.lambda1"),
        **under("norm2", linear(t, f"{b}.norm2")),
        "gamma_2": t.take(f"{b}.layer_scale2.lambda1"),
    }
    if c["query_bias"] or c["value_bias"]:
        out["attn.q_bias"] = _bias(t, f"{b}.attention.q_proj", bool(c["query_bias"]), w["q"])
        out["attn.v_bias"] = _bias(t, f"{b}.attention.v_proj", bool(c["value_bias"]), w["v"])
    if c["key_bias"]:
        k_bias = t.take(f"{b}.attention.k_proj.bias")
        if k_bias.numel() and k_bias.abs().max() > 0:
            raise ValueError(
                f"{t.prefix}{b}.attention.k_proj.bias is not zero: timm's EVA attention has no key bias"
            )
    mlp = {
        n: t.take(f"{b}.mlp.{n}_proj.weight")
        for n in (("gate", "up", "down") if c["use_gated_mlp"] else ("up", "down"))
    }
    names = {"gate": "fc1_g", "up": "fc1_x" if c["use_gated_mlp"] else "fc1", "down": "fc2"}
    for n, weight in mlp.items():
        out[f"mlp.{names[n]}.weight"] = weight
        out[f"mlp.{names[n]}.bias"] = _bias(t, f"{b}.mlp.{n}_proj", bool(c["mlp_bias"]), weight)
    return under(f"blocks.{i}", out)


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    c = {**DEFAULTS, **config}
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.weight", "DINOv3 ViT"))
    out = {"cls_token": t.take("embeddings.cls_token")}
    if int(c["num_register_tokens"]):
        out["reg_token"] = t.take("embeddings.register_tokens")
    out.update(under("patch_embed.proj", linear(t, "embeddings.patch_embeddings")))
    for i in range(int(c["num_hidden_layers"])):
        out.update(_layer(t, i, c))
    out.update(under("norm", linear(t, "norm")))
    unused = (f"{t.prefix}embeddings.mask_token", f"{t.prefix}embeddings.register_tokens")
    return t.finish(out, lambda k: k in unused)
