"""Checkpoints saved by transformers (a ``save_pretrained`` folder, a Hub repo) as the timm model that
computes the same thing, one module per ``model_type``; transformers itself is never imported.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import timm
import torch

from ...errors import InputError
from ...speak import debug
from ..load_errors import TeacherLoadError
from ._common import architectures, pair

__all__ = [
    "MODULES",
    "REGISTRY",
    "TransformersTeacher",
    "describe",
    "is_transformers_config",
    "supported_types",
    "unreadable_config",
]


# Every module of this package not starting with "_" maps a transformers model-type group (MODEL_TYPES,
# timm_arch, timm_weights): adding a type is adding its file.
MODULES: tuple[ModuleType, ...] = tuple(
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
    if not info.name.startswith("_")
)
REGISTRY: dict[str, ModuleType] = {t: m for m in MODULES for t in m.MODEL_TYPES}

# PIL's resampling codes (what image processors store as ``resample``) -> timm's interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def supported_types() -> list[str]:
    return sorted(REGISTRY)


def is_transformers_config(config: dict[str, Any]) -> bool:
    """A transformers config.json: a ``model_type`` and no timm ``architecture``."""
    return "architecture" not in config and "model_type" in config


@dataclass
class TransformersTeacher:
    """What a transformers config.json resolves to: the timm model that computes the same thing, its
    pretrained config (preprocessing, licence, head), and the weight mapping."""

    model_type: str
    saved_as: str | None  # the transformers class the weights were saved from (ViTForImageClassification)
    architecture: str
    model_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]
    convert: Callable[[dict[str, torch.Tensor], str], tuple[dict[str, torch.Tensor], list[str]]]
    # construction arguments no JSON value names (a LayerNorm eps timm has no name for): the teacher is
    # built with them; students (mirrored or converted) take timm's default, which their exports rebuild
    unrecorded_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source_format(self) -> str:
        return f"transformers {self.model_type}" + (f" ({self.saved_as})" if self.saved_as else "")


def unreadable_config(where: str, found: str) -> InputError:
    """The one message for a config.json attnxfer cannot read: where, what it found, what is supported."""
    return InputError(
        f"{where}: {found}; attnxfer reads timm's format (config.json with 'architecture', as "
        f"timm.models.save_for_hf and `attnxfer export` write it) or a transformers checkpoint of model_type "
        f"{', '.join(supported_types())}"
    )


def describe(
    config: dict[str, Any],
    *,
    where: str,
    preprocessor: dict[str, Any] | None = None,
    license: str | None = None,
) -> TransformersTeacher:
    """The timm model, pretrained config and weight mapping for transformers' ``config`` (read from
    ``where``); a config the module cannot map is an `InputError`."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        raise unreadable_config(
            where, f"transformers model_type {model_type!r} is not one attnxfer can map to timm"
        )
    module = REGISTRY[model_type]
    try:
        arch, kwargs = module.timm_arch(config)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise InputError(
            f"{where}: transformers {model_type} config cannot be mapped to timm: {detail}"
        ) from None
    cfg = _pretrained_cfg(arch, kwargs, config, preprocessor, license, where)
    if preprocessor is None and (guess := getattr(module, "GUESSED_MEAN_STD", None)):  # the family's own
        cfg["mean"], cfg["std"] = guess
    unrecorded = []  # construction arguments no JSON value names
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except TypeError:
            unrecorded.append(k)

    def convert(
        weights: dict[str, torch.Tensor], weights_file: str
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        try:
            mapped, dropped = module.timm_weights(weights, config)
            _check_shapes(mapped, arch, kwargs)
        except ValueError as e:
            raise TeacherLoadError(
                f"{weights_file}: the weights do not fit the transformers {model_type} model "
                f"{where} describes: {e}"
            ) from None
        return mapped, dropped

    saved = architectures(config)
    return TransformersTeacher(
        model_type=model_type,
        saved_as=saved[0] if saved else None,
        architecture=arch,
        model_args=kwargs,
        pretrained_cfg=cfg,
        convert=convert,
        unrecorded_args=tuple(unrecorded),
    )


def _check_shapes(mapped: dict[str, torch.Tensor], arch: str, kwargs: dict[str, Any]) -> None:
    """The mapped weights against the timm model the config builds (on the meta device): a key or shape that
    differs is named before timm's loader could resample or reject it on its own."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in timm.create_model(arch, **kwargs).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mapped.items()}
    problems = []
    if missing := sorted(set(expected) - set(got)):
        problems.append(f"timm's {arch} also needs {missing[:6]}")
    if extra := sorted(set(got) - set(expected)):
        problems.append(f"timm's {arch} has no {extra[:6]}")
    if shapes := [
        f"{k} {got[k]} (config: {expected[k]})" for k in expected if k in got and got[k] != expected[k]
    ]:
        problems.append(f"shapes differ: {', '.join(shapes[:6])}" + (" ..." if len(shapes) > 6 else ""))
    if problems:
        raise ValueError("; ".join(problems))


def _pretrained_cfg(
    arch: str,
    kwargs: dict[str, Any],
    config: dict[str, Any],
    preprocessor: dict[str, Any] | None,
    license: str | None,
    where: str,
) -> dict[str, Any]:
    """timm's pretrained config for the mapped model: the preprocessing ``preprocessor_config.json`` states
    (else timm's defaults for ``arch``, which the record marks as guessed)."""
    base = timm.models.get_pretrained_cfg(arch)
    base = base.to_dict() if base is not None else {}
    # the size the model is built for; a family built without one (PVTv2) is fed the config's image_size
    img = pair(kwargs.get("img_size", config.get("image_size", base.get("input_size", (3, 224, 224))[-1])))
    num_classes = int(kwargs.get("num_classes", 0))
    cfg: dict[str, Any] = dict(
        architecture=arch,
        num_classes=num_classes,
        input_size=(int(kwargs.get("in_chans", 3)), *img),
        # timm's own answer for the family (PVTv2 takes any size its strides divide, and no img_size)
        fixed_input_size=bool(base.get("fixed_input_size", True))
        and not kwargs.get("dynamic_img_size", False),
        first_conv=base.get("first_conv", "patch_embed.proj"),
        classifier=base.get("classifier", "head"),
        mean=tuple(base.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(base.get("std", (0.5, 0.5, 0.5))),
        interpolation=base.get("interpolation", "bicubic"),
        crop_pct=base.get("crop_pct", 1.0),
        crop_mode=base.get("crop_mode", "center"),
        license=license,
    )
    if preprocessor is not None:  # else timm's defaults for arch: `load_teacher` says they are a guess
        cfg.update(_preprocessing(preprocessor))
        crop = cfg.pop("crop_size", None)
        if crop is not None and tuple(crop) != img:
            debug(
                f"{where}: transformers' preprocessing crops {crop[0]}x{crop[1]}, the model is built for "
                f"{img[0]}x{img[1]} as its config says (set data.img_size / img_size= to run it at the crop "
                "size; position embeddings are then resampled)"
            )
    labels = config.get("id2label")
    if num_classes and isinstance(labels, dict) and len(labels) == num_classes:
        cfg["label_names"] = [str(labels.get(str(i), labels.get(i, i))) for i in range(num_classes)]
    return cfg


def _size(value: Any) -> dict[str, int]:
    """An image processor's ``size`` / ``crop_size``: an int, or a dict of height/width/shortest_edge."""
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if isinstance(v, (int, float))}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    return {"int": int(value)} if isinstance(value, (int, float)) else {}


def _preprocessing(pp: dict[str, Any]) -> dict[str, Any]:
    """timm's pretrained-config keys for what an image processor does (eval): normalisation, resampling,
    and the resize + crop as timm's ``crop_pct`` / ``crop_mode``."""
    out: dict[str, Any] = {}
    if pp.get("do_normalize", True):
        for key, name in (("mean", "image_mean"), ("std", "image_std")):
            if isinstance(pp.get(name), (list, tuple)):
                out[key] = tuple(float(v) for v in pp[name])
    else:  # the model reads pixels in [0, 1] as they are: not timm's default statistics for the arch
        out.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    resample = pp.get("resample")
    if isinstance(resample, int) and resample in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[resample]
    elif isinstance(resample, str) and resample.lower() in _RESAMPLE.values():
        out["interpolation"] = resample.lower()
    size, crop = _size(pp.get("size")), _size(pp.get("crop_size")) if pp.get("do_center_crop") else {}
    if crop:
        side = crop.get("height", crop.get("int"))
        short = size.get("shortest_edge", size.get("int", size.get("height")))
        if side and short:
            # a resize to height x width ignores the aspect ratio (DeiT's 256x256, then 224): timm's squash
            mode = "squash" if "height" in size else "center"
            out.update(crop_pct=side / short, crop_mode=mode, crop_size=(side, crop.get("width", side)))
    elif "height" in size or "int" in size:  # resized to exactly height x width, aspect ratio not kept
        side = size.get("height", size.get("int"))
        out.update(crop_pct=1.0, crop_mode="squash", crop_size=(side, size.get("width", side)))
    elif "shortest_edge" in size:
        out.update(crop_pct=1.0, crop_mode="center")
    return out
