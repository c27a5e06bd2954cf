"""transformers' PVTv2 as timm's `PyramidVisionTransformerV2`.

timm fixes the patch embeddings' kernels/strides at 7/4 then 3/2 (PVTv2's own), so other ``patch_sizes`` /
``strides`` are refused; ``key`` and ``value`` fuse into ``kv``; ``linear_attention`` is timm's
``linear=True`` (pooled to 7×7, a 1×1 ``sr``, and the same extra ReLU in the MLP).

LayerNorm eps: transformers uses ``layer_norm_eps`` (1e-6) for every norm; timm, like the original PVTv2
code, keeps 1e-5 in the patch-embedding and spatial-reduction norms. Each of those norms reads a
convolution's output and nothing else, and a LayerNorm ignores the scale of its input except through
eps: LN_ε(c·y) = LN_{ε/c²}(y). So the feeding conv's weight and bias are multiplied by
c = sqrt(1e-5 / layer_norm_eps), and timm's 1e-5 norm computes exactly transformers' one (a converted
student starts from these scaled weights and computes the same). The block and stage norms take
``layer_norm_eps`` directly (as ``norm_layer`` when it is not timm's 1e-6).
"""

from __future__ import annotations

import math

import torch

from ._common import Taker, base_prefix, head_classes, norm_layer

MODEL_TYPES: tuple[str, ...] = ("pvt_v2",)

# config.json values a checkpoint may omit: transformers' PvtV2Config defaults
_DEFAULTS = dict(
    num_channels=3,
    depths=(2, 2, 2, 2),
    sr_ratios=(8, 4, 2, 1),
    hidden_sizes=(32, 64, 160, 256),
    patch_sizes=(7, 3, 3, 3),
    strides=(4, 2, 2, 2),
    num_attention_heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    qkv_bias=True,
    linear_attention=False,
)

_TIMM_PATCHES = ((7, 4), (3, 2))  # timm's (kernel, stride): the first stage's, then every later one's
_CONV_NORM_EPS = 1e-5  # nn.LayerNorm's default: timm's patch-embedding and spatial-reduction norms

# timm's registered sizes, by (hidden sizes, depths, linear): the name only picks the pretrained_cfg family
_NAMES = {
    ((32, 64, 160, 256), (2, 2, 2, 2), False): "pvt_v2_b0",
    ((64, 128, 320, 512), (2, 2, 2, 2), False): "pvt_v2_b1",
    ((64, 128, 320, 512), (3, 4, 6, 3), False): "pvt_v2_b2",
    ((64, 128, 320, 512), (3, 4, 18, 3), False): "pvt_v2_b3",
    ((64, 128, 320, 512), (3, 8, 27, 3), False): "pvt_v2_b4",
    ((64, 128, 320, 512), (3, 6, 40, 3), False): "pvt_v2_b5",
    ((64, 128, 320, 512), (3, 4, 6, 3), True): "pvt_v2_b2_li",
}


def _ints(v) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def timm_arch(config: dict) -> tuple[str, dict]:
    c = {**_DEFAULTS, **config}
    depths, dims = _ints(c["depths"]), _ints(c["hidden_sizes"])
    if int(c.get("num_encoder_blocks", len(depths))) != len(depths):
        raise ValueError(f"pvt_v2: num_encoder_blocks={c['num_encoder_blocks']} but {len(depths)} depths")
    if c["hidden_act"] != "gelu":
        raise ValueError(f"pvt_v2: hidden_act={c['hidden_act']!r}; timm's PVTv2 has exact GELU only")
    stems = list(zip(_ints(c["patch_sizes"]), _ints(c["strides"])))
    wanted = [_TIMM_PATCHES[min(i, 1)] for i in range(len(depths))]
    if stems != wanted:
        raise ValueError(
            f"pvt_v2: patch_sizes/strides {stems}; timm's PVTv2 builds kernel/stride {wanted} (7/4, then 3/2)"
        )
    linear = bool(c["linear_attention"])
    kwargs = dict(
        in_chans=int(c["num_channels"]),
        depths=depths,
        embed_dims=dims,
        num_heads=_ints(c["num_attention_heads"]),
        sr_ratios=_ints(c["sr_ratios"]),
        mlp_ratios=tuple(float(r) for r in c["mlp_ratios"]),
        qkv_bias=bool(c["qkv_bias"]),
        linear=linear,
        global_pool="avg",
        num_classes=head_classes(config),
        **norm_layer(c["layer_norm_eps"]),  # the block and stage norms; none at timm's 1e-6
    )
    return _NAMES.get((dims, depths, linear), "pvt_v2_b0"), kwargs


def timm_weights(weights: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm `PyramidVisionTransformerV2` state dict, keys dropped on purpose: none) of a base or task model."""
    _, kwargs = timm_arch(config)
    t = Taker(weights, base_prefix(weights, "encoder.layers.0.patch_embedding.proj.weight", "PVTv2"))
    # the conv in front of each eps-1e-5 norm, scaled so that the norm computes transformers' eps
    scale = math.sqrt(_CONV_NORM_EPS / float({**_DEFAULTS, **config}["layer_norm_eps"]))
    out: dict[str, torch.Tensor] = {}

    def take(
        t_name: str, h_name: str, params=("weight", "bias"), factor: float = 1.0, taker: Taker = t
    ) -> None:
        for p in params:
            v = taker.take(f"{h_name}.{p}")
            out[f"{t_name}.{p}"] = v * factor if factor != 1.0 else v

    linear = kwargs["linear"]
    bias = ("weight", "bias") if kwargs["qkv_bias"] else ("weight",)
    for i, depth in enumerate(kwargs["depths"]):
        hf = f"encoder.layers.{i}."
        stem = "patch_embed" if i == 0 else f"stages.{i}.downsample"
        take(f"{stem}.proj", hf + "patch_embedding.proj", factor=scale)
        take(f"{stem}.norm", hf + "patch_embedding.layer_norm")
        for j in range(depth):
            hb, tb = f"{hf}blocks.{j}.", f"stages.{i}.blocks.{j}."
            take(tb + "norm1", hb + "layer_norm_1")
            take(tb + "attn.q", hb + "attention.query", params=bias)
            for p in bias:
                out[f"{tb}attn.kv.{p}"] = t.cat(f"{hb}attention.key.{p}", f"{hb}attention.value.{p}")
            take(tb + "attn.proj", hb + "attention.proj")
            if linear or kwargs["sr_ratios"][i] > 1:
                take(tb + "attn.sr", hb + "attention.spatial_reduction", factor=scale)
                take(tb + "attn.norm", hb + "attention.layer_norm")
            take(tb + "norm2", hb + "layer_norm_2")
            take(tb + "mlp.fc1", hb + "mlp.dense1")
            take(tb + "mlp.dwconv", hb + "mlp.dwconv.dwconv")
            take(tb + "mlp.fc2", hb + "mlp.dense2")
        take(f"stages.{i}.norm", hf + "layer_norm")
    if kwargs["num_classes"]:
        take("head", "classifier", taker=t.at(""))
    return t.finish(out)
