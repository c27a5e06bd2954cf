"""Efficient-attention students built from a softmax teacher.

The student is a deep copy of the teacher in which each block's ``attn`` is replaced: the
teacher's ``qkv``, ``q_norm``, ``k_norm``, ``norm`` and ``proj`` modules move into the new
attention unchanged (they are the copy's own tensors), everything outside attention is copied by
the deep copy, and only the new attention parameters start fresh.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

from timm.layers import DropPath
from torch import nn

from ...errors import InputError
from ..attention import (
    MapKind,
    TransferAttention,
    attention_name_of,
    make_transfer_aware,
    transfer_attentions,
)
from ..attention.interface import COUNTERPART_MODULES, TransferableAttention
from ..attention.registry import get_attention_class

__all__ = [
    "build_efficient_student",
    "check_softmax_teacher",
    "configure_token_layout",
    "efficient_student_from_teacher",
    "new_parameters",
    "set_drop_path",
    "swap_attentions",
    "teacher_token_layout",
    "with_attention",
]


def teacher_token_layout(model: nn.Module) -> tuple[int, tuple[int, int] | None]:
    """(num_prefix_tokens, grid_size) of a timm ViT; grid None when the model resizes its grid."""
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise TypeError(
            f"expected a timm VisionTransformer (patch_embed, num_prefix_tokens), got {type(model).__name__}"
        )
    dynamic = getattr(model, "dynamic_img_size", False) or getattr(
        model.patch_embed, "dynamic_img_size", False
    )
    grid = None if dynamic else tuple(model.patch_embed.grid_size)
    return int(model.num_prefix_tokens), grid


def configure_token_layout(model: nn.Module) -> nn.Module:
    """Tell every attention in a timm ViT that meets the interface its prefix-token count and patch grid."""
    prefix, grid = teacher_token_layout(model)
    for module in model.modules():
        if isinstance(module, TransferableAttention):
            module.set_token_layout(prefix, grid)
    return model


def _attention_config(attn: nn.Module) -> dict:
    """Constructor arguments that reproduce a timm ``Attention``'s shapes."""
    missing = [name for name in ("qkv", "proj", "num_heads") if not hasattr(attn, name)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise TypeError(
            f"cannot convert {type(attn).__name__}: expected a timm Attention with a fused qkv Linear, "
            f"proj and num_heads (missing: {missing or ['fused qkv']})"
        )
    if getattr(attn, "gate", None) is not None:
        raise TypeError(
            "gated timm attention (gated=True) has no efficient counterpart here; use a non-gated teacher"
        )
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * attn.num_heads))
    if attn.proj.out_features != attn.qkv.in_features:
        raise TypeError("attention with dim_out != dim is not supported")
    return dict(
        dim=attn.qkv.in_features,
        num_heads=attn.num_heads,
        attn_head_dim=head_dim,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        attn_drop=getattr(getattr(attn, "attn_drop", None), "p", 0.0),
        proj_drop=getattr(getattr(attn, "proj_drop", None), "p", 0.0),
    )


def efficient_student_from_teacher(
    teacher: nn.Module,
    attn: str | Sequence[str],
    **attn_kwargs,
) -> nn.Module:
    """A copy of ``teacher`` (a timm VisionTransformer) with each block's attention replaced.

    Args:
        teacher: the softmax teacher; left untouched.
        attn: one registered attention name for every block, or a list with one name per block
            (e.g. ``['window_linear'] * 8 + ['softmax'] * 4``).
        **attn_kwargs: attention options. In a mixed list each option goes to the attentions
            that accept it; an option no chosen attention accepts is an error. ``seq_len``
            (Linformer) defaults to the teacher's token count.
    """
    blocks = getattr(teacher, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a timm VisionTransformer with .blocks, got {type(teacher).__name__}")
    if not isinstance(attn, str) and len(attn) != len(blocks):
        raise InputError(
            f"attn lists one attention per block: the teacher has {len(blocks)} blocks, got {len(attn)} names"
        )
    return with_attention(copy.deepcopy(teacher), attn, **attn_kwargs)


def with_attention(model: nn.Module, attn: str | Sequence[str], **attn_kwargs) -> nn.Module:
    """``model`` (a timm VisionTransformer) with each block's attention replaced in place: one registered
    name for every block or one per block, options as `efficient_student_from_teacher` takes them. On a
    freshly initialised model this is a fresh efficient-attention student (``model.attention`` of
    `attnxfer train`); on a teacher's copy, a converted one."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a timm VisionTransformer with .blocks, got {type(model).__name__}")
    depth = len(blocks)
    names: list[str] = [attn] * depth if isinstance(attn, str) else list(attn)
    if len(names) != depth:
        raise InputError(
            f"attn lists one attention per block: the model has {depth} blocks, got {len(names)} names"
        )
    classes = [get_attention_class(name) for name in names]
    unused = [k for k in attn_kwargs if not any(c.accepts_option(k) for c in classes)]
    if unused:
        options = {n: c.own_options() for n, c in zip(names, classes)}
        raise TypeError(f"no chosen attention accepts option(s) {unused}; their options: {options}")

    options = [{k: v for k, v in attn_kwargs.items() if cls.accepts_option(k)} for cls in classes]
    return swap_attentions(model, names, options)


def swap_attentions(
    model: nn.Module,
    names: Sequence[str],
    options: Sequence[dict[str, Any]] | None = None,
) -> nn.Module:
    """Replace each block's attention of ``model`` (a timm VisionTransformer) in place.

    Block i gets ``names[i]`` built with the old attention's shapes, the model's token layout and
    ``options[i]`` (its own options, as ``TransferableAttention.options()`` reports them); the old
    ``qkv``, ``q_norm``, ``k_norm``, ``norm`` and ``proj`` modules move into it unchanged. This is how
    a student is made from a teacher copy, and how an exported student is rebuilt from its spec.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a timm VisionTransformer with .blocks, got {type(model).__name__}")
    depth = len(blocks)
    options = [{} for _ in range(depth)] if options is None else list(options)
    if len(names) != depth or len(options) != depth:
        raise InputError(
            f"one attention name and one options dict per block: the model has {depth} blocks, got "
            f"{len(names)} names and {len(options)} option dicts"
        )
    classes = [get_attention_class(name) for name in names]
    prefix, grid = teacher_token_layout(model)
    for index, (block, cls, opts) in enumerate(zip(model.blocks, classes, options)):
        old = block.attn
        config = _attention_config(old)
        config.update(num_prefix_tokens=prefix, grid_size=grid, depth=index)
        if cls.accepts_option("seq_len") and grid is not None:
            config["seq_len"] = prefix + grid[0] * grid[1]
        config.update(opts)
        weight = old.qkv.weight
        new = cls(**config).to(device=weight.device, dtype=weight.dtype)
        for name in COUNTERPART_MODULES:
            counterpart = getattr(old, name, None)
            if counterpart is not None:
                setattr(new, name, counterpart)  # the old model's own modules: exact, not shared
        new.train(old.training)
        block.attn = new
    return model


def new_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every attention parameter without a softmax counterpart."""
    for module_name, module in model.named_modules():
        if isinstance(module, TransferableAttention):
            for name in module.new_parameter_names():
                yield (f"{module_name}.{name}" if module_name else name), module.get_parameter(name)


def check_softmax_teacher(teacher: nn.Module) -> None:
    """A teacher for conversion runs softmax attention in every block (its maps are the target).

    Makes the teacher transfer-aware in place (timm's ``Attention`` -> ``TransferAttention``, a class swap
    as `DualViT` does), then reads each layer's declared map kind.
    """
    if getattr(teacher, "blocks", None) is None:
        raise InputError(
            f"the teacher ({type(teacher).__name__}) is not a timm VisionTransformer (no `blocks`)"
        )
    for i, attn in enumerate(transfer_attentions(make_transfer_aware(teacher))):
        if attn.map_kind is MapKind.SOFTMAX and not isinstance(attn, TransferAttention):
            raise InputError(
                f"the teacher's blocks.{i}.attn is {_timm_class(attn)} (rotary embedding "
                "or relative-position bias): conversion builds zoo attentions from timm's plain Attention "
                "and would drop them. Convert a ViT/DeiT teacher, or distil this teacher into a student of "
                "its own family (attnxfer train)"
            )
        if attn.map_kind is not MapKind.SOFTMAX:
            name = attention_name_of(attn)
            raise InputError(
                f"the teacher's blocks.{i}.attn is {name!r}, not softmax attention: conversion needs a "
                "softmax teacher (its attention maps are what the student learns). Use the original "
                "pretrained model as teacher, not an already converted student"
            )


def _timm_class(module: nn.Module) -> str:
    """The timm class an adapter was swapped from (its first base defined in timm)."""
    timm_bases = (c for c in type(module).__mro__ if c.__module__.startswith("timm."))
    return next((f"{c.__module__}.{c.__name__}" for c in timm_bases), "?")


def _attention_names(attention: str | Sequence[str], depth: int) -> list[str]:
    names = [attention] * depth if isinstance(attention, str) else list(attention)
    if len(names) != depth:
        raise InputError(
            f"convert.attention lists {len(names)} attentions but the teacher has {depth} blocks; give "
            "one name for all blocks or exactly one per block"
        )
    for name in names:
        try:
            get_attention_class(name)
        except (KeyError, ValueError) as e:  # ValueError: a family name whose spec is wrong (formula:...)
            raise InputError(f"convert.attention: {e.args[0]}") from None
    return names


def build_efficient_student(
    teacher: nn.Module,
    attention: str | Sequence[str],
    *,
    num_classes: int | None = None,
    **attention_kwargs: Any,
) -> nn.Module:
    """The converted student: a trainable copy of ``teacher`` with zoo attention in every block.

    ``num_classes`` gives a headless teacher (``num_classes=0``, e.g. an MAE encoder) a fresh head;
    a teacher whose head has another number of classes is an error (its head would not fit).
    """
    check_softmax_teacher(teacher)
    names = _attention_names(attention, len(teacher.blocks))
    try:
        student = efficient_student_from_teacher(teacher, names, **attention_kwargs)
    except TypeError as e:
        raise InputError(f"convert.attention_kwargs: {e}") from None
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
    """Stochastic depth for fine-tuning a converted student, timm's rule: block i drops with
    ``rate * i / (depth - 1)``. (A loaded teacher, and so its copy, has none.)"""
    if rate < 0 or rate >= 1:
        raise InputError(f"drop_path_rate must be in [0, 1), got {rate}")
    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate * i / max(1, depth - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return model
