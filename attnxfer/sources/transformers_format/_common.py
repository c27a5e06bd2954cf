"""What the transformers-format modules share: a config.json's values as timm's arguments, and a `Taker`
that takes a state dict apart so that every key is mapped, dropped on purpose, or reported."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import timm
import torch
from timm.layers import LayerNorm

# transformers' hidden_act (activations.ACT2CLS) -> timm's act_layer name for the same function.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# embed_dim -> the size word timm's ViT names use (only to pick a familiar name; kwargs set every dim).
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1152: "so400m", 1280: "huge", 1536: "giant"}

#: ViT-Base's sizes, what transformers' ViT, DeiT, CLIP, SigLIP and BEiT config classes default to; each module's
#: defaults add its class's own (activation, LayerNorm eps, patch size, ...)
VIT_BASE: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    num_channels=3,
)


def activation(config: dict[str, Any]) -> str:
    """timm's name for the config's activation; one transformers has that timm does not is a ValueError."""
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} has no timm counterpart (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def norm_layer(eps: float, timm_default: float = 1e-6) -> dict[str, Any]:
    """``norm_layer`` kwargs for LayerNorms with ``eps``: none where the timm architecture's own eps is it.

    transformers' ViT family normalises with eps 1e-12, timm's with 1e-6: a relative difference of order
    1e-6/variance on early layers' small activations, so the teacher keeps the config's. No JSON value names
    such a norm, so students take timm's default, the eps their export rebuilds (`attnxfer.models.norm_eps`).
    """
    eps = float(eps)
    return {} if eps == timm_default else {"norm_layer": functools.partial(LayerNorm, eps=eps)}


def pair(value: Any) -> tuple[int, int]:
    """An image or patch size from a config (an int, or [h, w])."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected a size or [height, width], got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def size_arg(value: Any) -> int | tuple[int, int]:
    """A size as timm's constructors take it: an int when square, else (h, w)."""
    h, w = pair(value)
    return h if h == w else (h, w)


def vit_dims(c: dict[str, Any]) -> dict[str, Any]:
    """timm's ViT arguments for the sizes every transformers ViT-style config names alike (image and patch
    size, channels, width, depth, heads); the MLP width and the rest are each model's own."""
    img, patch = pair(c["image_size"]), pair(c["patch_size"])
    return dict(
        img_size=img[0] if img[0] == img[1] else list(img),
        patch_size=patch[0] if patch[0] == patch[1] else list(patch),
        in_chans=int(c["num_channels"]),
        embed_dim=int(c["hidden_size"]),
        depth=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
    )


def vision_tower(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A CLIP-style config's vision tower over its class's ``defaults``: a whole model's ``vision_config``,
    a ``*_vision_model``'s own values."""
    vision = config if config["model_type"].endswith("_vision_model") else config.get("vision_config", {})
    return {**defaults, **vision}


def mlp_ratio(hidden: int, dim: int) -> float:
    """The ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` is exactly ``hidden``."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def timm_name(template: str, default: str, dim: int, **fields: Any) -> str:
    """A registered timm name for these dims when timm has one, else ``default``: the kwargs override all of
    its defaults, so the name is what the record shows, not what is built."""
    size = _SIZES.get(dim)
    if size is not None:
        name = template.format(size=size, **fields)
        if timm.is_model(name):
            return name
    return default


def architectures(config: dict[str, Any]) -> list[str]:
    """The transformers classes config.json says the weights were saved from (``ViTForImageClassification``)."""
    names = config.get("architectures") or []
    return [str(n) for n in names] if isinstance(names, list) else [str(names)]


def has_head(config: dict[str, Any], suffixes: Iterable[str] = ("ForImageClassification",)) -> bool:
    """Whether the saved class carries a classifier (by its name in ``architectures``)."""
    return any(a.endswith(tuple(suffixes)) for a in architectures(config))


def head_classes(config: dict[str, Any], suffixes: Iterable[str] = ("ForImageClassification",)) -> int:
    """Classes of the classifier the saved class carries: ``num_labels``, else the size of ``id2label``
    (transformers' default is 2); 0 for a class without one (a base model's config carries labels too)."""
    if not has_head(config, suffixes):
        return 0
    labels = config.get("id2label")
    return int(config.get("num_labels") or (len(labels) if labels else 2))


def legacy_names(
    weights: dict[str, torch.Tensor], renames: Iterable[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Names as ``save_pretrained`` writes them, whichever spelling came in: transformers 5 renamed modules
    in memory (``q_proj``, ``layers.N``, ...) but still saves the old names, so a live model's state dict
    differs. ``renames``: (regex, replacement) pairs from the new spelling to the saved one, in order."""
    rules = [(re.compile(a), b) for a, b in renames]
    out = {}
    for k, v in weights.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def base_prefix(weights: dict[str, torch.Tensor], anchor: str, what: str) -> str:
    """The prefix the encoder's keys carry (``vit.`` in a ViTForImageClassification, ``vision_model.`` in a
    CLIPModel, ``""`` in a bare model), found from the one key that ends with ``anchor``."""
    found = sorted({k[: -len(anchor)] for k in weights if k == anchor or k.endswith("." + anchor)})
    if not found:
        sample = sorted(weights)[:6]
        raise ValueError(f"no {anchor!r} among the weights (is this a {what} checkpoint? keys: {sample} ...)")
    if len(found) > 1:
        raise ValueError(f"{anchor!r} appears under several prefixes {found}: which one is the {what}?")
    return found[0]


class Taker:
    """Takes a transformers state dict apart: every key is taken (under the base prefix, by its saved name or
    an alias), dropped by a rule (and reported), or left over (an error)."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str = ""):
        self.weights = weights
        self.prefix = prefix
        self.taken: set[str] = set()
        self.missing: list[str] = []

    def at(self, prefix: str) -> Taker:
        """The same state dict read under another prefix (a head beside the encoder), sharing the records."""
        other = Taker(self.weights, prefix)
        other.taken, other.missing = self.taken, self.missing
        return other

    def has(self, name: str, *aliases: str) -> bool:
        return any(self.prefix + n in self.weights for n in (name, *aliases))

    def cat(self, *names: str) -> torch.Tensor:
        """The tensors under ``names`` concatenated (one fused projection from several); a part that is
        missing is recorded as such, parts that do not fit together are a ValueError naming their shapes."""
        missing = len(self.missing)
        parts = [self.take(n) for n in names]
        if len(self.missing) > missing:  # finish() names them
            return torch.empty(0)
        try:
            return torch.cat(parts)
        except RuntimeError:
            shapes = ", ".join(f"{self.prefix}{n} {tuple(p.shape)}" for n, p in zip(names, parts))
            raise ValueError(f"cannot fuse {shapes} into one projection") from None

    def take(self, name: str, *aliases: str) -> torch.Tensor:
        """The tensor under ``prefix + name`` (or an alias); a missing one is recorded and a placeholder
        returned, so that one error lists everything missing."""
        for n in (name, *aliases):
            key = self.prefix + n
            if key in self.weights:
                self.taken.add(key)
                return self.weights[key]
        self.missing.append(self.prefix + name)
        return torch.empty(0)

    def finish(
        self, out: dict[str, torch.Tensor], drop: Callable[[str], bool] = lambda k: False
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """``(out, dropped keys)``; missing keys, or keys neither taken nor dropped, are one ValueError."""
        left = sorted(k for k in self.weights if k not in self.taken)
        dropped = [k for k in left if drop(k)]
        unexpected = [k for k in left if not drop(k)]
        problems = []
        if self.missing:
            problems.append(f"missing {len(self.missing)} keys: {_summary(self.missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys: {_summary(unexpected)}")
        if problems:
            raise ValueError("; ".join(problems))
        return out, dropped


def _summary(keys: list[str], limit: int = 6) -> str:
    """The first keys, with layer numbers folded (``encoder.layer.*.attention...``) so a list stays short."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", k) for k in keys))
    shown = folded[:limit]
    return ", ".join(shown) + (f", ... ({len(folded) - limit} more)" if len(folded) > limit else "")


def fused_qkv(
    t: Taker, names: tuple[tuple[str, ...], ...], bias: tuple[bool, bool, bool]
) -> dict[str, torch.Tensor]:
    """timm's fused ``qkv`` from transformers' q, k and v projections (each named by its alternatives:
    legacy name first, in-memory name next); a bias the config leaves out is zeros."""
    weights = [t.take(*(f"{n}.weight" for n in alts)) for alts in names]
    out = {"qkv.weight": torch.cat(weights)}
    if any(bias):
        out["qkv.bias"] = torch.cat(
            [
                t.take(*(f"{n}.bias" for n in alts)) if b else torch.zeros(w.shape[0], dtype=w.dtype)
                for alts, b, w in zip(names, bias, weights)
            ]
        )
    return out


def linear(t: Taker, *names: str) -> dict[str, torch.Tensor]:
    """``weight`` and ``bias`` of one nn.Linear / LayerNorm / conv under the first of ``names`` present."""
    return {p: t.take(*(f"{n}.{p}" for n in names)) for p in ("weight", "bias")}


def under(prefix: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``parts`` with ``prefix.`` before every key."""
    return {f"{prefix}.{k}": v for k, v in parts.items()}


def vit_layer(t: Taker, i: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """timm's ``blocks.i`` from transformers' ViT layer (ViT, DeiT, ViT-MAE, I-JEPA): legacy names
    ``encoder.layer.i.attention.attention.query`` ..., in-memory ``layers.i.attention.q_proj`` ...."""
    old, new = f"encoder.layer.{i}", f"layers.{i}"
    qkv = tuple(
        (f"{old}.attention.attention.{o}", f"{new}.attention.{n}_proj")
        for o, n in (("query", "q"), ("key", "k"), ("value", "v"))
    )
    out = {
        **under("norm1", linear(t, f"{old}.layernorm_before", f"{new}.layernorm_before")),
        **under("attn", fused_qkv(t, qkv, (qkv_bias,) * 3)),
        **under("attn.proj", linear(t, f"{old}.attention.output.dense", f"{new}.attention.o_proj")),
        **under("norm2", linear(t, f"{old}.layernorm_after", f"{new}.layernorm_after")),
        **under("mlp.fc1", linear(t, f"{old}.intermediate.dense", f"{new}.mlp.fc1")),
        **under("mlp.fc2", linear(t, f"{old}.output.dense", f"{new}.mlp.fc2")),
    }
    return under(f"blocks.{i}", out)


def clip_layer(t: Taker, i: int) -> dict[str, torch.Tensor]:
    """timm's ``blocks.i`` from transformers' CLIP / SigLIP encoder layer (``encoder.layers.i.self_attn``)."""
    base = f"encoder.layers.{i}"
    qkv = tuple((f"{base}.self_attn.{n}_proj",) for n in "qkv")
    out = {
        **under("norm1", linear(t, f"{base}.layer_norm1")),
        **under("attn", fused_qkv(t, qkv, (True,) * 3)),
        **under("attn.proj", linear(t, f"{base}.self_attn.out_proj")),
        **under("norm2", linear(t, f"{base}.layer_norm2")),
        **under("mlp.fc1", linear(t, f"{base}.mlp.fc1")),
        **under("mlp.fc2", linear(t, f"{base}.mlp.fc2")),
    }
    return under(f"blocks.{i}", out)
