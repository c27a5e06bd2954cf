"""Efficient-attention students built from a softmax teacher: a deep copy whose attention layers go through
their family's conversion slot (`attnxfer.models.attention.slots`), so the teacher's projections and norms
move in unchanged and only the new attention parameters start fresh."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from ...errors import InputError
from ...speak import warn
from ..attention import (
    MapKind,
    attention_layers,
    attention_name_of,
    families,
    make_transfer_aware,
    require_model,
    transferable_attentions,
)
from ..attention.interface import TransferableAttention
from ..attention.registry import get_attention_class
from ..attention.slots import ConversionSlot, TokenLayout, slot_of
from ..image_input import find_patch_embedding, image_input
from ..norm_eps import norms_as_recorded
from .base import EfficientAttention, GridFitError
from .hierarchical import (
    expand_attention_names,
    flat_blocks,
    hierarchical_slots,
    is_hierarchical,
    stage_of_layers,
    swap_hierarchical,
)


def teacher_token_layout(model: nn.Module) -> tuple[int, tuple[int, int] | None]:
    """(num_prefix_tokens, grid_size) of a timm ViT-like model; grid None when it resizes its grid."""
    holder = next(
        (m for m in (model, getattr(model, "encoder", None)) if hasattr(m, "num_prefix_tokens")), None
    )
    if holder is None or find_patch_embedding(model) is None:
        raise TypeError(
            f"expected a timm VisionTransformer (a patch embedding, num_prefix_tokens), got {type(model).__name__}"
        )
    embed = find_patch_embedding(model)[1]
    dynamic = getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_size", False)
    grid = () if dynamic else image_input(model).grid
    return int(holder.num_prefix_tokens), (tuple(grid) if len(grid) == 2 else None)


def configure_token_layout(model: nn.Module) -> nn.Module:
    """Tell every attention in a timm ViT that meets the interface its prefix-token count and patch grid."""
    prefix, grid = teacher_token_layout(model)
    for module in model.modules():
        if isinstance(module, TransferableAttention):
            module.set_token_layout(prefix, grid)
    return model


def efficient_student_from_teacher(
    teacher: nn.Module,
    attn: str | Sequence[str],
    **attn_kwargs: Any,
) -> nn.Module:
    """A copy of ``teacher`` (a timm ViT, left untouched) with each block's attention replaced: ``attn`` is
    one name or one per block; options go to the attentions that accept them (one none accepts is an error);
    ``seq_len`` (Linformer) defaults to the teacher's token count. A teacher whose layers are not softmax
    attention of a family that converts is refused as `build_efficient_student` refuses it: the copy would
    drop what those layers add (a bias, a temperature)."""
    blocks = flat_blocks(teacher, required=True)
    if not isinstance(attn, str) and len(attn) != len(blocks):
        raise InputError(
            f"attn lists one attention per block: the teacher has {len(blocks)} blocks, got {len(attn)} names"
        )
    student = copy.deepcopy(teacher)
    check_softmax_teacher(student)  # on the copy: the teacher is left as it was given
    student = with_attention(student, attn, **attn_kwargs)
    # a loaded teacher (or one a TeacherStudent used) is frozen, and so is its deep copy: the student trains
    return student.requires_grad_(True)


def with_attention(model: nn.Module, attn: str | Sequence[str], **attn_kwargs: Any) -> nn.Module:
    """``model`` with each block's attention replaced in place (names and options as
    `efficient_student_from_teacher`): a fresh student (``model.attention`` of `attnxfer train`) or a converted
    one. A hierarchical model takes one name, one per stage or one per attention layer."""
    hierarchical = is_hierarchical(model)
    if hierarchical:
        names = expand_attention_names(attn, stage_of_layers(model), "model.attention")
    else:
        try:
            blocks = flat_blocks(model, required=True)
        except TypeError:  # Swin V2: no ViT blocks, and no slot of a hierarchical family either
            raise _no_zoo_attention(model) from None
        names = [attn] * len(blocks) if isinstance(attn, str) else list(attn)
        if len(names) != len(blocks):
            raise InputError(
                f"{len(names)} attention names for {len(blocks)} blocks: give one name for all blocks or exactly "
                "one per block"
            )
    classes = check_options(names, attn_kwargs)
    options = [{k: v for k, v in attn_kwargs.items() if cls.accepts_option(k)} for cls in classes]
    model = (swap_hierarchical if hierarchical else swap_attentions)(model, names, options)
    # not in swap_attentions: an export made before still loads. Refused where it fits no layer: a hierarchical
    # model's later stages have smaller grids, where the core clamps a size the first stages use
    errors: dict[type, list[InputError | None]] = {}
    # linformer's fixed length is checked against a dynamic-size model's grid at the size it was built for
    built_grid = () if hierarchical else image_input(model).grid
    covering: list[str] = []  # each attention's exact-at-its-grid note (a window over all of it), said once
    for attn in transferable_attentions(model):
        if isinstance(attn, EfficientAttention):
            errors.setdefault(type(attn), []).append(attn.grid_fit_error(built_grid))
            if (note := attn.covers_grid(built_grid)) and note not in covering:
                covering.append(note)
    for found in errors.values():
        if all(found):
            raise found[0]
    for note in covering:
        warn(f"warning: {note}")
    return model


def refuses_an_option(error: Exception, options: Mapping[str, Any]) -> bool:
    """Whether an attention's refusal is of one of the user's ``options``: a value check names its option
    first ("bits must be >= 1, got 0"), and a default too large for the grid is set there too
    (`GridFitError`). The caller then says the error under the key the options sit in."""
    return (
        isinstance(error, GridFitError) or str(error.args[0] if error.args else "").split(" ")[0] in options
    )


def check_attention_names(attention: str | Sequence[str], key: str) -> None:
    """An `InputError` under ``key`` (and the item's index, in a list) for an unknown name in ``attention`` or a
    parametric one whose spec is wrong (formula:...): which of a list of one name per block to fix."""
    for i, name in enumerate([attention] if isinstance(attention, str) else attention):
        try:
            get_attention_class(name)
        except (KeyError, ValueError) as e:  # ValueError: a parametric name whose spec is wrong
            raise InputError(f"{key if isinstance(attention, str) else f'{key}[{i}]'}: {e.args[0]}") from None


def check_options(names: Sequence[str], options: Mapping[str, Any]) -> list[type[nn.Module]]:
    """The attentions ``names`` are; a `TypeError` naming each option none of them takes (a recipe's options
    for its own attention, left behind when another attention is named on the command line), one of
    another kind than the constructor annotates, or one a constructor has no default for and is not given."""
    classes = [get_attention_class(name) for name in names]
    unused = [k for k in options if not any(c.accepts_option(k) for c in classes)]
    if unused:
        theirs = {n: c.own_options() for n, c in zip(names, classes)}
        raise TypeError(
            f"no chosen attention accepts option(s) {unused} (their options: {theirs}): drop them (or, in a "
            "config, set the key to {} to drop every option, a recipe's for its own attention too); where a "
            "run's own config.yaml gives them, it was trained with other code of that attention, which alone "
            "rebuilds what it trained"
        )
    for name, cls in zip(names, classes):  # a value of another kind than the constructor annotates
        for option, value in options.items():
            annotation = getattr(_parameter(cls, option), "annotation", "?")
            # as written: a string where the module defers annotations, else the object (float, not "<class 'float'>")
            written = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            kinds = written.replace("collections.abc.", "").split(" | ")
            if all(k in _KINDS for k in kinds) and not any(_KINDS[k][1](value) for k in kinds):
                raise TypeError(
                    f"{option} must be {' or '.join(_KINDS[k][0] for k in kinds)} for {name}, got {value!r}"
                )
    # an option with no default, not given: else Python's "missing 1 required keyword-only argument" mid-build
    # (seq_len is not: the swap gives it the model's token count, models/attention/slots.py)
    for name, cls in zip(names, classes):
        own = cls.own_options() if hasattr(cls, "own_options") else []
        missing = [
            o
            for o in own
            if o not in options
            and o != "seq_len"
            and getattr(_parameter(cls, o), "default", None) is inspect.Parameter.empty
        ]
        if missing:
            example = ", ".join(f"{o}: ..." for o in missing)
            raise TypeError(
                f"{name} has no default for its option(s) {missing}: set them in the key, e.g. {{{example}}}"
            )
    return classes


def options_in_effect(names: Sequence[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of the attentions ``names`` with the options `with_attention` builds it with: those of ``options``
    it takes, its own options not given at their defaults (written out or left out, a default is the same)."""
    classes = {name: get_attention_class(name) for name in names}
    return {
        name: {
            **{o: _parameter(cls, o).default for o in cls.own_options()},
            **{k: v for k, v in options.items() if cls.accepts_option(k)},
        }
        for name, cls in classes.items()
    }


def _parameter(cls: type[nn.Module], option: str) -> inspect.Parameter | None:
    """``option`` as the constructor that first declares it along ``cls``'s MRO takes it (its default, its
    annotation)."""
    found = (
        inspect.signature(k.__init__).parameters.get(option) for k in cls.__mro__ if "__init__" in vars(k)
    )
    return next((p for p in found if p is not None), None)


#: The option kinds zoo constructors annotate, as YAML gives them (a bool is no number): unchecked,
#: num_features=2.5 was cut to 2, "64" read as 64 and true taken as 1. A plug-in's own types go unchecked.
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("None (null in a config)", lambda v: v is None),
    "Sequence[int]": (
        "a list of integers",
        lambda v: isinstance(v, (list, tuple)) and all(map(_KINDS["int"][1], v)),
    ),
}


def swap_attentions(
    model: nn.Module,
    names: Sequence[str],
    options: Sequence[dict[str, Any]] | None = None,
) -> nn.Module:
    """Replace each block's attention in place: block i gets ``names[i]`` with ``options[i]``, the old
    layer's shapes and projections; how a student is made from a teacher copy and rebuilt from its export."""
    blocks = flat_blocks(model, required=True)
    depth = len(blocks)
    options = [{} for _ in range(depth)] if options is None else list(options)
    if len(names) != depth or len(options) != depth:
        raise InputError(
            f"one attention name and one options dict per block: the model has {depth} blocks, got "
            f"{len(names)} names and {len(options)} option dicts"
        )
    classes = [get_attention_class(name) for name in names]
    try:
        layout = TokenLayout(*teacher_token_layout(model))
    except TypeError:  # Hiera: blocks, but no ViT's tokens
        raise _no_zoo_attention(model) from None
    for index, (block, cls, opts) in enumerate(zip(blocks, classes, options)):
        old = block.attn
        slot = slot_of(old) or ConversionSlot  # any fused-qkv softmax layer builds as timm's plain one does
        if slot.keeps(cls):
            continue
        # BEiT's layer: its block passes it the bias; softmax keeps the family's own layer, bias and all
        if slot_of(old) is None and getattr(old, "has_logit_bias", False):
            if cls.map_kind is MapKind.SOFTMAX:
                continue
            raise InputError(
                f"blocks.{index} is {timm_class(old)}, whose logits add a relative-position bias, which "
                f"{names[index]} attention never forms (it makes no N x N logits): that family takes no zoo "
                "attention; give the student one that does (model.name=..., model.mirror_teacher=false), or "
                "leave its attention softmax"
            )
        reason = slot.refusal(cls)
        if reason:
            raise InputError(f"blocks.{index}: {reason}")
        block.attn = slot.build(old, cls, depth=index, layout=layout, options=opts, where=f"blocks.{index}")
    found = find_patch_embedding(model) if layout.grid is None else None  # a dynamic-size model's
    if found and not any(getattr(h, "func", 0) is _tell_grid for h in found[1]._forward_hooks.values()):
        found[1].register_forward_hook(functools.partial(_tell_grid, model))  # a partial: the model pickles
    return model


def _no_zoo_attention(model: nn.Module) -> InputError:
    converting = ", ".join(f.title for f in families() if f.converts)
    return InputError(
        f"{type(model).__name__} takes no zoo attention: its family has no conversion slot (the families that "
        f"do: {converting})"
    )


def _tell_grid(model: nn.Module, embed: nn.Module, args: tuple, out: Any) -> None:
    """Hand the attentions of a dynamic-size ``model`` the patch grid of the image just cut (timm's
    ``dynamic_img_size`` embedding gives B, H, W, C): a non-square grid is not inferable from the tokens."""
    if isinstance(out, torch.Tensor) and out.ndim == 4:
        for module in model.modules():
            if isinstance(module, TransferableAttention):
                module.input_grid = (int(out.shape[1]), int(out.shape[2]))


def new_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every attention parameter without a softmax counterpart."""
    for module_name, module in model.named_modules():
        if isinstance(module, TransferableAttention):
            for name in module.new_parameter_names():
                yield (f"{module_name}.{name}" if module_name else name), module.get_parameter(name)


def check_softmax_teacher(teacher: nn.Module) -> None:
    """Refuse a teacher that is not softmax in every layer or whose family has no conversion slot:
    one error naming the layer, the reason and what to do. Makes the teacher transfer-aware in place."""
    require_model(teacher)
    hierarchical = is_hierarchical(teacher)  # its layers are listed by their slots: each has one
    if hierarchical:
        layers = zip((n for n, *_ in hierarchical_slots(teacher)), transferable_attentions(teacher))
    else:
        try:
            make_transfer_aware(teacher)
            layers = attention_layers(teacher)
        except TypeError as e:
            raise InputError(f"the teacher cannot be converted: {e}") from None
        if flat_blocks(teacher) is None and not layers:  # a family's layers (Swin V2) say why below
            raise InputError(
                f"the teacher ({type(teacher).__name__}) is not a timm VisionTransformer (no `blocks`): "
                "conversion swaps the attention of each of its `blocks`. Distil it into a student of its own "
                "family with `attnxfer train` instead"
            )
    for name, attn in layers:
        if attn.map_kind is not MapKind.SOFTMAX:
            raise InputError(
                f"the teacher's {name} is {attention_name_of(attn)!r}, not softmax attention: conversion needs "
                "a softmax teacher (its attention maps are what the student learns). Use the original "
                "pretrained model as teacher, not an already converted student"
            )
        if not hierarchical and slot_of(attn) is None:
            raise InputError(_unconvertible(name, attn))


def _unconvertible(name: str, attn: TransferableAttention) -> str:
    """Why a softmax teacher layer has no zoo counterpart, and what to do instead."""
    converting = ", ".join(f.title for f in families() if f.converts)
    instead = (
        "Distil this teacher into a student of its own family (`attnxfer train`, the default student), or "
        f"convert a teacher of a family that converts ({converting})"
    )
    if attn.has_logit_bias:
        return (
            f"the teacher's {name} is {timm_class(attn)}, whose logits add a relative-position bias: a "
            "linear or low-rank attention never forms the N x N logits a bias is added to, so conversion "
            f"would drop it. {instead}"
        )
    return (
        f"the teacher's {name} is {timm_class(attn)} (windows, head mixing or class-attention rows): "
        f"its family has no conversion slot, so conversion would drop them. {instead}"
    )


def timm_class(module: nn.Module) -> str:
    """The timm class an adapter was swapped from (its first base defined in timm)."""
    timm_bases = (c for c in type(module).__mro__ if c.__module__.startswith("timm."))
    return next((f"{c.__module__}.{c.__name__}" for c in timm_bases), "?")


def build_efficient_student(
    teacher: nn.Module,
    attention: str | Sequence[str],
    *,
    num_classes: int | None = None,
    **attention_kwargs: Any,
) -> nn.Module:
    """The converted student: a trainable copy of ``teacher`` with zoo attention in every layer; ``num_classes``
    gives a headless teacher (e.g. an MAE encoder) a fresh head, a head of another size is an error."""
    check_softmax_teacher(teacher)
    if is_hierarchical(teacher):  # one name, one per stage or one per attention layer
        names = expand_attention_names(attention, stage_of_layers(teacher), "convert.attention")
    else:
        depth = len(flat_blocks(teacher))
        names = [attention] * depth if isinstance(attention, str) else list(attention)
        if len(names) != depth:
            raise InputError(
                f"convert.attention lists {len(names)} attention{'s' * (len(names) != 1)} but the teacher has "
                f"{depth} blocks; give one name for all blocks or exactly one per block"
            )
    # an unknown name is refused before the teacher is copied
    check_attention_names(attention, "convert.attention")
    try:
        student = with_attention(copy.deepcopy(teacher), names, **attention_kwargs)
    except TypeError as e:  # an option no chosen attention takes, or a value its constructor cannot take
        raise InputError(f"convert.attention_kwargs: {e}") from None
    student = norms_as_recorded(student)  # the eps its export will have (a transformers teacher's 1e-12)
    student.requires_grad_(True)  # a loaded teacher is frozen, and so is its deep copy
    if num_classes is not None and num_classes != student.num_classes:
        if student.num_classes:
            raise InputError(
                f"the teacher classifies {student.num_classes} classes but the data has {num_classes}; "
                "convert on the teacher's label set, or use a headless teacher (num_classes=0) "
                "whose student gets a new head"
            )
        student.reset_classifier(num_classes)
    return student


def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth for fine-tuning, timm's rule: block i drops with ``rate * i / (depth - 1)``."""
    if rate < 0 or rate >= 1:
        raise InputError(f"drop_path_rate must be in [0, 1), got {rate}")
    flat = flat_blocks(model)
    blocks = list(flat) if flat is not None else [b for _, b, *_ in hierarchical_slots(model)]
    for i, blk in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return model
