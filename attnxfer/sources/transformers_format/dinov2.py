"""transformers' DINOv2 (with and without registers) as timm builds the ``vit_*_dinov2`` models.

Registers carry no position embedding in transformers; timm's register models add position embeddings
to the patches only (``no_embed_class``), so the class token's is folded into the class token (the sum
transformers computes in every forward). ``Dinov2ForImageClassification``'s classifier reads the class
token next to the mean of the patch tokens, a head timm's ViT does not have: it is dropped (features intact).
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    Taker,
    activation,
    base_prefix,
    fused_qkv,
    linear,
    mlp_ratio,
    norm_layer,
    pair,
    timm_name,
    under,
    vit_dims,
)

MODEL_TYPES: tuple[str, ...] = ("dinov2", "dinov2_with_registers")

DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=224,
    patch_size=14,
    num_channels=3,
    qkv_bias=True,
    layerscale_value=1.0,
    use_swiglu_ffn=False,
)


def _registers(config: dict[str, Any]) -> int:
    return int(config.get("num_register_tokens", 4)) if config["model_type"] == "dinov2_with_registers" else 0


def timm_arch(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    c = {**DEFAULTS, **config}
    dim, regs, swiglu = int(c["hidden_size"]), _registers(c), bool(c["use_swiglu_ffn"])
    kwargs: dict[str, Any] = dict(
        **vit_dims(c),
        qkv_bias=bool(c["qkv_bias"]),
        init_values=float(c["layerscale_value"]),
        reg_tokens=regs,
        no_embed_class=regs > 0,
        num_classes=0,
        global_pool="token",
        **norm_layer(c["layer_norm_eps"]),
    )
    reg = "_reg4" if regs else ""
    if swiglu:  # timm's giant DINOv2 entrypoints bring the packed SwiGLU (SiLU, as transformers hard-codes)
        # transformers' SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of 8
        hidden = int(c["hidden_size"] * c["mlp_ratio"])
        kwargs["mlp_ratio"] = mlp_ratio(2 * ((int(hidden * 2 / 3) + 7) // 8 * 8), dim)
        return f"vit_giant_patch14{reg}_dinov2", kwargs
    kwargs.update(mlp_ratio=mlp_ratio(int(dim * c["mlp_ratio"]), dim), act_layer=activation(c))
    default = f"vit_small_patch14{reg}_dinov2"
    return timm_name(
        "vit_{size}_patch{p}{reg}_dinov2", default, dim, p=pair(c["patch_size"])[0], reg=reg
    ), kwargs


def _layer(t: Taker, i: int, c: dict[str, Any]) -> dict[str, torch.Tensor]:
    """timm's ``blocks.i``: legacy names (``attention.attention.query``, ``mlp.weights_in``) or in-memory
    ones (``attention.q_proj``, ``mlp.gate_proj``)."""
    b = f"encoder.layer.{i}"
    qkv = tuple(
        (f"{b}.attention.attention.{o}", f"{b}.attention.{n}_proj")
        for o, n in (("query", "q"), ("key", "k"), ("value", "v"))
    )
    out = {
        **under("norm1", linear(t, f"{b}.norm1")),
        **under("attn", fused_qkv(t, qkv, (bool(c["qkv_bias"]),) * 3)),
        **under("attn.proj", linear(t, f"{b}.attention.output.dense", f"{b}.attention.o_proj")),
        "ls1.gamma": t.take(f"{b}.layer_scale1.lambda1"),
        **under("norm2", linear(t, f"{b}.norm2")),
        "ls2.gamma": t.take(f"{b}.layer_scale2.lambda1"),
    }
    if not c["use_swiglu_ffn"]:
        out.update(under("mlp.fc1", linear(t, f"{b}.mlp.fc1")))
        out.update(under("mlp.fc2", linear(t, f"{b}.mlp.fc2")))
    elif t.has(f"{b}.mlp.weights_in.weight"):  # gate and up packed, gate first: timm's packed layout
        out.update(under("mlp.fc1", linear(t, f"{b}.mlp.weights_in")))
        out.update(under("mlp.fc2", linear(t, f"{b}.mlp.weights_out")))
    else:
        gate, up = linear(t, f"{b}.mlp.gate_proj"), linear(t, f"{b}.mlp.up_proj")
        out.update({f"mlp.fc1.{k}": torch.cat([gate[k], up[k]]) for k in gate})
        out.update(under("mlp.fc2", linear(t, f"{b}.mlp.down_proj")))
    return under(f"blocks.{i}", out)


def timm_weights(
    weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    c = {**DEFAULTS, **config}
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.projection.weight", "DINOv2"))
    cls, pos = t.take("embeddings.cls_token"), t.take("embeddings.position_embeddings")
    out = under("patch_embed.proj", linear(t, "embeddings.patch_embeddings.projection"))
    if _registers(c):
        out["reg_token"] = t.take("embeddings.register_tokens")
        if cls.dim() == pos.dim() == 3:  # both there (else finish() names what is missing)
            cls, pos = cls + pos[:, :1], pos[:, 1:]
    out.update(cls_token=cls, pos_embed=pos)
    for i in range(int(c["num_hidden_layers"])):
        out.update(_layer(t, i, c))
    out.update(under("norm", linear(t, "layernorm")))
    return t.finish(out, lambda k: k in (f"{t.prefix}embeddings.mask_token",) or k.startswith("classifier."))
