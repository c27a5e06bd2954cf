"""Zoo attentions in hierarchical teachers (PVTv2, Swin): layers in stages, swapped through their family's
conversion slot; ``convert.attention`` may list one name per stage (`group_stages`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ...errors import InputError
from ..attention import group_stages
from ..attention.registry import get_attention_class
from ..attention.slots import ConversionSlot, slot_of


def flat_blocks(model: nn.Module, required: bool = False) -> nn.ModuleList | None:
    """``blocks`` or ``encoder.blocks`` of a ViT-like model; None for a model without one (a TypeError if
    ``required``)."""
    for holder in (model, getattr(model, "encoder", None)):
        blocks = getattr(holder, "blocks", None)
        if isinstance(blocks, nn.ModuleList | nn.Sequential):
            return blocks
    if required:
        raise TypeError(f"expected a timm VisionTransformer with .blocks, got {type(model).__name__}")
    return None


def hierarchical_slots(model: nn.Module) -> list[tuple[str, nn.Module, type[ConversionSlot]]]:
    """(qualified name, parent block, slot) of every convertible attention layer of a model without
    a flat block sequence, in forward order; empty otherwise."""
    if flat_blocks(model) is not None:
        return []
    return [
        (name, model.get_submodule(name.rsplit(".", 1)[0]), slot)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "attn" and (slot := slot_of(module)) is not None
    ]


def is_hierarchical(model: nn.Module) -> bool:
    """A model whose attention layers sit in stages (no flat block sequence) and convert, stage by stage."""
    return bool(hierarchical_slots(model))


def stage_of_layers(model: nn.Module) -> list[int]:
    """The stage index of each convertible attention layer, in forward order (`group_stages`)."""
    stages = group_stages([name for name, _, _ in hierarchical_slots(model)])
    return [s for s, (_, layers) in enumerate(stages) for _ in layers]


def expand_attention_names(attention: str | Sequence[str], stages: Sequence[int], what: str) -> list[str]:
    """One name per attention layer from one name, one per layer, or one per stage (``stages``: each
    layer's stage); any other count is an error naming the layout."""
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
    """Replace every attention layer in place (layer i gets ``names[i]`` with ``options[i]``)."""
    slots = hierarchical_slots(model)
    options = [{} for _ in slots] if options is None else list(options)
    if len(names) != len(slots) or len(options) != len(slots):
        raise ValueError(
            f"one attention name and one options dict per attention layer: the model has {len(slots)}, got "
            f"{len(names)} names and {len(options)} option dicts"
        )
    for index, ((qualified, block, slot), name, opts) in enumerate(zip(slots, names, options)):
        zoo = get_attention_class(name)
        if not slot.keeps(zoo):  # as a flat model's: a family's softmax may be the teacher's own layer
            block.attn = slot.build(block.attn, zoo, depth=index, layout=None, options=opts, where=qualified)
    return model
