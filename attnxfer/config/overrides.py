"""Values into a config: type coercion, dotted ``key=value`` overrides, range checks, and what changed. Unknown
keys and wrong types are `ConfigError`s naming the nearest valid key, so a typo never silently trains the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import yaml

from ..run_layout import STUDY_YAML
from ..speak import change_said
from .keys import ConfigError, field_types, leaves, reads_section, rule_of, section_command, value_said_anyway
from .renamed import find_key, respell
from .strict_yaml import Dumper, describe_yaml_error, load_yaml, yaml_value


def validate_config(cfg: Any, prefix: str = "") -> Any:
    """Check every value against its key's declared range (the first one out of range: a `ConfigError`)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            validate_config(value, key + ".")
            continue
        rule = rule_of(f)
        if not rule.admits(value):
            bounds = rule.describe()
            if isinstance(value, float) and not math.isfinite(value):  # inf is > 0, and nan is nothing
                bounds = "a finite number" + ("" if bounds == "anything" else f" {bounds}")
            raise ConfigError(f"{key}: must be {bounds}; got {value!r}", key=key)
        if key == "run_dir" and not str(value).strip():
            raise ConfigError(
                f"run_dir is empty ({value!r}: an unset shell variable?); a run would write into the current "
                "directory. Name its folder, e.g. run_dir=runs/my-run (run_dir=. if you mean this directory)"
            )
        if key == "run_dir" and str(value).startswith("~"):  # as a shell would: all writers, one folder
            cfg = dataclasses.replace(cfg, run_dir=os.path.expanduser(value))
    return cfg


def to_dict(cfg: Any, command: str | None = None) -> dict[str, Any]:
    """The config as nested dicts; with ``command`` (train, convert, pretrain, search, ...) only the sections
    that command reads: a train run's record lists no ``convert``/``mae``/``search`` key it never reads, a
    pretrain run's no ``transfer`` key."""
    full = dataclasses.asdict(cfg)
    return {
        f.name: full[f.name] for f in dataclasses.fields(cfg) if command is None or reads_section(f, command)
    }


def refuse_unread_sections(cfg: Any, command: str, study: bool = False, submit: bool = False) -> None:
    """Keys of a section ``command`` does not read (``convert``, ``mae``, ``search``: only another command
    reads them; ``transfer``: pretrain reads none), set away from their defaults, are refused: ``command`` (a
    ``study`` of it) would drop them without a word; a study that varied convert.attention without --command
    convert would train one student several times. ``submit``: ``command`` is the job's, which `attnxfer submit
    --command` names (a submitted study's students', its YAML's ``command:``)."""
    changed = config_changes(type(cfg)(), cfg)
    for f in dataclasses.fields(cfg):
        keys = [
            k
            for k in changed
            if k.startswith(f"{f.name}.")
            and changed[k][1] != value_said_anyway(f, command, k.split(".", 1)[1])
        ]
        if reads_section(f, command) or not keys:
            continue
        owner, them = section_command(f), "it" if len(keys) == 1 else "them"
        who, instead = (f"attnxfer {command}", f", or run attnxfer {owner}")
        if study:  # a study trains or converts its students (study --command convert)
            who = f"a study of `attnxfer {command}`"
            instead = ", or give the study --command convert" if owner == "convert" else f"{instead} alone"
        readers = f"only `attnxfer {owner}` reads the {f.name} section, and {who}"
        if submit and study and owner == "convert":  # submit's --command convert is one conversion's job
            instead = ", or write command: convert in the study's YAML"
        elif submit and not study and owner in ("convert", "pretrain"):  # not another command: submit's own
            instead = f", or give submit --command {owner}"
        if not owner:  # a section every command reads but a few (transfer: all but pretrain)
            readers, instead = f"{who} does not read the {f.name} section and", ""
        raise ConfigError(f"{', '.join(keys)}: {readers} would drop {them}; remove {them}{instead}")


def dump_config(cfg: Any, command: str | None = None, *, as_run: bool = False) -> str:
    """The config as YAML (``-c`` reads it back); ``command`` as `to_dict`. A config written with every
    section (before sections belonged to their command) loads the same: an unread section is only unread.
    ``as_run``: a run's own config.yaml, whose ``-c`` continues the run: its checkpoint.resume is auto, where
    none (or a PATH) would start it over (or from that checkpoint) every time again."""
    if as_run:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
    return yaml.dump(to_dict(cfg, command), Dumper=Dumper, sort_keys=False)


def config_changes(base: Any, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Every key whose value in ``cfg`` differs from ``base`` (the recipe it started from), a mapping of
    options (``convert.attention_kwargs``) as a whole, so an entry dropped shows: ``{key: (recipe value,
    value)}``."""
    old, new = to_dict(base), to_dict(cfg)
    changes = {}
    for leaf in leaves(type(cfg)):
        was, now = find_key(old, leaf.name)[1], find_key(new, leaf.name)[1]
        if was != now:
            changes[leaf.name] = (was, now)
    return changes


def describe_changes(base: Any, cfg: Any, recipe: str | None) -> str:
    """What a run changes from its recipe, one ``key: recipe value -> value`` line each (of a mapping, the
    entries that differ)."""
    # a YAML file given by its path (a run's config.yaml, the user's own) is no recipe of the package's
    where = (
        "the defaults"
        if not recipe
        else recipe
        if Path(recipe).suffix in (".yaml", ".yml")
        else f"recipe {recipe}"
    )
    changes = config_changes(base, cfg)
    # a run's own config.yaml names its folder as it is now (eval RUN, -c RUN/config.yaml): the same folder,
    # given again by another path, is no change
    if (
        "run_dir" in changes
        and Path(changes["run_dir"][0]).resolve() == Path(changes["run_dir"][1]).resolve()
    ):
        del changes["run_dir"]
    if not changes:
        return f"config: {where}, unchanged"
    lines = [f"config: {where}, {len(changes)} value(s) changed:"]
    lines += [f"  {k}: {change_said(a, b, yaml_value)}" for k, (a, b) in changes.items()]
    return "\n".join(lines)


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
    if typing.get_origin(tp) is list:
        return "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return _FRIENDLY.get(tp, getattr(tp, "__name__", str(tp)))


class _Unfit(ConfigError):
    """A value of the key's type that no value of it can be (an integer past a float's range)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else is guessed."""
    origin = typing.get_origin(tp)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if args[1:] == (type(None),) and typing.get_origin(args[0]) in (list, Sequence):
            # a list or null: the list's own error names the item at fault or the brackets to write
            return _coerce(value, args[0], key)
        lists = [a for a in args if typing.get_origin(a) in (list, Sequence)]
        if isinstance(value, (list, tuple)) and len(lists) == 1:
            # a list given where a list is one choice (a name or a list of names): its item at fault is named
            return _coerce(value, lists[0], key)
        for arg in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, arg, key)
            # the type fits, the value does not: this error says what to write, not the union's
            except _Unfit:
                raise
            except ConfigError:
                continue
        whole = (
            int in args and isinstance(value, float) and value.is_integer()
        )  # num_classes=10.0, YAML's 1e3
        hint = f" (write {int(value)})" if whole else _unquoted(value, tp)
        if isinstance(value, str) and value.strip().lower() == "none" and type(None) in args:
            hint = " (write null for none)"
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_as_given(value)}{hint}")
    if tp is Any:
        return value
    if origin in (list, Sequence):
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # key.0.weight=...
            raise ConfigError(
                f"{key}.{next(iter(value))}: a list is not set item by item; give it whole: {key}=[...]"
            )
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            # one item given: the example is that item in brackets (transfer.losses' a mapping: a name is its name)
            one = {"name": value} if isinstance(value, str) and typing.get_origin(item) is dict else value
            example = f"[{one}]" if isinstance(one, (str, int, float)) else "[a, b]"
            example = "[] for none" if value is None else example  # null where a list is kept: its empty list
            example = f"[{yaml_value(one)}]" if isinstance(one, dict) else example
            span = re.fullmatch(r"(\d+)-(\d+)", str(value)) if item is int else None  # as the plan says "0-5"
            example = str(list(range(int(span[1]), int(span[2]) + 1))).replace(" ", "") if span else example
            said, words = str(value).strip(), str(value).replace(",", " ").split()
            if isinstance(value, str) and said.lower() in ("none", "[]"):  # no item, as null says
                example = "[] for none"
            elif isinstance(value, str) and said.startswith("[") and said.endswith("]"):  # a list, quoted
                example = f"{said} without quotes: quoted, it is a string"
            elif isinstance(value, str) and len(words) > 1 and not span:  # items without their brackets
                example = f"[{','.join(words)}]"
            raise ConfigError(f"{key}: expected a list, got {value!r} (write e.g. {key}={example})")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            # a list's item given as its name (transfer.losses=[cosine]): the mapping that names it
            named = f" (write e.g. {{name: {value}}})" if isinstance(value, str) and key.endswith("]") else ""
            raise ConfigError(f"{key}: expected a mapping, got {value!r}{named}")
        return dict(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is int and number and isinstance(value, int)):
        return value
    if tp is float and number:
        try:
            return float(value)
        except OverflowError:  # an integer past a float's range (about 1.8e308): no number a run can take
            digits = int(value.bit_length() * math.log10(2)) + 1
            raise _Unfit(f"{key}: must be a finite number; got an integer of about {digits} digits") from None
    if tp is str and (isinstance(value, str) or number):
        return str(value)
    if tp is int and number and float(value).is_integer():  # epochs=1e3 (YAML reads it as a float)
        raise ConfigError(f"{key}: expected an integer, got {value!r} (write {int(value)})")
    if tp in _FRIENDLY:
        # a file's None (Python's, read as null) where the key takes text: 'None' quoted is the text (a list's
        # item, named by its index, is a name in a list of names, where null is written as such)
        text = (
            " (null, which it does not take; 'None', quoted, is the text)"
            if value is None and tp is str and not key.endswith("]")
            else ""
        )
        raise ConfigError(
            f"{key}: expected {_FRIENDLY[tp]}, got {_as_given(value)}{_unquoted(value, tp)}{text}"
        )
    raise ConfigError(f"{key}: unsupported type {tp}")


def _as_given(value: Any) -> str:
    """A refused value as the user wrote it: a switch as YAML spells it (true, not Python's True), else its repr."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _unquoted(value: Any, tp: Any) -> str:
    """What to write where ``value`` is a string that, unquoted, a ``tp`` takes: a quoted "3" or "1e-3" is
    YAML's string, refused by a number's key as a quoted "true" is by a switch's (and "010", no number). And
    the other way round: a boolean where a string is taken was YAML 1.1's unquoted yes/no/on/off (``name: no``)."""
    takes = typing.get_args(tp) or (tp,)
    if isinstance(value, bool) and bool not in takes and (int in takes or float in takes):
        return " (a number, not a switch's true or false)"
    if isinstance(value, bool) and str in takes:
        return (
            " (YAML reads an unquoted yes, no, on, off, true or false as true/false: quote the text, e.g. "
            f"'{'yes' if value else 'no'}')"
        )
    if not isinstance(value, str) or str in takes:
        return ""
    # YAML reads a number with a leading zero as text (010: no octal, no ten)
    if re.fullmatch(r"\s*0\d+(\.\d*)?\s*", value) and (int in takes or float in takes):
        return f" (a leading zero makes it text in YAML: write {value.strip().lstrip('0') or '0'})"
    # a factor or a share as prose writes it (the docs' "1.5x" speed-up): the plain number the key takes
    unit = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([x×%])\s*", value)
    if unit and float in takes:
        return f" (write {float(unit[1]) / (100 if unit[2] == '%' else 1):g}: a plain number)"
    with contextlib.suppress(yaml.YAMLError, ConfigError):
        if not isinstance(typed := load_yaml(value), str):
            _coerce(typed, tp, "")
            return f" (a quoted string: write {value.strip()} without quotes)"
    return ""


#: what timm's and MAE's training scripts (and Hugging Face's Trainer) call keys attnxfer's config names otherwise
_SCRIPT_NAMES = {
    "output_dir": "run_dir",
    "output": "run_dir",
    "data_path": "data.root",
    "data_dir": "data.root",
    "model": "model.name",
    "nb_classes": "model.num_classes",
    "input_size": "data.img_size",
    "accum_iter": "optim.accum_steps",
    "wd": "optim.weight_decay",
    "smoothing": "aug.label_smoothing",
    "out": "run_dir",
    "out_dir": "run_dir",
    "path": "data.root",
    "steps": "schedule.max_steps",
    "iters": "schedule.max_steps",
    "max_iters": "schedule.max_steps",
    "finetune": "model.init",  # MAE's main_finetune.py: the weights to fine-tune
    "initial_checkpoint": "model.init",  # timm's train.py --initial-checkpoint
    "lr_base": "optim.blr",  # timm's train.py: the lr per 256 images
    "aa": "aug.auto_augment",
    "drop": "model.kwargs.drop_rate",  # timm's dropout (its --drop-path is model.drop_path_rate)
    "model_ema": "ema.decay",
    "model_ema_decay": "ema.decay",
    "ema.momentum": "ema.decay",  # the decay, as some EMA implementations name it
    "checkpoint_hist": "checkpoint.keep_last",
    "log_interval": "log.every_steps",
    "log_wandb": "log.trackers",
    "log_dir": "run_dir",  # MAE's TensorBoard folder: RUN_DIR/tb
    "gp": "model.global_pool",
    "cls_token": "model.global_pool",  # MAE's --cls_token: global_pool=token
    "opt_eps": "optim.eps",
    "amp": "precision",
    "torchcompile": "model.compile",
    "pretrained": "model.init",
    "pretrained_path": "model.init",
    "learning_rate": "optim.lr",  # Hugging Face's Trainer (TrainingArguments)
    "num_train_epochs": "schedule.epochs",
    "per_device_train_batch_size": "data.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "gradient_accumulation_steps": "optim.accum_steps",
    "max_grad_norm": "optim.clip_grad",
    "logging_steps": "log.every_steps",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "checkpoint.resume",
    "teacher.name": "teacher.spec",
    "teacher.model": "teacher.spec",
    "teacher.path": "teacher.spec",
    "report_to": "log.trackers",  # Hugging Face's TrainingArguments
    "dataloader_num_workers": "data.num_workers",
    "bf16": "precision",
    "fp16": "precision",
    "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2",
    "adam_epsilon": "optim.eps",
    "logging_dir": "run_dir",
    "dataloader_pin_memory": "data.pin_memory",
    "layer_decay_rate": "optim.layer_decay",  # the rate, where layer_decay_rule says how blocks are numbered
    "optim.layer_decay_rate": "optim.layer_decay",
    "model.type": "model.name",  # the student's architecture: a timm name
    "model.arch": "model.name",
    "model.architecture": "model.name",
    "grad_checkpointing": "model.grad_checkpointing",  # timm's --grad-checkpointing
    "gradient_checkpointing": "model.grad_checkpointing",  # Hugging Face's
}
#: what timm's, MAE's and Hugging Face's scripts let one choose and attnxfer does one way, or what another
#: key chooses: what it does instead
_ONE_WAY = {
    "optim": "attnxfer trains with AdamW (the paper's and MAE's optimiser, timm's opt=adamw) and offers no other; "
    "its keys are optim.lr (or optim.blr), optim.weight_decay, optim.beta1 (the momentum), optim.beta2, optim.eps",
    "schedule": "the learning rate warms up linearly over schedule.warmup_epochs (step k of W at lr·(k+1)/W), "
    "then falls on a half-cosine to optim.min_lr (timm's and MAE's cosine), the one schedule attnxfer has; "
    "schedule.epochs or schedule.max_steps sets its length",
    "warmup": "schedule.warmup_epochs sets the warmup in epochs, fractions allowed (S steps: S over the steps an "
    "epoch takes; a ratio r of the run: r times schedule.epochs)",
    "when": "a run evaluates at the end of every epoch and of the run, and saves there too "
    "(checkpoint.every_epoch), every checkpoint.every_steps steps and every checkpoint.every_minutes minutes",
    "decay_schedule": "optim.weight_decay stays one value for the whole run, as timm and MAE keep it (DINO's and "
    "BEiT's weight_decay_end schedule is not offered)",
    "hub": "a run's student reaches the Hub through its export: attnxfer export RUN_DIR OUT_DIR --push-to-hub "
    "ORG/NAME (a model card, timm's and transformers' files)",
    "download": "there is no download switch: torch/NAME reads the folder data.root names, which torchvision's "
    "download=True fills where there is a network; hfds/NAME downloads into its cache (data.root) by itself where "
    "the Hub can be reached",
    "convert": "convert.attention chooses the blocks a conversion converts: one name per block (softmax where "
    "a block keeps the teacher's attention, e.g. [performer, softmax, performer]), one name for all, or auto "
    "(chosen by measured sensitivity under convert.speedup)",
    "stage2": "a conversion's stage 2 is a training run of the config's own keys: its length is "
    "schedule.max_steps or schedule.epochs, its warm-up schedule.warmup_epochs, its lr optim.lr (or optim.blr), "
    "its batch data.batch_size, its weight decay and clipping optim.weight_decay and optim.clip_grad "
    "(convert.stage1_* are stage 1's alone)",
}
#: stage 1's own keys (convert.stage1_*) and the schedule's, as a stage 2 of its own would be misspelt
_STAGE2_SPELLINGS = (
    "steps", "max_steps", "epochs", "lr", "blr", "batch_size", "train", "warmup_steps", "warmup_epochs",
    "weight_decay", "clip_grad",
)  # fmt: skip
#: the keys (whole, dotted under their section) that ask for one of `_ONE_WAY`'s choices
_ONE_WAY_KEYS = {
    **dict.fromkeys(("opt", "optimizer", "momentum", "opt_betas", "optim.name", "optim.type"), "optim"),
    **dict.fromkeys(("optim.opt", "optim.optimizer", "optim.momentum", "optim.opt_betas"), "optim"),
    **dict.fromkeys(
        ("sched", "scheduler", "lr_scheduler_type", "schedule.name", "schedule.type"), "schedule"
    ),
    **dict.fromkeys(("schedule.sched", "schedule.scheduler", "warmup_lr", "schedule.warmup_lr"), "schedule"),
    **dict.fromkeys(("warmup_steps", "warmup_ratio", "warmup_iters", "schedule.warmup_steps"), "warmup"),
    **dict.fromkeys(("schedule.warmup_ratio", "schedule.warmup_iters"), "warmup"),
    **dict.fromkeys(("convert.layers", "convert.blocks"), "convert"),
    **dict.fromkeys((f"convert.stage2_{k}" for k in _STAGE2_SPELLINGS), "stage2"),
    # timm's --dataset-download
    **dict.fromkeys(("dataset_download", "download", "data.download"), "download"),
    # Hugging Face's TrainingArguments
    **dict.fromkeys(("eval_strategy", "evaluation_strategy", "save_strategy", "eval_steps"), "when"),
    # timm's --eval-interval, MAE's --save_ckpt_freq, and the spellings of other trainers
    **dict.fromkeys(("eval_interval", "eval_freq", "eval_every", "save_ckpt_freq"), "when"),
    **dict.fromkeys(
        ("eval.every", "eval.every_epochs", "eval.interval", "eval.freq", "eval.every_steps"), "when"
    ),
    **dict.fromkeys(("betas", "optim.betas"), "optim"),
    **dict.fromkeys(("weight_decay_end", "wd_end", "optim.weight_decay_end"), "decay_schedule"),
    **dict.fromkeys(("push_to_hub", "hub_model_id"), "hub"),
}
#: the key a section's name given a value means (``model=vit_tiny``, ``transfer=copy``)
_SECTION_VALUE = {
    "model": "model.name",
    "teacher": "teacher.spec",
    "transfer": "transfer.mode",
    "data": "data.dataset",
    "ema": "ema.decay",  # timm's --model-ema-decay: ema=0.9999 is the decay
    "convert": "convert.attention",  # what a conversion converts to (convert=performer)
}
#: values other tools spell otherwise (device=gpu is not the nearest spelling, cpu; Lightning's precision=16-mixed)
_CHOICES_MEANT = {
    "gpu": ("cuda",),
    **dict.fromkeys(("amp", "bf16-mixed", "bfloat16"), ("bf16",)),
    **dict.fromkeys(("16-mixed", "16", "half", "float16"), ("fp16",)),
    **dict.fromkeys(("32", "32-true", "float32", "float", "full"), ("fp32",)),
}
#: timm's VisionTransformer arguments: ``model.depth`` means ``model.kwargs.depth``
_VIT_ARGS = frozenset(
    (
        "img_size",
        "patch_size",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "class_token",
        "pos_embed",
        "reg_tokens",
        "init_values",
        "no_embed_class",
        "dynamic_img_size",
    )
)


def done_one_way(key: str) -> str | None:
    """What attnxfer does where ``key`` (timm's ``opt``, Hugging Face's ``lr_scheduler_type``, ...) asks for a
    choice it does not offer; None for any other key."""
    section = _ONE_WAY_KEYS.get(key)
    return _ONE_WAY[section] if section else None


def keys_meant(
    key: str, root: type, prefix: str = "", cutoff: float = 0.5, sections: bool = True
) -> list[str]:
    """The config keys a user most likely meant by an unknown ``prefix + key``: the key a timm or MAE script
    calls so (``output_dir`` -> run_dir), else those under ``prefix`` that it begins (``transfer.atd`` ->
    transfer.atd_weight), else the keys anywhere whose last part it is or begins (``epochs`` -> schedule.epochs),
    else the nearest spelling (``cutoff``: how near, 0 to 1), a near one under ``prefix`` before one anywhere.
    ``sections``: whether a section may be the answer (only a mapping can be one: ``lr_base=1`` is no section)."""
    last = key.rsplit(".", 1)[-1]
    for said in (prefix + key, last):  # teacher.name; data.data_path, but not teacher.model as model.name
        if said in _SCRIPT_NAMES and _SCRIPT_NAMES[said].startswith(prefix):
            return [_SCRIPT_NAMES[said]]
    if prefix == "model." and key in _VIT_ARGS:
        return [f"model.kwargs.{key}"]
    fields = field_types(_section_type(root, prefix))
    here = [f"{prefix}{n}" for n, tp in fields.items() if sections or not dataclasses.is_dataclass(tp)]
    anywhere = [leaf.name for leaf in leaves(root)]
    begun = [name for name in here if name.startswith(prefix + key)]
    begun = begun or [name for name in here if prefix and key in name.removeprefix(prefix)]  # transfer.weight
    if begun:
        return begun[:3]
    named = [name for name in anywhere if name.rsplit(".", 1)[-1] == last]
    named = named or [name for name in anywhere if name.rsplit(".", 1)[-1].startswith(last)][:3]
    if named:
        return named
    # a near spelling here, then anywhere (epoch -> schedule.epochs), then a loose one here (bogus -> log): a
    # section, or a key of the section named (the top level's few keys, all unlike, would be a far guess)
    near = max(cutoff, 0.75)
    by_last = {name.rsplit(".", 1)[-1]: name for name in reversed(anywhere)}
    loose = here if prefix else [n for n in here if dataclasses.is_dataclass(fields[n])]
    return (
        difflib.get_close_matches(prefix + key, here, n=1, cutoff=near)
        or [by_last[c] for c in difflib.get_close_matches(last, list(by_last), n=1, cutoff=near)]
        or difflib.get_close_matches(prefix + key, loose, n=1, cutoff=cutoff)
    )


def _section_type(root: type, prefix: str) -> type:
    for part in filter(None, prefix.split(".")):
        root = field_types(root)[part]
    return root


def _unknown_key(
    key: str, prefix: str, root: type, value: Any = None, command: str | None = None
) -> ConfigError:
    if not prefix and key == "base":  # a YAML file's first key, given as an override
        return ConfigError(
            "base names the recipe a YAML file starts from; on the command line, give it as -c RECIPE"
        )
    parts = key.split(".")
    if len(parts) > 1 and dataclasses.is_dataclass(field_types(_section_type(root, prefix)).get(parts[0])):
        # `schedule.max_steps: 3` in a YAML file: dots are the command line's spelling of nesting
        nested = ": {".join(parts) + ": ...}" + "}" * (len(parts) - 2)
        return ConfigError(f"config key {prefix + key!r}: a YAML file nests its keys; write {nested}")
    # optim.opt=lamb: no near spelling (optim.eps) is what it means; optimizer.lr=1 names the section
    if not isinstance(value, Mapping) and (done := done_one_way(prefix + key)):
        return ConfigError(f"unknown config key {prefix + key!r}: {done}")
    meant = keys_meant(key, root, prefix, sections=isinstance(value, Mapping))
    hint = f"; did you mean {' or '.join(repr(m) for m in meant)}?" if meant else ""
    # ``command``'s own keys: the top level without the sections other commands alone read; under one of
    # those, the command that reads it
    fields = {f.name: f for f in dataclasses.fields(_section_type(root, prefix))}
    valid = [n for n, f in fields.items() if prefix or command is None or reads_section(f, command)]
    top = {f.name: f for f in dataclasses.fields(root)}.get(prefix.split(".")[0])
    owner = section_command(top) if top and command and not reads_section(top, command) else None
    return ConfigError(
        f"unknown config key {prefix + key!r}{hint} (valid under {prefix.rstrip('.') or 'the top level'}: "
        f"{', '.join(valid)}{f'; only `attnxfer {owner}` reads the {top.name} section' if owner else ''})"
    )


def merge_values(
    obj: Any, data: Mapping[str, Any], prefix: str = "", root: type | None = None, command: str | None = None
) -> Any:
    """``obj`` with the (nested) keys of ``data`` set, each coerced to its field's type; a closed set of
    values is checked here, bounds by `validate_config`. ``root``: the whole config's type (default: ``obj``'s),
    where an unknown key's likely meaning is looked for; ``command``: the command loading it, whose sections
    an unknown key's refusal lists (None: every section)."""
    if not isinstance(data, Mapping):
        section = prefix.rstrip(".")
        if section in _SECTION_VALUE and isinstance(data, (str, int, float)):  # model=vit_tiny: its name
            key = _SECTION_VALUE[section]
            # data=/data/imagenet: a folder, not a dataset's name (torch/cifar10)
            key = "data.root" if section == "data" and isinstance(data, str) and _a_folder(data) else key
            meant = f"{key}={yaml_value(data)}"
            raise ConfigError(f"{section} is a section, not a value: did you mean {meant}?")
        if section in _ONE_WAY and isinstance(data, str):  # optim=sgd, as Hugging Face's Trainer names one
            raise ConfigError(f"{section}={data}: {_ONE_WAY[section]}")
        if section == "eval" and isinstance(data, bool):  # MAE's main_finetune.py --eval: score, don't train
            raise ConfigError(
                "eval is the section of what `attnxfer eval` scores (eval.metrics, ...), not MAE's --eval switch: "
                "to score a trained run, run attnxfer eval -c RUN_DIR/config.yaml"
            )
        if section and data is None:  # `optim:` with each key under it commented out
            raise ConfigError(f"{section}: a section with no keys under it: give it keys, or leave it out")
        raise ConfigError(f"{section or 'config'}: expected a mapping, got {data!r}")
    if not prefix:  # a whole config's keys: old spellings move to their new keys first (`renamed.py`)
        data = respell(data, obj)
    root = root or type(obj)
    types = field_types(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in data.items():
        if key not in types:
            raise _unknown_key(str(key), prefix, root, value, command)
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = merge_values(getattr(obj, key), value, f"{prefix}{key}.", root, command)
        else:
            if isinstance(value, _Into):  # model.kwargs.depth=4 sets one key of the recipe's model.kwargs
                value = _merged_into(getattr(obj, key), value, prefix + key)
            changes[key] = value = _coerce(value, tp, prefix + key)
            # a closed set of values is checked as the config loads: a typo never trains
            rule = rule_of(fields[key])
            if rule.choices is not None and not rule.admits(value):
                names = [a for a in rule.choices if a]
                where, bad = prefix + key, value
                if isinstance(value, list):  # the element outside the set: eval.metrics[1]: 'nope'
                    i = next(i for i, v in enumerate(value) if not rule.admits(v))
                    where, bad = f"{where}[{i}]", value[i]
                close = [c for c in _CHOICES_MEANT.get(str(bad), ()) if c in names]
                close = close or difflib.get_close_matches(str(bad), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                if where == "device" and str(bad).startswith(
                    "cuda:"
                ):  # one GPU of several: by the environment
                    hint += f" (GPU {str(bad)[5:]} alone: CUDA_VISIBLE_DEVICES={str(bad)[5:]} attnxfer ...)"
                if "" in rule.choices:  # a command line refuses `KEY=`: the empty choice is spelled out
                    names.append(f"'' (none: {where}=\"''\" on a command line)")
                raise ConfigError(f"{where}: {bad!r} is not one of {', '.join(names)}{hint}")
    return dataclasses.replace(obj, **changes)


def _a_folder(text: str) -> bool:
    """Whether a word given for a dataset reads as its folder (timm's DATA_DIR), not a dataset's name."""
    return text.startswith(("/", ".", "~")) or Path(text).expanduser().is_dir()


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["optim.lr=1e-3", "transfer.layers=[0,1]"]`` -> ``{"optim.lr": "1e-3", ...}`` (raw strings)."""
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        if "=" not in item:
            hydra = re.fullmatch(r"~[a-z_]+(\.\w+)*", item)  # Hydra's delete, of a section's key or a top one
            hint = "" if hydra else _split_by_shell(items, i)
            if hydra:
                hint = f"; a key is never removed: give it the value you want, {item[1:]}=VALUE (null where it takes none)"
            elif not hint and item.endswith((".yaml", ".yml")):
                hint = f"; a config file is given as -c {item}"
            elif (
                not hint and not item.startswith("~") and (Path(item) / STUDY_YAML).is_file()
            ):  # a study's folder
                hint = f"; a study's folder is given as -c {Path(item) / STUDY_YAML}"
            elif not hint and _a_folder(item):
                hint = f"; a dataset's folder (timm's DATA_DIR) is given as data.root={item}"
            raise ConfigError(f"override {item!r} is not key=value (e.g. transfer.mode=copy){hint}")
        key, raw = item.split("=", 1)
        if key.startswith("+"):  # Hydra's append (+key=) and force (++key=): every key exists
            raise ConfigError(
                f"override {item!r}: overrides set any key without Hydra's '+' or '++': write {key.lstrip('+')}={raw}"
            )
        parts = key.strip().split(".")
        if not all(parts):  # `=1`, `optim..lr=1`: else an unknown key '' or 'optim.' with far guesses
            named = ".".join(filter(None, parts))
            fix = f"; write {named}={raw}" if named else " (e.g. transfer.mode=copy)"
            raise ConfigError(f"override {item!r} has an empty key{' part' if named else ''}{fix}")
        out[key.strip()] = raw
    return out


def _split_by_shell(items: Sequence[str], i: int, surely: bool = False) -> str:
    """Where ``items[i]`` follows a key=value item: the shell split that value at its spaces (an unquoted
    ``transfer.losses=[{name: mse, signal: v}]``); the whole override, quoted, is what to write. ``surely``:
    only where that value is a list or mapping still open before ``items[i]`` ("" otherwise)."""
    start = i
    while start > 0 and "=" not in items[start - 1]:
        start -= 1
    if start == 0:
        return ""
    end = i + 1
    while end < len(items) and "=" not in items[end]:
        end += 1
    whole, value = " ".join(items[start - 1 : end]), " ".join(items[start - 1 : i]).split("=", 1)[1]
    if sum(map(value.count, "[{")) > sum(map(value.count, "]}")):  # a list or mapping left open: surely split
        return f"; the shell split {items[start - 1]!r} at its spaces: quote the whole override, {whole!r}"
    return "" if surely else f"; if it is part of the value before it, quote the whole override: {whole!r}"


def continues_a_value(items: Sequence[str], i: int) -> bool:
    """Whether ``items[i]`` is a piece of a list or mapping a key=value before it left open: ``-1]`` of an
    unquoted ``transfer.layers=[0, -1]``, split by the shell, is no flag though it starts with ``-``."""
    return bool(_split_by_shell(items, i, surely=True))


class _Into(dict):
    """The keys a dotted override names inside a field: merged into the field's value (a dict such as
    ``model.kwargs``), not replacing it, as Hydra and OmegaConf users expect; ``model.kwargs={...}`` still
    replaces the whole value."""


def _merged_into(current: Any, keys: _Into, where: str) -> Any:
    # a list is given whole, as a typed list is (`_coerce`), and so is a value: curriculum.0.epochs=1 and
    # patch_size.0=3 would make them mappings; where nothing is (absent, null), the keys make one
    if current is not None and not isinstance(current, Mapping):
        k, v = next(iter(keys.items()))
        if isinstance(current, list):
            raise ConfigError(f"{where}.{k}: a list is not set item by item; give it whole: {where}=[...]")
        said = "..." if isinstance(v, _Into) else yaml_value(v)
        raise ConfigError(f"{where}.{k}: {where} holds a value, not a mapping; set it whole: {where}={said}")
    merged = dict(current) if isinstance(current, Mapping) else {}
    for k, v in keys.items():
        merged[k] = _merged_into(merged.get(k), v, f"{where}.{k}") if isinstance(v, _Into) else v
    return merged


def merged_into_base(data: Mapping[str, Any]) -> _Into:
    """A recipe's keys read as dotted overrides of its base: each mapping in it is merged into the base's
    value, key by key (lists, other values and an empty mapping, ``{}``, replace theirs)."""
    return _Into({k: merged_into_base(v) if isinstance(v, Mapping) and v else v for k, v in data.items()})


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = _Into()
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, _Into())
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return nested


#: YAML's spellings of null, which a key that takes text only would read as text
NULLS = ("null", "Null", "NULL", "~")


class TypedStr(str):
    """A string a YAML file already typed (a study's ``model.global_pool: ''``): `apply_overrides` keeps it as
    it is for a key that takes a string, where a command line's ``model.global_pool=`` is refused (no value);
    for any other key it is parsed (study.yaml quotes a ``--vary`` value: ``seed: "1"``)."""


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], command: str | None = None) -> Any:
    """Set dotted keys; string values of non-string fields are parsed as YAML (``[0,1]``, ``null``, ``true``),
    but for a `TypedStr`; a string field's only where quoted (``run_dir='runs/my run'``), else as written.
    ``command``: as `merge_values`'s."""
    parsed = {}
    for key, value in overrides.items():
        field: Any = type(cfg)  # the key's annotation (None where it names no field)
        for part in key.split("."):
            field = field_types(field).get(part) if dataclasses.is_dataclass(field) else None
        takes = typing.get_args(field)
        takes_null = field is None or type(None) in takes
        # a key that takes a name or a list of them (convert.attention) reads a quoted "[a,b]" as --vary did
        kept = isinstance(value, TypedStr) and str in takes and list not in map(typing.get_origin, takes)
        quoted = field is str and isinstance(value, str) and re.fullmatch(r"'.*'|\".*\"", value, re.DOTALL)
        # `key=$UNSET`: null would silently be the default, and a name '' (log.project=) no name at all; a
        # YAML file's '' for a text key is kept as written
        typed_text = isinstance(value, TypedStr) and field is str
        if isinstance(value, str) and not kept and not typed_text and not value.strip():
            empty = f" ({key}=\"''\" for an empty string)" if str in takes else ""
            null = f", or {key}=null for null" if takes_null else ""
            raise ConfigError(
                f"override {key}= has no value (an unset shell variable?); give one{null}{empty}"
            )
        if (
            field is str
            and isinstance(value, str)
            and not isinstance(value, TypedStr)
            and value.strip() in NULLS
        ):
            # as written, a folder named 'null' (run_dir=null wrote ./null) or the home folder (run_dir=~)
            raise ConfigError(
                f"override {key}={value.strip()}: {key} takes text, not null; give one (quoted, {key}=\"'{value.strip()}'\", "
                "for the text itself)"
            )
        if isinstance(value, str) and not kept and (field is not str or quoted):
            try:
                typed = load_yaml(value)
            except yaml.YAMLError as e:
                raise ConfigError(
                    f"override {key}={value!r}: value is not valid YAML ({describe_yaml_error(e)})"
                ) from None
            # a number given to a key that takes a string keeps its spelling (teacher.revision=1.10, not '1.1')
            number = isinstance(typed, int | float) and not isinstance(typed, bool)
            value = value if number and str in takes else typed
        parsed[key] = value
    data = _nest(parsed)
    return refuse_unread_blr(data, validate_config(merge_values(cfg, data, command=command)))


def refuse_unread_blr(data: Mapping[str, Any], cfg: Any) -> Any:
    """``cfg``, which ``data`` (overrides, or a recipe over its base) was applied to; an ``optim.blr`` that
    ``data`` sets without ``optim.lr`` where the config's lr is set (a recipe's) would go unread, as lr wins:
    a `ConfigError` naming both, since MAE's users scale blr by the batch and expect it to count."""
    optim = getattr(cfg, "optim", None)
    if (
        optim is None
        or optim.lr is None
        or not find_key(data, "optim.blr")[0]
        or find_key(data, "optim.lr")[0]
    ):
        return cfg
    raise ConfigError(
        f"optim.blr={optim.blr:g} would go unread: optim.lr={optim.lr:g} is already set and wins over blr; set "
        "optim.lr to null as well (optim.lr=null) to use lr = blr x global batch / 256, or set optim.lr instead"
    )
