"""Zoo attentions in hierarchical teachers: the swap, stage by stage.

A hierarchical model keeps its attention layers inside stages (no one flat sequence of blocks), and its
blocks call them with their own arguments. Each layer whose family converts is replaced through its
family's conversion slot (`attnxfer.models.attention.slots`: what moves in, how the blocks call the zoo
attention — PVTv2 over every token of a stage, Swin inside the teacher's windows; the family files say
how). Stages are the one grouping of attention layers (`attnxfer.models.attention.group_stages`), so
``convert.attention`` may list one name per stage.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from ...errors import InputError
from ..attention import group_stages
from ..attention.interface import TransferableAttention
from ..attention.registry import get_attention_class
from ..attention.slots import ConversionSlot, slot_of


def flat_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The one flat sequence of blocks of a ViT-like model: ``blocks``, or ``encoder.blocks`` where the
    model keeps an encoder; None for a model without one."""
    for holder in (model, getattr(model, "encoder", None)):
        blocks = getattr(holder, "blocks", None)
        if isinstance(blocks, nn.ModuleList | nn.Sequential):
            return blocks
    return None


def hierarchical_slots(model: nn.Module) -> list[tuple[str, nn.Module, type[ConversionSlot]]]:
    """(qualified name, parent block, conversion slot) of every attention layer a zoo attention can take in a
    model without one flat block sequence, in forward order; empty for a model that has one (a ViT's
    ``blocks``) or whose families do not convert."""
    if flat_blocks(model) is not None:
        return []
    slots = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "attn":
            continue
        slot = slot_of(module)
        if slot is not None:
            slots.append((name, model.get_submodule(name.rsplit(".", 1)[0]), slot))
    return slots


def is_hierarchical(model: nn.Module) -> bool:
    """A model whose attention layers sit in stages (no flat block sequence) and convert, stage by stage."""
    return bool(hierarchical_slots(model))


def stage_of_layers(model: nn.Module) -> list[int]:
    """The stage index of each convertible attention layer, in forward order (`group_stages`)."""
    stages = group_stages([name for name, _, _ in hierarchical_slots(model)])
    return [s for s, (_, layers) in enumerate(stages) for _ in layers]


def expand_attention_names(attention: str | Sequence[str], stages: Sequence[int], what: str) -> list[str]:
    """One name per attention layer from one name, one per layer, or one per stage (``stages``: each layer's
    stage index); any other count is a ValueError naming the layout."""
    if isinstance(attention, str):
        return [attention] * len(stages)
    names = list(attention)
    if len(names) == len(stages):
        return names
    order = sorted(set(stages))
    if len(names) == len(order):
        by_stage = dict(zip(order, names))
        return [by_stage[s] for s in stages]
    per_stage = ", ".join(str(stages.count(s)) for s in order)
    raise InputError(
        f"{what} lists {len(names)} attentions but the teacher has {len(stages)} attention layers in "
        f"{len(order)} stages ({per_stage} per stage); give one name for all, one per stage "
        f"({len(order)}) or one per layer ({len(stages)})"
    )


def swap_hierarchical(
    model: nn.Module, names: Sequence[str], options: Sequence[dict[str, Any]] | None = None
) -> nn.Module:
    """Replace every attention layer of a hierarchical ``model`` in place (layer i gets ``names[i]`` with
    ``options[i]``), each through its family's conversion slot."""
    slots = hierarchical_slots(model)
    options = [{} for _ in slots] if options is None else list(options)
    if len(names) != len(slots) or len(options) != len(slots):
        raise ValueError(
            f"one attention name and one options dict per attention layer: the model has {len(slots)}, got "
            f"{len(names)} names and {len(options)} option dicts"
        )
    for index, ((qualified, block, slot), name, opts) in enumerate(zip(slots, names, options)):
        block.attn = slot.build(
            block.attn, get_attention_class(name), depth=index, layout=None, options=opts, where=qualified
        )
    return model


def build_hierarchical_student(
    teacher: nn.Module, attention: str | Sequence[str], what: str = "convert.attention", **attention_kwargs
) -> nn.Module:
    """A trainable copy of a hierarchical ``teacher`` with zoo attentions in its attention layers:
    ``attention`` is one name, one per stage or one per layer; options go to the attentions that take them."""
    slots = hierarchical_slots(teacher)
    for qualified, block, _ in slots:
        if isinstance(block.attn, TransferableAttention) and block.attn.attention_name not in ("", "softmax"):
            raise InputError(
                f"the teacher's {qualified} is {block.attn.attention_name!r}, not softmax attention: "
                "conversion needs a softmax teacher. Use the original pretrained model as teacher"
            )
    names = expand_attention_names(attention, stage_of_layers(teacher), what)
    classes = []
    for name in names:
        try:
            classes.append(get_attention_class(name))
        except (KeyError, ValueError) as e:
            raise InputError(f"{what}: {e.args[0]}") from None
    unused = [k for k in attention_kwargs if not any(c.accepts_option(k) for c in classes)]
    if unused:
        raise InputError(f"{what}_kwargs: no chosen attention accepts option(s) {unused}")
    options = [{k: v for k, v in attention_kwargs.items() if c.accepts_option(k)} for c in classes]
    student = swap_hierarchical(copy.deepcopy(teacher), names, options)
    student.requires_grad_(True)
    return student
