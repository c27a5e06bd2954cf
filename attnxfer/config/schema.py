"""Typed run configuration: dataclasses, loaded from YAML, with dotted ``key=value`` overrides.

Unknown keys and wrong types are `ConfigError`s that name the nearest valid key,
so a typo never silently trains the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import InputError
from ..run_layout import RUN_CONFIG, RUN_DIR_MARKERS

__all__ = [
    "RANGES",
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
    "Range",
    "ScheduleConfig",
    "SearchConfig",
    "TeacherConfig",
    "TrainConfig",
    "TransferConfig",
    "apply_overrides",
    "config_changes",
    "config_keys",
    "describe_changes",
    "dump_config",
    "list_recipes",
    "load_config",
    "parse_overrides",
    "recipe_chain",
    "resolve_recipe",
    "to_dict",
    "validate_config",
]


class ConfigError(InputError):
    """A config that cannot be used; the message says which key and what to write instead."""


@dataclass
class ModelConfig:
    """The student. ``name`` is a timm architecture; ``kwargs`` go to timm.create_model."""

    name: str = "vit_micro_patch4_28"
    num_classes: int | None = None  # default: the dataset's
    drop_path_rate: float = 0.1
    mirror_teacher: bool = True  # copy the teacher's architectural choices (tokens, norms, ...)
    # Pooling, applied after mirroring (so mirror_teacher never undoes it): null = the teacher's (or the
    # timm model's); "avg" = MAE's fine-tuning head, mean over patch tokens then fc_norm (timm's
    # global_pool="avg", fc_norm=True); "token" = class token after the final norm.
    global_pool: str | None = None
    fc_norm: bool | None = (
        None  # null = timm's rule: a norm after pooling exactly when global_pool is avg/max
    )
    init: str | None = None  # fine-tune: start from these weights (timm name with tag, hf-hub:, local-dir:)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The student's attention: null = softmax (timm's); a registered zoo attention (performer, hedgehog, ...)
    # for every block, or a list with one name per block. A fresh student with it is distilled like any other
    # (transfer.mode: distill picks the map loss of each student layer's map kind).
    attention: str | list[str] | None = None
    attention_kwargs: dict[str, Any] = field(default_factory=dict)  # its options, e.g. {num_features: 64}
    # torch.compile of the student's blocks (as timm's --torchcompile; names and checkpoints unchanged)
    compile: bool = False
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs (also for teacher.compile)


@dataclass
class TeacherConfig:
    """The pretrained teacher: timm name, ``hf-hub:ORG/NAME``, ``local-dir:PATH``, a file or an attnxfer run dir."""

    spec: str | None = None
    arch: str | None = None  # architecture for a bare weights file
    revision: str | None = None
    cache_dir: str | None = None
    dtype: str = "auto"  # auto = the run's precision (bf16 on GPU, fp32 on CPU); or fp32 / bf16 / fp16
    compile: bool = False  # torch.compile of the teacher's blocks (no-grad graphs), mode model.compile_mode


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
    # how a softmax student layer's exact CE is evaluated: auto (measured on the run's device and shapes
    # before the first step; a resumed run keeps its recorded choice) | rows | sdpa | attention_lse (the
    # student's attention kernel hands out its log-sum-exp: FlexAttention on CUDA) | triton (CUDA) |
    # materialised (the reference's N×N maps)
    ce_path: str = "auto"
    # memory the materialised path's maps may take (GiB, all distilled layers at the step's peak) for auto
    # to consider it; None = a quarter of the free memory (CPU: MemAvailable; CUDA: cudaMemGetInfo); 0 = never
    materialise_budget_gib: float | None = None


@dataclass
class DataConfig:
    dataset: str = (
        "animal_mnist"  # animal_mnist | folder | synthetic | hfds/NAME | hfids/NAME | wds/NAME | a plug-in
    )
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
    reprob: float = 0.0  # random erasing probability (folder datasets)
    remode: str = "const"  # random erasing fill: const (timm's default) | rand | pixel (MAE / the paper)
    recount: int = 1  # random erasing: how many boxes per image
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1 (folder datasets)


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute; default blr * global_batch / 256
    blr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None  # e.g. 0.75; None or 1 = off
    # Which block gets which power of layer_decay (depth D, block i):
    #   timm               timm's / MAE's param_groups_lrd on a plain ViT: block i decay^(D-i), stem decay^(D+1)
    #   attention_transfer the paper's reference code (its lr_decay on the dual model): block i
    #                      decay^(D-1-i) (the last block 1.0), stem decay^D
    # Head and fc_norm (avg pooling) get 1.0 under both; the final norm (class-token pooling) goes with the
    # last block (timm's group_matcher): decay^1 under timm, 1.0 under attention_transfer.
    layer_decay_rule: str = "timm"
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
    tensorboard: bool = True  # false: no TensorBoard, whatever trackers says
    # where metrics go besides metrics.jsonl: tensorboard | wandb | mlflow (pip install 'attnxfer[wandb]')
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "attnxfer"  # the W&B project / MLflow experiment
    attention_images: int = (
        2  # validation images whose class-token maps go to TensorBoard at each eval (0: none)
    )
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
class SearchConfig:
    """`attnxfer search`: evolutionary search over formula attentions for the teacher (teacher/data sections).

    A candidate's fitness is its held-out map KL after ``fit_steps`` of stage 1 on the teacher's cached
    hidden inputs (data.batch_size images a batch, ``fit_batches`` distinct batches) and its speed as
    one attention layer at ``target_tokens`` tokens relative to softmax.
    """

    seeds: list[str] | None = None  # formulas of generation 0; null = the hand-designed zoo as formulas
    population: int = 16  # kept per generation (NSGA-II)
    offspring: int = 16  # new children per generation
    generations: int = 12  # after generation 0
    crossover_prob: float = 0.5  # else mutation
    layers: list[int] | None = None  # layers the candidate replaces and is scored on; null = all
    fit_steps: int = 40  # stage-1 steps per candidate
    fit_lr: float = 1e-2
    fit_train: str = "new+qk"  # what stage 1 trains (as convert.stage1_train)
    fit_batches: int = 4  # distinct training batches cached (cycled through fit_steps)
    held_out_images: int = 128  # validation images the KL is measured on
    target_tokens: int = 3137  # speed of one layer at this many tokens (class token + 56x56 grid)
    speed: str = "time"  # time (measured wall clock) | flops (counted; deterministic)
    speed_repeats: int = 5  # timed runs of candidate and softmax, interleaved (median)
    min_speed: float = 1.0  # the winner is the best fit among front members at least this fast
    time_budget_min: float | None = None  # stop starting generations after this many minutes
    convert_recipe: str = "convert/demo_hedgehog"  # the recipe the winner's convert command starts from


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto = bf16 autocast on GPU, fp32 on CPU; fp32 | bf16 | fp16. The teacher follows it unless
    # teacher.dtype says otherwise, so precision=fp32 is the one switch to the reference's fp32 training.
    precision: str = "auto"
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
    search: SearchConfig = field(default_factory=SearchConfig)

    def __str__(self) -> str:
        return dump_config(self)

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with dotted keys set (values already typed or YAML strings)."""
        return apply_overrides(self, overrides)


# -- value ranges: part of the schema, checked whenever a config is built -------------------


@dataclass(frozen=True)
class Range:
    """The values one config key accepts beyond its type: bounds (for numbers and list items) or choices.

    ``Range()`` says "any value of the field's type": every key is listed in `RANGES` on purpose, so a new
    field needs a decision about its range (tests/test_config_validation.py checks that one is made).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded (> instead of >=)
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(c for c in self.choices if c)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) or "anything"

    def admits(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, list):
            return all(self.admits(v) for v in value)
        if self.choices is not None:
            return not isinstance(value, str) or value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


_ANY = Range()
_POSITIVE = Range(0, low_open=True)
_AT_LEAST_1 = Range(1)
_NON_NEGATIVE = Range(0)
_FRACTION = Range(0, 1)  # probabilities
_OPEN_FRACTION = Range(0, 1, high_open=True)

#: every config key and what it accepts; numbers out of range fail with the key named
RANGES: dict[str, Range] = {
    "run_dir": _ANY,
    "seed": Range(0, 2**32 - 1),
    "device": Range(choices=("auto", "cpu", "cuda")),
    "precision": Range(choices=("auto", "fp32", "bf16", "fp16")),
    "deterministic": _ANY,
    "eval_only": _ANY,
    "model.name": _ANY,
    "model.num_classes": _AT_LEAST_1,
    "model.drop_path_rate": _OPEN_FRACTION,
    "model.mirror_teacher": _ANY,
    "model.kwargs": _ANY,
    "model.global_pool": Range(choices=("token", "avg", "max", "avgmax", "map", "")),  # timm's; "" = none
    "model.fc_norm": _ANY,
    "model.init": _ANY,
    "model.attention": _ANY,  # a registry of attnxfer.models: checked when the student is built
    "model.attention_kwargs": _ANY,
    "model.compile": _ANY,
    "model.compile_mode": Range(choices=("default", "max-autotune-no-cudagraphs")),
    "teacher.spec": _ANY,
    "teacher.arch": _ANY,
    "teacher.revision": _ANY,
    "teacher.cache_dir": _ANY,
    "teacher.dtype": Range(choices=("auto", "fp32", "bf16", "fp16")),
    "teacher.compile": _ANY,
    "transfer.mode": _ANY,  # a registry of attnxfer.transfer: checked by the plan, which knows the modes
    "transfer.end_layer": _ANY,  # the paper's meaning: 0 = all, -k = all but the last k
    "transfer.layers": _NON_NEGATIVE,
    "transfer.atd_weight": _NON_NEGATIVE,
    "transfer.share_drop_path": _ANY,
    "transfer.logit_distill": _NON_NEGATIVE,
    "transfer.logit_temperature": _POSITIVE,
    "transfer.ce_path": Range(
        choices=("auto", "rows", "sdpa", "attention_lse", "triton", "materialised")  # losses.CE_PATHS
    ),
    "transfer.materialise_budget_gib": _NON_NEGATIVE,
    "data.dataset": _ANY,  # a registry of attnxfer.data
    "data.root": _ANY,
    "data.img_size": _AT_LEAST_1,
    "data.in_chans": _AT_LEAST_1,
    "data.mean": _ANY,
    "data.std": _POSITIVE,
    "data.batch_size": _AT_LEAST_1,
    "data.eval_batch_size": _AT_LEAST_1,
    "data.num_workers": _NON_NEGATIVE,
    "data.pin_memory": _ANY,
    "data.synthetic_length": _AT_LEAST_1,
    "data.kwargs": _ANY,
    "aug.label_smoothing": _OPEN_FRACTION,
    "aug.mixup": _NON_NEGATIVE,
    "aug.cutmix": _NON_NEGATIVE,
    "aug.mixup_prob": _FRACTION,
    "aug.mixup_switch_prob": _FRACTION,
    "aug.reprob": _FRACTION,
    "aug.remode": Range(choices=("const", "rand", "pixel")),
    "aug.recount": _AT_LEAST_1,
    "aug.auto_augment": _ANY,
    "optim.lr": _POSITIVE,
    "optim.blr": _POSITIVE,
    "optim.min_lr": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.layer_decay": Range(0, 1, low_open=True),
    "optim.layer_decay_rule": Range(choices=("timm", "attention_transfer")),
    "optim.beta1": _OPEN_FRACTION,
    "optim.beta2": _OPEN_FRACTION,
    "optim.eps": _POSITIVE,
    "optim.clip_grad": _POSITIVE,
    "optim.accum_steps": _AT_LEAST_1,
    "schedule.epochs": _AT_LEAST_1,
    "schedule.warmup_epochs": _NON_NEGATIVE,
    "schedule.max_steps": _AT_LEAST_1,
    "ema.decay": Range(0, 1, low_open=True, high_open=True),
    "log.every_steps": _AT_LEAST_1,
    "log.tensorboard": _ANY,
    "log.trackers": Range(choices=("tensorboard", "wandb", "mlflow")),
    "log.project": _ANY,
    "log.progress": _ANY,
    "log.attention_images": _NON_NEGATIVE,
    "mae.mask_ratio": _OPEN_FRACTION,
    "mae.decoder_dim": _AT_LEAST_1,
    "mae.decoder_depth": _AT_LEAST_1,
    "mae.decoder_heads": _AT_LEAST_1,
    "mae.decoder_mlp_ratio": _POSITIVE,
    "mae.norm_pix": _ANY,
    "mae.pictures": _NON_NEGATIVE,
    "mae.export": _ANY,
    "checkpoint.every_steps": _AT_LEAST_1,
    "checkpoint.every_minutes": _POSITIVE,
    "checkpoint.every_epoch": _ANY,
    "checkpoint.keep_last": _AT_LEAST_1,
    "checkpoint.resume": _ANY,  # auto | none | a checkpoint dir (checked when the run resumes)
    "convert.attention": _ANY,  # a registry of attnxfer.models.efficient
    "convert.attention_kwargs": _ANY,
    "convert.stage1_steps": _NON_NEGATIVE,  # 0 = skip stage 1
    "convert.stage1_lr": _POSITIVE,
    "convert.stage1_batch_size": _AT_LEAST_1,
    "convert.stage1_warmup_steps": _NON_NEGATIVE,
    "convert.stage1_weight_decay": _NON_NEGATIVE,
    "convert.stage1_clip_grad": _POSITIVE,
    "convert.stage1_train": Range(choices=("new", "qk", "new+qk")),
    "convert.map_loss": Range(choices=("auto", "ce", "mse", "output")),
    "convert.output_mse": _NON_NEGATIVE,
    "convert.agreement_batches": _AT_LEAST_1,
    "convert.speed_batch_size": _AT_LEAST_1,
    "convert.speed_repeats": _AT_LEAST_1,
    "search.seeds": _ANY,  # formula programs, parsed when the search starts (errors name the position)
    "search.population": Range(2),
    "search.offspring": _AT_LEAST_1,
    "search.generations": _NON_NEGATIVE,
    "search.crossover_prob": _FRACTION,
    "search.layers": _NON_NEGATIVE,
    "search.fit_steps": _AT_LEAST_1,
    "search.fit_lr": _POSITIVE,
    "search.fit_train": Range(choices=("new", "qk", "new+qk")),
    "search.fit_batches": _AT_LEAST_1,
    "search.held_out_images": _AT_LEAST_1,
    "search.target_tokens": Range(2),
    "search.speed": Range(choices=("time", "flops")),
    "search.speed_repeats": _AT_LEAST_1,
    "search.min_speed": _NON_NEGATIVE,
    "search.time_budget_min": _POSITIVE,
    "search.convert_recipe": _ANY,
}


def config_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (``optim.lr``, ...), in declaration order."""
    cls = cls or TrainConfig
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(config_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def validate_config(cfg: Any, prefix: str = "") -> Any:
    """Check every value against `RANGES`; the first one out of range is a `ConfigError` naming its key."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            validate_config(value, key + ".")
            continue
        rule = RANGES.get(key, _ANY)
        if not rule.admits(value):
            raise ConfigError(f"{key}: must be {rule.describe()}; got {value!r}")
        if key == "run_dir" and not str(value).strip():
            raise ConfigError(
                f"run_dir is empty ({value!r}: an unset shell variable?); a run would write into the current "
                "directory. Name its folder, e.g. run_dir=runs/my-run (run_dir=. if you mean this directory)"
            )
    return cfg


# -- (de)serialisation ---------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# `X | None` (types.UnionType) and `Optional[X]` (typing.Union) are both unions


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if (
            isinstance(value, Mapping)
            and value
            and dataclasses.is_dataclass(value) is False
            and key != "kwargs"
        ):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(base: Any, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value in ``cfg`` differs from ``base`` (the recipe it started from):
    ``{key: (recipe value, value)}``."""
    old, new = _flatten(to_dict(base)), _flatten(to_dict(cfg))
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


def describe_changes(base: Any, cfg: Any, recipe: str | None) -> str:
    """What a run changes from its recipe, one ``key: recipe value -> value`` line each."""
    where = f"recipe {recipe}" if recipe else "the defaults"
    changes = config_changes(base, cfg)
    if not changes:
        return f"config: {where}, unchanged"
    lines = [f"config: {where}, {len(changes)} value(s) changed:"]
    lines += [f"  {k}: {yaml_value(a)} -> {yaml_value(b)}" for k, (a, b) in changes.items()]
    return "\n".join(lines)


def yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


_FRIENDLY = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _is_union(tp: Any) -> bool:
    """``Optional[int]`` and ``int | None`` alike (the latter is a ``types.UnionType``)."""
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """How a user would say the type: 'a number or null', 'a list of integers'."""
    if _is_union(tp):
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
    if _is_union(tp):
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


def _check_choice(key: str, value: Any) -> None:
    """A key with a closed set of values (`RANGES`) is checked as the config loads, so a typo never trains."""
    rule = RANGES.get(key, _ANY)
    if rule.choices is None or rule.admits(value):
        return
    names = [a for a in rule.choices if a]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}{hint}")


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
            _check_choice(prefix + key, changes[key])
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
    return validate_config(_merge(cfg, _nest(parsed)))


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
    if not str(path).strip():
        raise ConfigError(
            "-c was given an empty name; pass a YAML file or a built-in recipe (e.g. -c demo/copy)"
        )
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        inside = p / RUN_CONFIG
        hint = f"; a run's config is {inside}" if inside.is_file() else ""
        raise ConfigError(f"config {str(p)!r} is a directory, not a YAML file{hint}")
    for candidate in (RECIPES / p, RECIPES / p.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(str(path), list_recipes(), n=1)
    hint = f"; did you mean the built-in recipe {close[0]!r}?" if close else ""
    raise ConfigError(
        f"config file {str(p)!r} does not exist{hint} (built-in recipes: {', '.join(list_recipes())})"
    )


def _read_yaml(p: Path) -> Any:
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not a text YAML file (binary content?)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None


def run_config_dir(path: Path) -> Path | None:
    """The run dir whose own record ``path`` is: a ``config.yaml`` beside what attnxfer writes into a run."""
    if path.name != RUN_CONFIG:
        return None
    folder = path.parent
    return folder if any((folder / m).exists() for m in RUN_DIR_MARKERS) else None


def _own_run_dir(cfg: TrainConfig, p: Path) -> TrainConfig:
    """A run's own config.yaml refers to the folder it sits in, wherever the command runs from and wherever
    the run was moved or copied to: the ``run_dir`` it records (often relative to where the run started)
    only says where the run was first written."""
    folder = run_config_dir(p)
    if folder is None or not isinstance(cfg, TrainConfig):
        return cfg
    recorded = Path(cfg.run_dir)
    if recorded.is_dir() and os.path.samefile(recorded, folder):
        return cfg
    return dataclasses.replace(cfg, run_dir=str(folder.absolute()))


BASE_KEY = "base"


def _resolve_base(name: Any, child: Path) -> Path:
    """A recipe's ``base:``: a built-in recipe name, or a YAML path relative to the recipe that names it."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"config file {str(child)!r}: base must be a recipe name or a YAML path "
            f"(e.g. base: paper/vit_large_copy), got {name!r}"
        )
    beside = child.parent / name
    for candidate in (beside, beside.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    try:
        return resolve_recipe(name)
    except ConfigError as e:
        raise ConfigError(f"config file {str(child)!r}: base {name!r} not found ({e})") from None


def recipe_chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """A recipe and the recipes it starts from (``base: NAME``), root first, each with its own keys.

    Why a chain and not a merged dict: each file is applied over the previous one exactly as overrides
    are, so a recipe that states only what differs resolves to the same config as a full copy."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    p = resolve_recipe(path)
    seen: list[Path] = []
    while True:
        if p.resolve() in seen:
            loop = " -> ".join(str(q) for q in [*seen, p.resolve()])
            raise ConfigError(f"recipes start from each other in a cycle: {loop}; remove one base")
        seen.append(p.resolve())
        data = _read_yaml(p)
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}"
            )
        data = dict(data)
        parent = data.pop(BASE_KEY, None)
        chain.append((p, data))
        if parent is None:
            return chain[::-1]
        p = _resolve_base(parent, p)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: TrainConfig | None = None
) -> TrainConfig:
    """Defaults, then the YAML file (after the recipes it starts from, ``base: NAME``), then ``key=value``
    overrides; every value is range-checked.

    A run's own ``config.yaml`` (one beside the files attnxfer writes into a run dir) sets ``run_dir`` to the
    folder it sits in, so ``-c /abs/RUN/config.yaml`` continues (or scores) that run from any directory; a
    ``run_dir=`` override still wins. Any other YAML's ``run_dir`` is taken as written (relative to the
    current directory)."""
    cfg = base or TrainConfig()
    if path is not None:
        p = resolve_recipe(path)
        for _, data in recipe_chain(p):
            cfg = _merge(cfg, data)
        cfg = _own_run_dir(cfg, p)
    if overrides:
        cfg = apply_overrides(cfg, parse_overrides(overrides))
    return validate_config(cfg)
