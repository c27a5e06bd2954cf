"""Optimiser parameter groups for a student (alone or inside a `DualViT`).

Only the student's trainable parameters are grouped: the teacher is not a
submodule, and the q/k projections of copied layers are frozen buffers
(`PartialQKV`), so neither can reach the optimiser. Grouping itself is timm's
(`param_groups_layer_decay` / `param_groups_weight_decay`): biases, norms,
position embedding and prefix tokens get no weight decay, and with
``layer_decay`` each group carries an ``lr_scale`` the scheduler multiplies in.

Two conventions for who gets which power of the decay exist in the wild (depth D, block i):

- ``timm`` (timm's and MAE's rule on a plain ViT): block i gets decay^(D-i), the stem decay^(D+1);
- ``attention_transfer`` (the paper's reference code, whose lr-decay helper runs on the dual model with
  ``num_layers = student depth``): block i gets decay^(D-1-i), so the last block trains at the full lr,
  and the stem gets decay^D.

Head, fc_norm and the final norm get 1.0 under both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

__all__ = ["LAYER_DECAY_RULES", "LayerDecayRule", "student_param_groups"]


class LayerDecayRule(StrEnum):
    """Who gets which power of the layer decay (see the module docstring)."""

    TIMM = "timm"
    ATTENTION_TRANSFER = "attention_transfer"

    @property
    def shifts_one_layer_up(self) -> bool:
        """Every group one power of the decay higher (the last block at the full lr)."""
        return self is LayerDecayRule.ATTENTION_TRANSFER


LAYER_DECAY_RULES = tuple(LayerDecayRule)


def student_param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    no_weight_decay: Iterable[str] = (),
    layer_decay_rule: LayerDecayRule | str = LayerDecayRule.TIMM,
) -> list[dict[str, Any]]:
    """Param groups for AdamW; ``model`` is a student ViT (plain timm or ours) or a `DualViT` (its
    student is used). ``layer_decay_rule`` picks the convention above (``timm`` or ``attention_transfer``)."""
    try:
        rule = LayerDecayRule(layer_decay_rule)
    except ValueError:
        raise ValueError(
            f"layer_decay_rule must be one of {', '.join(LAYER_DECAY_RULES)}, got {layer_decay_rule!r}"
        ) from None
    student = getattr(model, "student", model)
    skip = set(no_weight_decay)
    if hasattr(student, "no_weight_decay"):
        skip |= set(student.no_weight_decay())
    if layer_decay is not None and layer_decay < 1.0:
        groups = param_groups_layer_decay(
            student, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
        )
        if rule.shifts_one_layer_up:
            groups = [dict(g, lr_scale=_one_layer_up(g["lr_scale"], layer_decay)) for g in groups]
    else:
        groups = param_groups_weight_decay(student, weight_decay=weight_decay, no_weight_decay_list=skip)
    return [g for g in groups if g["params"]]


def _one_layer_up(scale: float, decay: float) -> float:
    """timm's decay^e becomes decay^(e-1) for every e >= 1 (stem and blocks); the head's 1.0 stays."""
    if not 0 < decay < 1 or scale <= 0:
        return scale
    power = round(math.log(scale) / math.log(decay))
    return decay ** max(power - 1, 0)
