"""Optimiser parameter groups for a student (alone or inside a `DualViT`).

Only the student's trainable parameters are grouped: the teacher is not a
submodule, and the q/k projections of copied layers are frozen buffers
(`PartialQKV`), so neither can reach the optimiser. Grouping itself is timm's
(`param_groups_layer_decay` / `param_groups_weight_decay`): biases, norms,
position embedding and prefix tokens get no weight decay, and with
``layer_decay`` each group carries an ``lr_scale`` the scheduler multiplies in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

__all__ = ["student_param_groups"]


def student_param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    no_weight_decay: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Param groups for AdamW; ``model`` is a student ViT or a `DualViT` (its student is used)."""
    student = getattr(model, "student", model)
    skip = set(no_weight_decay)
    if hasattr(student, "no_weight_decay"):
        skip |= set(student.no_weight_decay())
    if layer_decay is not None and layer_decay < 1.0:
        groups = param_groups_layer_decay(
            student, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
        )
    else:
        groups = param_groups_weight_decay(student, weight_decay=weight_decay, no_weight_decay_list=skip)
    return [g for g in groups if g["params"]]
