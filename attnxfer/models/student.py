"""Students shaped like their teacher: attention transfer is reported to fail when the student lacks the
teacher's native components, so `student_like` rebuilds the teacher's timm architecture and checks every
trait carried over; `student_spec` / `student_from_spec` turn a student into the JSON that rebuilds it."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import timm
import torch.nn as nn
from timm.layers import Attention, LayerScale, to_2tuple
from timm.models import get_model_args
from timm.models.vision_transformer import VisionTransformer

from ..errors import InputError
from ..plugins import ATTENTION_GROUP, entry_point_origin, missing_plugin
from .attention import SOFTMAX, TransferAttention, attention_layers, attention_name_of, family_of
from .attention.adapters import require_model
from .attention.registry import get_attention_class
from .efficient.hierarchical import hierarchical_slots, is_hierarchical, swap_hierarchical
from .efficient.swap import flat_blocks, swap_attentions
from .image_input import image_input

# Construction arguments that are training or runtime settings, not architecture.
_NOT_ARCHITECTURE = (
    "attn_layer",
    "pretrained_model_args",
    "pretrained_strict",
    "device",
    "dtype",
    "drop_rate",
    "drop_path_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_block_rate",
    "features_only",
    "out_indices",
    "scriptable",
    "exportable",
    "no_jit",
)
# pretrained_cfg entries a student inherits: how its inputs are prepared, and the licence terms.
_DATA_CFG_KEYS = (
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "first_conv",
    "classifier",
    "license",
)
# Which traits an override of a construction argument is allowed to change.
_OVERRIDE_TRAITS = {
    "mlp_ratio": ("mlp_hidden_ratio",),
    "init_values": ("layer_scale", "layer_scale_init"),
    "pos_embed": ("pos_embed",),
    "norm_layer": ("norm_layer", "norm_eps"),
    "act_layer": ("act_layer",),
    "mlp_layer": ("mlp_layer", "mlp_hidden_ratio"),
    "block_fn": ("block",),
    "global_pool": ("global_pool", "fc_norm", "final_norm"),
    "fc_norm": ("fc_norm", "final_norm"),
    "final_norm": ("final_norm", "fc_norm"),
    "embed_dim": ("embed_dim", "head_dim"),
    "num_heads": ("num_heads", "head_dim"),
    "attn_layer": ("attention",),
}


# VisionTransformer arguments that map one-to-one onto a trait, in the order exports record them.
_TRAIT_ARGS = (
    *("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "class_token", "reg_tokens"),
    *("no_embed_class", "pos_embed", "pre_norm", "final_norm", "fc_norm", "global_pool", "scale_mlp_norm"),
    *("dynamic_img_size", "dynamic_img_pad", "qkv_bias", "qk_norm", "scale_attn_norm", "proj_bias"),
    *("init_values", "mlp_ratio"),
)


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def attention_layout(model: nn.Module) -> list[str]:
    """Per-block registered attention names (``"softmax"`` for timm's attention, transfer-aware or not)."""
    return [attention_name_of(attn) for _, attn in attention_layers(model)]


def _attention_summary(model: nn.Module) -> str | list[str]:
    """One name when every block agrees, else the per-block list."""
    names = attention_layout(model)
    return names[0] if len(set(names)) == 1 else names


def per_block_attention(attention: str | list[str], depth: int) -> list[str]:
    """A spec's ``attention`` (one name, or one per block) as one name per block."""
    return [attention] * depth if isinstance(attention, str) else list(attention)


def vit_traits(model: nn.Module) -> dict[str, Any]:
    """The architectural choices of a timm VisionTransformer, read from its modules (not its config)."""
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer")
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    inputs = image_input(model)
    dim = model.embed_dim
    qkv = getattr(attn, "qkv", None)
    hidden = mlp.fc2.in_features if hasattr(mlp, "fc2") else None
    return dict(
        img_size=inputs.img_size,
        patch_size=inputs.patch_size,
        in_chans=inputs.in_chans,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=getattr(attn, "num_heads", None),
        head_dim=getattr(attn, "head_dim", None),
        mlp_hidden_ratio=round(hidden / dim, 4) if hidden else None,
        mlp_layer=type(mlp).__name__,
        block=type(blk).__name__,
        qkv_bias=(getattr(qkv, "bias", None) is not None) if qkv is not None else None,
        qk_norm=(not _is_identity(attn.q_norm)) if hasattr(attn, "q_norm") else None,
        scale_attn_norm=(not _is_identity(attn.norm)) if hasattr(attn, "norm") else None,
        scale_mlp_norm=not _is_identity(getattr(mlp, "norm", None)),
        proj_bias=(attn.proj.bias is not None) if hasattr(attn, "proj") else None,
        class_token=model.cls_token is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        no_embed_class=bool(getattr(model, "no_embed_class", False)),
        pos_embed=getattr(model, "pos_embed", None) is not None,
        layer_scale=isinstance(blk.ls1, LayerScale),
        layer_scale_init=getattr(blk.ls1, "init_values", None),
        pre_norm=not _is_identity(getattr(model, "norm_pre", None)),
        final_norm=not (_is_identity(model.norm) and _is_identity(getattr(model, "fc_norm", None))),
        fc_norm=not _is_identity(getattr(model, "fc_norm", None)),
        global_pool=model.global_pool,
        norm_layer=type(blk.norm1).__name__,
        norm_eps=getattr(blk.norm1, "eps", None),
        act_layer=type(mlp.act).__name__ if hasattr(mlp, "act") else None,
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        dynamic_img_pad=bool(getattr(model.patch_embed, "dynamic_img_pad", False)),
        num_classes=model.num_classes,
        attention=_attention_summary(model),
    )


def timm_args_from_traits(t: dict[str, Any]) -> dict[str, Any]:
    """VisionTransformer arguments that reproduce the traits that map one-to-one onto an argument."""
    special = {
        "img_size": list(t["img_size"]) if t["img_size"] else None,
        "patch_size": list(t["patch_size"]),
        "pos_embed": "learn" if t["pos_embed"] else "none",
        "init_values": t["layer_scale_init"] if t["layer_scale"] else None,
        "mlp_ratio": (t["mlp_hidden_ratio"] or None) if t["mlp_layer"] == "Mlp" else None,
    }
    args = {k: special[k] if k in special else t[k] for k in _TRAIT_ARGS}
    return {k: v for k, v in args.items() if v is not None}


def _student_cfg(
    teacher_cfg: dict[str, Any], arch: str, in_chans: int, img_size, num_classes: int
) -> dict[str, Any]:
    """The student's pretrained_cfg: the teacher's preprocessing and licence, no weight source."""
    cfg = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in teacher_cfg.items()
        if k in _DATA_CFG_KEYS and v is not None
    }
    cfg.update(
        architecture=arch,
        num_classes=num_classes,
        fixed_input_size=bool(teacher_cfg.get("fixed_input_size", True)),
    )
    if img_size:
        cfg["input_size"] = (in_chans, *to_2tuple(img_size))  # timm takes 32 or (32, 32)
    elif teacher_cfg.get("input_size"):  # a family built without a size argument (PVTv2): the teacher's size
        cfg["input_size"] = (in_chans, *tuple(teacher_cfg["input_size"])[-2:])
    return cfg


def _check_traits(student: nn.Module, teacher_traits: dict[str, Any], changed: Iterable[str]) -> None:
    changed = set(changed)
    allowed = changed.union(*(_OVERRIDE_TRAITS.get(arg, ()) for arg in changed))
    got = vit_traits(student)
    diffs = {
        k: (teacher_traits[k], got[k])
        for k in teacher_traits
        if k not in allowed
        and teacher_traits[k] != got[k]
        and teacher_traits[k] is not None
        and got[k] is not None
    }
    if diffs:
        lines = ", ".join(f"{k}: teacher {t!r} vs student {s!r}" for k, (t, s) in diffs.items())
        raise InputError(
            f"student_like: the student does not reproduce the teacher's {lines}. Pass the "
            "matching timm argument as an override (e.g. init_values=..., norm_layer=...) "
            "or report this as a bug"
        )


def student_like(
    teacher: nn.Module,
    *,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | list[int] | None = None,
    mlp_ratio: float | None = None,
    num_classes: int | None = None,
    drop_path_rate: float = 0.1,
    attn_layer: type[nn.Module] = TransferAttention,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialised student with every architectural choice of the teacher (`vit_traits`) and its
    preprocessing and licence, but for the sizes given and the timm arguments in ``overrides``."""
    sizes = dict(
        depth=depth, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes
    )
    requested = {k: v for k, v in sizes.items() if v is not None}
    require_model(teacher)
    # a hierarchical family's num_heads may be a list, one count per stage: each must be positive
    counts = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in requested.items()}
    for k, c in counts.items():  # else a comparison with a str (embed_dim="64") inside the check below
        kind, said = (Real, "a number") if k == "mlp_ratio" else (Integral, "an int")
        if any(isinstance(x, bool) or not isinstance(x, kind) for x in c):
            said += " (or a list of ints, one per stage)" if k == "num_heads" else ""
            key = "model.num_classes" if k == "num_classes" else f"model.kwargs.{k}"
            raise InputError(f"student_like: {k} must be {said}, got {requested[k]!r} ({key} in a config)")
    if bad := {
        k: requested[k] for k, c in counts.items() if any(x < 0 or (x == 0 and k != "num_classes") for x in c)
    }:
        raise InputError(
            f"student_like: sizes must be positive (num_classes=0: no head), got {bad} (model.kwargs in a config)"
        )
    if not isinstance(teacher, VisionTransformer):
        return _family_student(teacher, requested, drop_path_rate, attn_layer, overrides)
    t = vit_traits(teacher)
    arch = (getattr(teacher, "pretrained_cfg", None) or {}).get("architecture") or "vit_base_patch16_224"
    args = _vit_student_args(teacher, t, requested, overrides)
    cfg = _student_cfg(
        getattr(teacher, "pretrained_cfg", {}) or {},
        arch,
        args.get("in_chans", t["in_chans"]),
        args.get("img_size"),
        args["num_classes"],
    )
    student = timm.create_model(
        arch,
        pretrained=False,
        pretrained_cfg=cfg,
        attn_layer=attn_layer,
        drop_path_rate=drop_path_rate,
        **args,
    )
    changed = (
        set(requested)
        | set(overrides)
        | ({"attn_layer"} if attn_layer is not TransferAttention else set())
        # arguments the teacher was built with that its recorded ones cannot carry (a transformers
        # teacher's LayerNorm eps): the student takes timm's default there
        | set(getattr(teacher, "_teacher_only_args", ()))
    )
    _check_traits(student, t, changed)
    return student


def _vit_student_args(
    teacher: nn.Module, traits: dict[str, Any], requested: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """timm arguments of a ViT student: the teacher's recorded ones and traits, then what the caller asks."""
    recorded = getattr(teacher, "_model_args", {})  # timm's create_model kwargs: the architecture's only
    args = {
        **{k: v for k, v in recorded.items() if k not in _NOT_ARCHITECTURE and not k.endswith("_drop_rate")},
        **timm_args_from_traits(traits),
        "num_classes": traits["num_classes"],
        **requested,
        **overrides,
    }
    width, heads = args["embed_dim"], args["num_heads"]
    if width % heads:
        given = {**requested, **overrides}
        whose = {k: "" if k in given else " (the teacher's)" for k in ("embed_dim", "num_heads")}
        raise InputError(
            f"student_like: embed_dim={width}{whose['embed_dim']} is not divisible by "
            f"num_heads={heads}{whose['num_heads']}; set embed_dim to a multiple of {heads}, or num_heads to "
            f"one of {[h for h in range(1, min(width, 64) + 1) if width % h == 0]} "
            "(model.kwargs.embed_dim / model.kwargs.num_heads in a config)"
        )
    return args


def _family_student(
    teacher: nn.Module,
    requested: dict[str, Any],
    drop_path_rate: float,
    attn_layer: type[nn.Module],
    overrides: dict[str, Any],
) -> nn.Module:
    """A fresh student of a non-ViT teacher's own family (EVA, BEiT, ...), from timm's recorded arguments."""
    arch = (getattr(teacher, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise InputError(
            f"student_like: a {type(teacher).__name__} teacher without a timm architecture name "
            "(pretrained_cfg['architecture']) cannot be mirrored; build the student with timm.create_model"
        )
    if attn_layer is not TransferAttention:
        raise ValueError(
            f"student_like: attn_layer applies to VisionTransformer students; a {type(teacher).__name__} "
            f"teacher's student is a fresh {arch} (or a plain ViT built with timm.create_model)"
        )
    args = {**get_model_args(teacher), "num_classes": teacher.num_classes}
    args = {k: v for k, v in args.items() if k not in _NOT_ARCHITECTURE and not k.endswith("_drop_rate")}
    args.update(requested, **overrides)
    cfg = _student_cfg(
        getattr(teacher, "pretrained_cfg", {}) or {},
        arch,
        args.get("in_chans", 3),
        (args["img_size"],) * 2 if isinstance(args.get("img_size"), int) else args.get("img_size"),
        args["num_classes"],
    )
    return timm.create_model(
        arch, pretrained=False, pretrained_cfg=cfg, drop_path_rate=drop_path_rate, **args
    )


def _json_value(key: str, v: Any) -> Any:
    if isinstance(v, tuple):
        v = list(v)
    try:
        json.dumps(v)
    except TypeError:
        raise ValueError(
            f"student_spec: construction argument {key}={v!r} is not JSON; build the student with a "
            "timm string name for it (e.g. norm_layer='layernorm', act_layer='gelu')"
        ) from None
    if isinstance(v, float) and not math.isfinite(v):
        raise InputError(f"student_spec: {key}={v} is not finite")
    return v


def student_spec(student: nn.Module) -> dict[str, Any]:
    """JSON that rebuilds ``student`` (`student_from_spec`): timm name and arguments, attention."""
    cfg = getattr(student, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError(
            "student_spec: the model has no pretrained_cfg['architecture']; build it with "
            "timm.create_model / student_like"
        )
    args = {k: v for k, v in get_model_args(student).items() if k not in _NOT_ARCHITECTURE}
    data_cfg = {
        k: _json_value(k, cfg[k])
        for k in (*_DATA_CFG_KEYS, "input_size", "fixed_input_size")
        if cfg.get(k) is not None
    }
    # the size the model was built for, read from its patch embedding: timm keeps a pretrained config's
    # input_size when create_model(..., img_size=...) builds another size (a SAM at 48 px still says 1024), and
    # whoever loads the export runs at the size recorded
    with contextlib.suppress(InputError):
        found = image_input(student)
        if found.img_size is not None:
            data_cfg["input_size"] = [found.in_chans, *found.img_size]
    spec = {
        "architecture": arch,
        "model_args": {k: _json_value(k, v) for k, v in sorted(args.items())},
        "attention": _attention_summary(student),
        "num_classes": int(student.num_classes),
        "pretrained_cfg": data_cfg,
    }
    if any(name != SOFTMAX for name in attention_layout(student)):
        # what rebuilds each zoo attention (window sizes, feature counts, ...), block by block
        layers = [attn for _, attn in attention_layers(student)]
        spec["attention_options"] = [attn.options() if hasattr(attn, "options") else {} for attn in layers]
        # an installed package's attention (its registered class: a slot's subclass is a family's): the
        # package and version to install where the student is loaded without it, as run.json's plugins say
        classes = {next((c for c in type(a).__mro__ if "attention_name" in vars(c)), type(a)) for a in layers}
        if sources := {
            c.attention_name: origin
            for c in classes
            if (origin := entry_point_origin(ATTENTION_GROUP, c.__module__))
        }:
            spec["attention_sources"] = sources
    return spec


def student_from_spec(
    spec: dict[str, Any], *, attn_layer: type[nn.Module] | None = None, **overrides: Any
) -> nn.Module:
    """Rebuild a student (random weights) from `student_spec` output."""
    kind = spec.get("attention", SOFTMAX)
    if attn_layer is None and kind != SOFTMAX:
        for name in per_block_attention(kind, 1):
            try:
                get_attention_class(name)
            except KeyError:  # registered where it was trained (a fork's file, a script's import), not here
                sources = spec.get("attention_sources")
                source = sources.get(name) if isinstance(sources, dict) else None
                if said := missing_plugin(name, source):
                    raise InputError(f"the student's attention {said}") from None
                # a spec written before it recorded the version: "package P, module M"
                source = source if isinstance(source, str) else None
                raise InputError(
                    f"the student's attention {name!r}{f' ({source})' if source else ''} is not registered "
                    "here: import the module that registers it (@register_attention) before loading the student, "
                    f"or install the package that names it in an '{ATTENTION_GROUP}' entry point"
                ) from None
        model = student_from_spec(dict(spec, attention=SOFTMAX), attn_layer=Attention, **overrides)
        options = spec.get("attention_options")
        try:
            if is_hierarchical(model):  # PVTv2 / Swin: one attention per layer over the stages
                names = per_block_attention(kind, len(hierarchical_slots(model)))
                return swap_hierarchical(model, names, options)
            return swap_attentions(model, per_block_attention(kind, len(flat_blocks(model))), options)
        except TypeError as e:  # the options its attention's code took when it was saved, not this code's
            listed = options if isinstance(options, list) else [options]  # one per block, or one for all
            if not any(listed):
                raise
            said = [o for i, o in enumerate(listed) if o and o not in listed[:i]]
            raise InputError(
                f"the student's recorded attention options {', '.join(map(str, said))} do not build {kind!r} as "
                f"it is defined here ({e}): it was saved by other code of that attention; load it with that code"
            ) from None
    if attn_layer is None:
        attn_layer = TransferAttention
    cfg = dict(
        spec.get("pretrained_cfg", {}),
        architecture=spec["architecture"],
        num_classes=spec.get("num_classes", spec["model_args"].get("num_classes", 0)),
    )
    for k in ("input_size", "mean", "std"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    args = {**spec["model_args"], **overrides}
    try:
        return timm.create_model(
            spec["architecture"], pretrained=False, pretrained_cfg=cfg, attn_layer=attn_layer, **args
        )
    except TypeError as e:
        if "attn_layer" not in str(e) or attn_layer not in (TransferAttention, Attention):
            raise
        # another family (EVA, BEiT, ...): timm's own attention classes, which its adapters make
        # transfer-aware when a model walk meets them
        return timm.create_model(spec["architecture"], pretrained=False, pretrained_cfg=cfg, **args)


def student_shape(model: nn.Module) -> dict[str, Any]:
    """What the model is (family, widths, blocks, heads, patch, size), read off its modules, not its name."""
    blocks = flat_blocks(model)
    family = family_of(model)
    shape: dict[str, Any] = {
        "family": family.title.split("/")[0].strip() if family is not None else type(model).__name__
    }
    if blocks is not None:
        width = getattr(model, "embed_dim", None)
        heads = (int(m.num_heads) for m in blocks.modules() if isinstance(getattr(m, "num_heads", None), int))
        shape.update(
            width=int(width) if isinstance(width, int) else getattr(model, "num_features", None),
            blocks=len(blocks),
            heads=next(heads, None),
        )
    else:
        stages = [int(f["num_chs"]) for f in getattr(model, "feature_info", None) or [] if "num_chs" in f]
        shape.update(widths=stages or None, blocks=len(hierarchical_slots(model)) or None)
    with contextlib.suppress(InputError):
        found = image_input(model)
        shape.update(patch=list(found.patch_size), in_chans=found.in_chans)
        if found.img_size is not None:
            shape["img_size"] = list(found.img_size)
    return {k: v for k, v in shape.items() if v is not None}
