"""The speed floor of an efficient student: the layer's projections, norms and rope with no token mixing,
out = proj(norm(v)). A student's speed is read against the teacher (what a user gains) and against its
floor (how much of its own attention cost is left). Not registered: it would be offered as a student, yet
it mixes nothing; the registered ``none`` is no floor, as it skips the projections too."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from ...errors import InputError
from ..attention.interface import MapKind
from ..attention.numerics import PrecisionPolicy
from ..attention.opcount import OpCounts
from .base import EfficientAttention
from .hierarchical import hierarchical_slots, is_hierarchical
from .swap import check_softmax_teacher, flat_blocks, with_attention

#: The zoo attention a softmax teacher's layers are swapped to before they become floors: no parameters of
#: its own, accepted by every family the swap knows (rope and Gemma4 included), so the floor keeps exactly
#: the projections, norms, rope and block calls a converted student of that teacher has.
_CARRIER = "relu_linear"


class FloorAttention(EfficientAttention):
    """q, k, v projected as the layer does; the core returns v. A mixin before any zoo class
    (`floor_class`) keeps that class's signature, projections and layout."""

    map_kind = MapKind.NONE
    attention_name = "floor"
    rope_keeps_map_kind = True
    rope_why = "no map: rope rotates q and k, which the floor computes and drops"
    precision = PrecisionPolicy(fp32=("nothing is summed over tokens",), why="the core returns v as it is")

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        return v

    def folds(self) -> bool:
        """Never: a folded path would skip ``attend`` (and costs what the layer's own projection does)."""
        return False

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        return OpCounts()


@functools.cache
def floor_class(cls: type[EfficientAttention]) -> type[EfficientAttention]:
    """``cls`` with the floor's core (one class per ``cls``): PVTv2 / Swin / Gemma4 / rope layers keep
    their own forward and projections."""
    if issubclass(cls, FloorAttention):
        return cls
    return type(f"Floor{cls.__name__}", (FloorAttention, cls), {"__module__": __name__})


def _attention_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if is_hierarchical(model):
        return [(name, block.attn) for name, block, _ in hierarchical_slots(model)]
    blocks = flat_blocks(model)
    if blocks is None:
        raise InputError(
            f"floor_model: {type(model).__name__} has neither a ViT's blocks nor stage slots a zoo attention takes"
        )
    prefix = "blocks" if getattr(model, "blocks", None) is blocks else "encoder.blocks"
    return [(f"{prefix}.{i}.attn", block.attn) for i, block in enumerate(blocks)]


def floor_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every attention layer a floor: a softmax teacher of a family conversion
    takes (swapped as `build_efficient_student` would) or a student whose every layer is a zoo attention. A
    student that kept softmax layers has its teacher's floor."""
    floor = copy.deepcopy(model)
    if not any(isinstance(m, EfficientAttention) for m in floor.modules()):
        check_softmax_teacher(floor)
        with_attention(floor, _CARRIER)
    for name, attn in _attention_slots(floor):
        if not isinstance(attn, EfficientAttention):
            raise InputError(
                f"floor_model: {name} is {type(attn).__name__} (softmax) in a student with zoo attentions; a "
                "student that keeps softmax layers has its teacher's floor: call floor_model(teacher)"
            )
        attn.__class__ = floor_class(type(attn))
    return floor
