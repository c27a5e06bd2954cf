"""The speed floor of an efficient student: attention that projects but mixes no tokens, out = proj(norm(v)).

Whatever an efficient attention does, it still computes the q/k/v projections (with the q/k norms and
a teacher's rotary embedding), the output norm and projection, and the whole model around attention
(patch embedding, MLPs, norms, head). The floor computes exactly that and nothing more: each token
"attends" only to itself, q and k are computed and dropped. Its speed is the ceiling of every converted
student at that resolution that computes those projections, so a student's speed is read twice: against the
teacher (what a user gains) and against the floor (how much of its own attention cost is left). (A feature map
folded into qkv that is narrower than q and k, Hedgehog's default, projects less and can sit a hair above it.)

The registered ``none`` attention is no floor: its branch adds nothing and it skips the projections
too, which no attention that mixes tokens can.

`FloorAttention` is deliberately *not* registered: a registered name would make ``convert``,
``search`` and the attention listings offer it as a student, yet it mixes nothing (its map is the
identity, there is nothing to distil) and a model built with it is useless except as a stopwatch's
reference. `floor_model` builds one from a teacher or a converted student.
"""

from __future__ import annotations

import copy

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
    """q, k and v projected as the layer always does; the core returns v unchanged (no token mixing).

    Usable on its own (``timm.create_model(..., attn_layer=FloorAttention)``) and as a mixin before any
    zoo class (`floor_class`), where it keeps that class's call signature, projections and token layout
    and replaces only the core."""

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
        """v itself: every token's output is its own value (masks select keys, and there are none to pick)."""
        return v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    def folds(self) -> bool:
        """Never: a kernel attention's folded inference path (`KernelAttention`) skips ``attend``, and the
        floor keeps the layer's own q/k/v projection, which costs what a folded one does."""
        return False

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        return OpCounts()


_FLOOR_CLASSES: dict[type, type] = {}


def floor_class(cls: type[EfficientAttention]) -> type[EfficientAttention]:
    """``cls`` with its core replaced by the floor's (made once per class): a PVTv2 / Swin slot, a Gemma4
    student layer or a rope layer keeps its own forward and projections."""
    if issubclass(cls, FloorAttention):
        return cls
    if cls not in _FLOOR_CLASSES:
        _FLOOR_CLASSES[cls] = type(f"Floor{cls.__name__}", (FloorAttention, cls), {"__module__": __name__})
    return _FLOOR_CLASSES[cls]


def _attention_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every attention layer the zoo swaps: flat ``blocks`` or stage slots."""
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
    """A copy of ``model`` whose every attention layer is a floor (``model`` is left untouched).

    ``model`` is a softmax teacher of a family conversion takes (ViT/DeiT, NaFlexViT, rope EVA-02 / DINOv3 /
    PE / Qwen3-ViT, Gemma4-ViT, PVTv2, Swin: swapped as `build_efficient_student` swaps it, so the floor has
    the projections a converted student of it has, e.g. PVTv2 without spatial reduction) or a converted
    student whose every layer is a zoo attention (each layer becomes the floor of its own class in place).
    A student that kept softmax layers has the same floor as its teacher: take that one.
    """
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
