"""transformers' Swin (v1) as timm's `SwinTransformer`.

Where the two libraries meet: q, k, v fused into ``qkv``, relative-position tables indexed alike; patch
merging ends transformers' stage i and starts timm's stage i+1, both concatenating the 2×2 neighbours in
the same order, so the reduction weight is taken as it is.

Refused by `timm_arch`, with the reason: absolute position embeddings, an activation other than exact GELU,
a ``layer_norm_eps`` other than 1e-5 (transformers keeps 1e-5 in its patch norms, timm has one eps for all),
a stage grid that needs padding AND has shifted windows (transformers pads before the cyclic shift, timm
after it), and a stage grid smaller than the window (transformers 5's own forward fails there). No Hub
Swin has either at its own image size (224/4 = 56, 28, 14, 7 with window 7; 384 with 12; 192 with 6).

Dropped and reported: the SimMIM ``decoder`` and mask token, a backbone's ``hidden_states_norms``.
"""

from __future__ import annotations

import torch

from ._common import Taker, base_prefix, head_classes, legacy_names, pair, size_arg

MODEL_TYPES: tuple[str, ...] = ("swin",)

# config.json values a checkpoint may omit: transformers' SwinConfig defaults
_DEFAULTS = dict(
    image_size=224,
    patch_size=4,
    num_channels=3,
    embed_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    window_size=7,
    mlp_ratio=4.0,
    qkv_bias=True,
    hidden_act="gelu",
    use_absolute_embeddings=False,
    layer_norm_eps=1e-5,
)

_FIXED_EPS = 1e-5  # transformers' patch-embedding and patch-merging norms; timm's nn.LayerNorm default

# timm's registered Swin v1 sizes, by (embed_dim, depths): the name only picks the pretrained_cfg family
_NAMES = {
    (96, (2, 2, 6, 2)): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2)): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2)): "swin_base_patch4_window7_224",
    (192, (2, 2, 18, 2)): "swin_large_patch4_window7_224",
}

# transformers 5's in-memory names -> the names save_pretrained writes (a live model's state_dict())
_RENAMES = (
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.relative_position_bias\.relative_position_", ".attention.self.relative_position_"),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)

_TASK_HEADS = ("decoder.", "hidden_states_norms.")


def _check_windows(grid: tuple[int, int], depths: tuple[int, ...], window: int) -> None:
    """Refuse a config whose windows the two libraries would lay out differently (see the module docstring);
    ``grid``: the first stage's token grid."""
    for stage, depth in enumerate(depths):
        if stage:  # merging halves the grid, padding odd sizes up (both libraries)
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        if min(grid) < window:
            raise ValueError(
                f"swin: stage {stage} has a {grid[0]}x{grid[1]} grid, smaller than window_size={window}; "
                "transformers 5 keeps that stage's relative-position table at the configured window and its "
                "own forward fails there, so there is no computation to match"
            )
        # (window, shift) in transformers: a grid whose smaller side fits one window gets one square window of
        # that side and no shift; in timm: clamped side by side, no shift along a side the window covers
        one = min(grid) <= window
        hf = ((min(grid),) * 2, (0, 0)) if one else ((window, window), (window // 2,) * 2)
        win = tuple(min(r, window) for r in grid)
        tm = win, tuple(0 if r <= w else window // 2 for r, w in zip(grid, win))
        if (depth > 1 and hf != tm) or hf[0] != tm[0]:
            raise ValueError(
                f"swin: stage {stage} has a {grid[0]}x{grid[1]} grid: transformers uses {hf[0]} windows "
                f"shifted by {hf[1]}, timm {tm[0]} shifted by {tm[1]}"
            )
        (wh, ww), shift = hf
        if depth > 1 and any(shift) and (grid[0] % wh or grid[1] % ww):
            raise ValueError(
                f"swin: stage {stage} has a {grid[0]}x{grid[1]} grid with shifted {window}-windows that needs "
                "padding; transformers pads before the cyclic shift and timm after it, so the two compute "
                "different windows (use an image_size whose stage grids are multiples of window_size)"
            )


def timm_arch(config: dict) -> tuple[str, dict]:
    c = {**_DEFAULTS, **config}
    if c["use_absolute_embeddings"]:
        raise ValueError("swin: use_absolute_embeddings=true; timm's Swin has no absolute position embedding")
    if c["hidden_act"] != "gelu":
        raise ValueError(f"swin: hidden_act={c['hidden_act']!r}; timm's Swin has exact GELU only")
    if float(c["layer_norm_eps"]) != _FIXED_EPS:
        raise ValueError(
            f"swin: layer_norm_eps={c['layer_norm_eps']}; transformers keeps 1e-5 in its patch-embedding and "
            "merging norms, and timm's Swin has one eps for every norm"
        )
    depths, heads = tuple(int(d) for d in c["depths"]), tuple(int(h) for h in c["num_heads"])
    patch = pair(c["patch_size"])
    img = pair(c["image_size"])
    window = int(c["window_size"])
    _check_windows((img[0] // patch[0], img[1] // patch[1]), depths, window)
    embed_dim = int(c["embed_dim"])
    kwargs = dict(
        img_size=size_arg(c["image_size"]),
        patch_size=size_arg(c["patch_size"]),
        in_chans=int(c["num_channels"]),
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_ratio=float(c["mlp_ratio"]),
        qkv_bias=bool(c["qkv_bias"]),
        global_pool="avg",
        num_classes=head_classes(config),
    )
    return _NAMES.get((embed_dim, depths), "swin_tiny_patch4_window7_224"), kwargs


def timm_weights(weights: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(timm `SwinTransformer` state dict, keys dropped on purpose) of a base or task model, any names."""
    _, kwargs = timm_arch(config)
    weights = legacy_names(weights, _RENAMES)
    t = Taker(weights, base_prefix(weights, "embeddings.patch_embeddings.projection.weight", "Swin"))
    out: dict[str, torch.Tensor] = {}

    def linear(t_name: str, h_name: str, taker: Taker = t, bias: bool = True) -> None:
        for p in ("weight", "bias") if bias else ("weight",):
            out[f"{t_name}.{p}"] = taker.take(f"{h_name}.{p}")

    linear("patch_embed.proj", "embeddings.patch_embeddings.projection")
    linear("patch_embed.norm", "embeddings.norm")
    depths = kwargs["depths"]
    for i, depth in enumerate(depths):
        for j in range(depth):
            hf, tm = f"encoder.layers.{i}.blocks.{j}.", f"layers.{i}.blocks.{j}."
            qkv = [f"{hf}attention.self.{n}" for n in ("query", "key", "value")]
            out[tm + "attn.qkv.weight"] = t.cat(*(n + ".weight" for n in qkv))
            if kwargs["qkv_bias"]:
                out[tm + "attn.qkv.bias"] = t.cat(*(n + ".bias" for n in qkv))
            out[tm + "attn.relative_position_bias_table"] = t.take(
                hf + "attention.self.relative_position_bias_table"
            )
            linear(tm + "attn.proj", hf + "attention.output.dense")
            linear(tm + "norm1", hf + "layernorm_before")
            linear(tm + "norm2", hf + "layernorm_after")
            linear(tm + "mlp.fc1", hf + "intermediate.dense")
            linear(tm + "mlp.fc2", hf + "output.dense")
        if i + 1 < len(depths):  # the merge that ends stage i starts timm's stage i+1
            linear(f"layers.{i + 1}.downsample.norm", f"encoder.layers.{i}.downsample.norm")
            linear(
                f"layers.{i + 1}.downsample.reduction", f"encoder.layers.{i}.downsample.reduction", bias=False
            )
    linear("norm", "layernorm")
    if kwargs["num_classes"]:
        linear("head.fc", "classifier", taker=t.at(""))
    mask, heads = f"{t.prefix}embeddings.mask_token", () if not t.prefix else _TASK_HEADS
    out, dropped = t.finish(out, lambda k: k == mask or k.startswith(heads) or k.endswith(_INDEX))
    return out, [k for k in dropped if not k.endswith(_INDEX)]  # recomputed by timm, not dropped


_INDEX = "relative_position_index"  # a buffer older checkpoints carry; timm rebuilds it from the window
