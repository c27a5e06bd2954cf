"""Typed run configuration: dataclasses, loaded from YAML, with dotted ``key=value`` overrides.

Unknown keys and wrong types are `ConfigError`s that name the nearest valid key,
so a typo never silently trains the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "AugConfig",
    "CheckpointConfig",
    "ConfigError",
    "ConvertConfig",
    "DataConfig",
    "EMAConfig",
    "LogConfig",
    "MAEConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TeacherConfig",
    "TrainConfig",
    "TransferConfig",
    "apply_overrides",
    "dump_config",
    "list_recipes",
    "load_config",
    "parse_overrides",
    "resolve_recipe",
    "to_dict",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and what to write instead."""


@dataclass
class ModelConfig:
    """The student. ``name`` is a timm architecture; ``kwargs`` go to timm.create_model."""

    name: str = "vit_micro_patch4_28"
    num_classes: int | None = None  # default: the dataset's
    drop_path_rate: float = 0.1
    mirror_teacher: bool = True  # copy the teacher's architectural choices (tokens, norms, ...)
    init: str | None = None  # fine-tune: start from these weights (timm name with tag, hf-hub:, local-dir:)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """The pretrained teacher: timm name, ``hf-hub:ORG/NAME``, ``local-dir:PATH``, a file or an attnxfer run dir."""

    spec: str | None = None
    arch: str | None = None  # architecture for a bare weights file
    revision: str | None = None
    cache_dir: str | None = None
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or fp32 / bf16 / fp16


@dataclass
class TransferConfig:
    """How attention moves from teacher to student (see attnxfer.transfer.plan)."""

    mode: str = "distill"
    end_layer: int = 0  # the paper's meaning: 0 = all, -k = all but the last k
    layers: list[int] | None = None  # explicit student layers (wins over end_layer)
    atd_weight: float = 1.0
    share_drop_path: bool = False  # False: teacher deterministic (default); True: the paper's shared masks
    logit_distill: float = 0.0  # weight of KL(teacher logits || student logits) beside the task loss
    logit_temperature: float = 1.0  # softening temperature T of that KL (scaled by T^2)


@dataclass
class DataConfig:
    dataset: str = "animal_mnist"  # animal_mnist | folder | synthetic
    root: str | None = None  # for folder datasets: ROOT/train/<class>/..., ROOT/val/<class>/...
    img_size: int | None = None  # default: the student's
    in_chans: int | None = None
    mean: list[float] | None = None  # default: the teacher's (pretrained cfg), else the dataset's
    std: list[float] | None = None
    batch_size: int = 128  # per process
    eval_batch_size: int | None = None
    num_workers: int = 0
    pin_memory: bool = False
    synthetic_length: int = 512
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugConfig:
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    reprob: float = 0.0  # random erasing (folder datasets)
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1 (folder datasets)


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute; default blr * global_batch / 256
    blr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None  # e.g. 0.75; None or 1 = off
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float | None = None
    accum_steps: int = 1


@dataclass
class ScheduleConfig:
    epochs: int = 10
    warmup_epochs: float = 1.0
    max_steps: int | None = None  # stop early after this many optimiser steps (tests, smoke runs)


@dataclass
class EMAConfig:
    decay: float | None = None  # e.g. 0.9999; None = no EMA


@dataclass
class LogConfig:
    every_steps: int = 20
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    every_minutes: float | None = None
    every_epoch: bool = True
    keep_last: int = 3
    resume: str = "auto"  # auto | none | PATH of a checkpoint


@dataclass
class ConvertConfig:
    """`attnxfer convert`: the efficient-attention student and stage 1 (layer-parallel attention transfer).

    Stage 2 (end-to-end fine-tuning) is an ordinary training run of the converted student, so its recipe
    is the usual sections: schedule (epochs / max_steps), optim (lr, ...), aug, ema, and transfer
    (``logit_distill`` / ``logit_temperature`` for logit distillation; ``mode: distill`` with
    ``atd_weight`` for attention distillation; ``mode: none`` without it).
    """

    attention: str | list[str] = "hedgehog"  # a registered zoo attention, or one name per block
    attention_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {num_features: 128, window_size: 4}
    stage1_steps: int = 200  # 0 = skip stage 1 (the ablation)
    stage1_lr: float = 1e-2
    stage1_batch_size: int | None = None  # default: data.batch_size
    stage1_warmup_steps: int = 10
    stage1_weight_decay: float = 0.0
    stage1_clip_grad: float | None = 1.0
    stage1_train: str = "new"  # new (only parameters without a softmax counterpart) | qk | new+qk
    map_loss: str = "auto"  # auto (by map kind: ce / mse / output) | ce | mse | output
    output_mse: float = 0.0  # weight of the attention-output MSE added to stage 1's map loss
    agreement_batches: int = 4  # validation batches for the per-layer map agreement
    speed_batch_size: int = 64
    speed_repeats: int = 20


@dataclass
class MAEConfig:
    """`attnxfer pretrain`: masked-autoencoder pre-training of the ``model`` section's ViT; labels unused.

    The encoder is the model (its head is not built); the decoder is light and is dropped at export.
    """

    mask_ratio: float = 0.75  # share of patches hidden from the encoder, in [0, 1)
    decoder_dim: int = 64  # decoder width (divisible by 4 and by decoder_heads)
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    norm_pix: bool = True  # targets normalised per patch (mean 0, variance 1), as MAE
    pictures: int = 8  # validation images in the reconstruction picture at each evaluation (0 = none)
    export: bool = True  # write the encoder to RUN_DIR/export (timm layout: a local-dir: teacher) at the end


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; fp32 | bf16 | fp16
    deterministic: bool = False
    eval_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)

    def __str__(self) -> str:
        return dump_config(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with dotted keys set (values already typed or YAML strings)."""
        return apply_overrides(self, overrides)


# -- (de)serialisation ---------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ``X | None`` (types.UnionType, what the annotations say since ruff's pyupgrade) and ``Optional[X]``
_UNION = (Union, types.UnionType)
_FRIENDLY = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _type_name(tp: Any) -> str:
    """How a user would say the type: 'a number or null', 'a list of integers'."""
    if typing.get_origin(tp) in _UNION:
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) in (list, list):
        return "a list"
    if typing.get_origin(tp) in (dict, dict):
        return "a mapping"
    return _FRIENDLY.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else is guessed."""
    origin = typing.get_origin(tp)
    if origin in _UNION:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (list, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} (write e.g. {key}=[1,2])")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: Sequence[str], prefix: str) -> ConfigError:
    full = [prefix + v for v in valid]
    close = difflib.get_close_matches(prefix + key, full, n=1, cutoff=0.5) or difflib.get_close_matches(
        key, list(valid), n=1, cutoff=0.5
    )
    hint = (
        f"; did you mean {close[0] if close[0].startswith(prefix) else prefix + close[0]!r}?" if close else ""
    )
    return ConfigError(
        f"unknown config key {prefix + key!r}{hint} (valid under "
        f"{prefix.rstrip('.') or 'the top level'}: {', '.join(valid)})"
    )


def _merge(obj: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(type(obj))
    changes = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(str(key), list(types), prefix)
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _merge(getattr(obj, key), value, f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, tp, prefix + key)
    return dataclasses.replace(obj, **changes)


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["optim.lr=1e-3", "transfer.layers=[0,1]"]`` -> ``{"optim.lr": "1e-3", ...}`` (raw strings)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. transfer.mode=copy)")
        key, raw = item.split("=", 1)
        out[key.strip()] = raw
    return out


def _parse_value(key: str, raw: str) -> Any:
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={raw!r}: value is not valid YAML ({e.problem})") from None


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return nested


def apply_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """Set dotted keys; string values of non-string fields are parsed as YAML (``[0,1]``, ``null``, ``true``)."""
    types_cache: dict[Any, dict[str, Any]] = {}
    parsed = {
        key: (
            _parse_value(key, value)
            if isinstance(value, str) and not _is_str_field(type(cfg), key, types_cache)
            else value
        )
        for key, value in overrides.items()
    }
    return _merge(cfg, _nest(parsed))


def _is_str_field(cls, dotted: str, cache) -> bool:
    node = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        types = cache.setdefault(node, _field_types(node))
        if part not in types:
            return False
        node = types[part]
    return node is str


RECIPES = Path(__file__).resolve().parent.parent / "cfgs"


def list_recipes() -> list[str]:
    """Built-in recipe names (``demo/copy``, ``paper/vit_large_distill``, ...)."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A config file path, or the name of a built-in recipe (``paper/vit_large_copy``)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (RECIPES / p, RECIPES / p.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(str(path), list_recipes(), n=1)
    hint = f"; did you mean the built-in recipe {close[0]!r}?" if close else ""
    raise ConfigError(
        f"config file {str(p)!r} does not exist{hint} (built-in recipes: {', '.join(list_recipes())})"
    )


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: TrainConfig | None = None
) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides."""
    cfg = base or TrainConfig()
    if path is not None:
        p = resolve_recipe(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        cfg = _merge(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, parse_overrides(overrides))
    return cfg
