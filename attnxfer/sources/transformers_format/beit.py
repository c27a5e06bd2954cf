"""transformers' BEiT and data2vec-vision (BEiT's architecture, another pretraining) as timm's `Beit`.

Where the two libraries meet:

* q, k, v: three linears without key bias → timm's fused ``qkv`` plus ``q_bias``/``v_bias``;
* relative-position tables, per layer or shared, are indexed alike (3 extra rows for the class token);
* layer scale ``lambda_1/2`` → ``gamma_1/2`` (``layer_scale_init_value`` ≤ 0: none, timm's ``init_values=0``);
* ``use_mean_pooling`` → ``global_pool='avg'`` with ``fc_norm``; a base model saved without its pooler
  gets the LayerNorm transformers itself gives a missing pooler (weight 1, bias 0), on the pooled vector only.

Dropped and reported: the mask token and the pretraining / segmentation heads; ``relative_position_index``
buffers are recomputed by timm from the window size.
"""

from __future__ import annotations

import torch

from ._common import VIT_BASE, Taker, base_prefix, head_classes, legacy_names, norm_layer, size_arg

MODEL_TYPES: tuple[str, ...] = ("beit", "data2vec-vision")

# config.json values a checkpoint may omit: the transformers config classes' defaults
_DEFAULTS = dict(
    VIT_BASE,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    patch_size=16,
    use_absolute_position_embeddings=False,
    use_relative_position_bias=False,
    use_shared_relative_position_bias=False,
    layer_scale_init_value=0.1,
    use_mean_pooling=True,
)

# transformers 5's in-memory names -> the names save_pretrained writes (a live model's state_dict())
_RENAMES = (
    (r"(^|\.)layers\.(\d+)\.attention\.q_proj\.", r"\1encoder.layer.\2.attention.attention.query."),
    (r"(^|\.)layers\.(\d+)\.attention\.k_proj\.", r"\1encoder.layer.\2.attention.attention.key."),
    (r"(^|\.)layers\.(\d+)\.attention\.v_proj\.", r"\1encoder.layer.\2.attention.attention.value."),
    (r"(^|\.)layers\.(\d+)\.attention\.o_proj\.", r"\1encoder.layer.\2.attention.output.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc1\.", r"\1encoder.layer.\2.intermediate.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc2\.", r"\1encoder.layer.\2.output.dense."),
    (
        r"(^|\.)layers\.(\d+)\.relative_position_bias\.",
        r"\1encoder.layer.\2.attention.attention.relative_position_bias.",
    ),
    (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"(^|\.)shared_position_bias\.", r"\1encoder.relative_position_bias."),
)

# a task model's own weights that a teacher does not use: masked-image-modelling and segmentation heads
_TASK_HEADS = ("lm_head.", "layernorm.", "decode_head.", "auxiliary_head.", "fpn1.", "fpn2.", "fpn.")


def _settings(config: dict) -> dict:
    c = {**_DEFAULTS, **config}
    kind = c.get("model_type", "beit")
    dim, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c["hidden_act"] != "gelu":
        raise ValueError(f"{kind}: hidden_act={c['hidden_act']!r}; timm's Beit has exact GELU only")
    if c.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"{kind}: head_dim={c['head_dim']} differs from hidden_size/num_attention_heads")
    mlp_ratio = int(c["intermediate_size"]) / dim
    if int(dim * mlp_ratio) != int(c["intermediate_size"]):
        raise ValueError(
            f"{kind}: intermediate_size={c['intermediate_size']} is no ratio of hidden_size timm rebuilds"
        )
    return dict(c, dim=dim, heads=heads, mlp_ratio=mlp_ratio)


def timm_arch(config: dict) -> tuple[str, dict]:
    c = _settings(config)
    mean_pool = bool(c["use_mean_pooling"])
    scale = float(c["layer_scale_init_value"])
    kwargs = dict(
        img_size=size_arg(c["image_size"]),
        patch_size=size_arg(c["patch_size"]),
        in_chans=int(c["num_channels"]),
        embed_dim=c["dim"],
        depth=int(c["num_hidden_layers"]),
        num_heads=c["heads"],
        mlp_ratio=c["mlp_ratio"],
        qkv_bias=True,
        use_abs_pos_emb=bool(c["use_absolute_position_embeddings"]),
        use_rel_pos_bias=bool(c["use_relative_position_bias"]),
        use_shared_rel_pos_bias=bool(c["use_shared_relative_position_bias"]),
        init_values=scale if scale > 0 else 0.0,  # timm drops None kwargs: 0.0 builds no gamma
        global_pool="avg" if mean_pool else "token",
        use_fc_norm=mean_pool,
        num_classes=head_classes(config),
        **norm_layer(c["layer_norm_eps"]),  # none at timm's 1e-6, what Beit builds without one
    )
    arch = "beit_large_patch16_224" if c["dim"] == 1024 else "beit_base_patch16_224"
    return arch, kwargs


def timm_weights(weights: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm `Beit` state dict, keys dropped on purpose) of a base or task model, saved or in-memory names."""
    _, kwargs = timm_arch(config)
    weights = legacy_names(weights, _RENAMES)
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.projection.weight", "BEiT"))
    out = {
        "cls_token": t.take("embeddings.cls_token"),
        "patch_embed.proj.weight": t.take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": t.take("embeddings.patch_embeddings.projection.bias"),
    }
    if kwargs["use_abs_pos_emb"]:
        out["pos_embed"] = t.take("embeddings.position_embeddings")
    if kwargs["use_shared_rel_pos_bias"]:
        out["rel_pos_bias.relative_position_bias_table"] = t.take(
            "encoder.relative_position_bias.relative_position_bias_table"
        )
    for i in range(kwargs["depth"]):
        out.update(_block(t, i, kwargs))
    for p in ("weight", "bias"):
        if kwargs["use_fc_norm"]:
            # the pooler's LayerNorm, or the one transformers initialises for a pooler the folder lacks
            fill = torch.ones if p == "weight" else torch.zeros
            found = t.has(f"pooler.layernorm.{p}")
            out[f"fc_norm.{p}"] = t.take(f"pooler.layernorm.{p}") if found else fill(kwargs["embed_dim"])
        else:
            out[f"norm.{p}"] = t.take(f"layernorm.{p}")
        if kwargs["num_classes"]:
            out[f"head.{p}"] = t.at("").take(f"classifier.{p}")
    mask, heads = f"{t.prefix}embeddings.mask_token", () if not t.prefix else _TASK_HEADS
    out, dropped = t.finish(out, lambda k: k == mask or k.startswith(heads) or k.endswith(_INDEX))
    return out, [k for k in dropped if not k.endswith(_INDEX)]  # recomputed by timm, not dropped


_INDEX = "relative_position_index"  # a buffer older checkpoints carry; timm rebuilds it from the window


def _block(t: Taker, i: int, kwargs: dict) -> dict[str, torch.Tensor]:
    hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
    attn = hf + "attention.attention."
    out = {
        tm + "attn.qkv.weight": t.cat(attn + "query.weight", attn + "key.weight", attn + "value.weight"),
        tm + "attn.q_bias": t.take(attn + "query.bias"),
        tm + "attn.v_bias": t.take(attn + "value.bias"),
    }
    if kwargs["use_rel_pos_bias"]:
        out[tm + "attn.relative_position_bias_table"] = t.take(
            attn + "relative_position_bias.relative_position_bias_table"
        )
    pairs = {
        "attn.proj": "attention.output.dense",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for t_name, h_name in pairs.items():
        for p in ("weight", "bias"):
            out[f"{tm}{t_name}.{p}"] = t.take(f"{hf}{h_name}.{p}")
    if kwargs["init_values"]:
        out[tm + "gamma_1"] = t.take(hf + "lambda_1")
        out[tm + "gamma_2"] = t.take(hf + "lambda_2")
    return out
