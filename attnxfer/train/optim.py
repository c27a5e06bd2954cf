"""Optimiser parameter groups for a student (alone or in a `TeacherStudent`: the teacher and frozen q/k are
never the optimiser's), grouped by timm (no weight decay on biases, norms, position embedding and prefix
tokens; with ``layer_decay`` each group's ``lr_scale``), and AdamW.

Two conventions for who gets which power of the layer decay exist (depth D, block i): ``timm`` (timm's and
MAE's) gives block i decay^(D-i) and the stem decay^(D+1); ``attention_transfer`` (the paper's code, whose
helper runs on the teacher-student model with ``num_layers = student depth``) gives block i decay^(D-1-i),
the last block the full lr, and the stem decay^D. Head and ``fc_norm`` get 1.0 under both; timm 1.0.31
puts the final ``norm`` in the last block's group (decay^1 under ``timm``, 1.0 under ``attention_transfer``;
`tests/training/test_layer_decay.py` pins both poolings).

`build_adamw` picks AdamW's implementation: torch's fused kernel on CUDA and CPU (on this project's 2-core
CPU a ViT-Ti step took 7.4 ms fused, 20 ms per-tensor, 28 ms ``foreach``), ``foreach`` elsewhere.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from ..errors import InputError
from ..models.attention import require_model
from .devices import member


class LayerDecayRule(StrEnum):
    """Who gets which power of the layer decay (see the module docstring)."""

    TIMM = "timm"
    ATTENTION_TRANSFER = "attention_transfer"  # every group one power higher: the last block at the full lr


def student_param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    layer_decay_rule: LayerDecayRule | str = LayerDecayRule.TIMM,
) -> list[dict[str, Any]]:
    """Param groups for AdamW of a student ViT or a `TeacherStudent`'s student, by ``layer_decay_rule``."""
    rule = member(LayerDecayRule, layer_decay_rule, "layer_decay_rule")
    require_model(model)
    if not weight_decay >= 0 or (layer_decay is not None and not 0 < layer_decay <= 1):
        # a negative decay or scale climbs the loss instead of descending it, silently
        raise InputError(
            f"weight_decay must be >= 0 and layer_decay in (0, 1], got {weight_decay}, {layer_decay}"
        )
    student = getattr(model, "student", model)
    skip = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    # every bias by name: timm's layer-decay grouping exempts 1-d tensors only (its plain grouping biases by
    # name too), so a per-head 2-d bias (hedgehog's, formula's feature maps) would decay with layer_decay alone
    skip |= {name for name, _ in student.named_parameters() if name.endswith(".bias")}
    if layer_decay is not None and layer_decay < 1.0:
        groups = param_groups_layer_decay(
            student, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
        )
        if rule is LayerDecayRule.ATTENTION_TRANSFER:
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


class AdamWImplementation(StrEnum):
    """Which of torch's AdamW implementations steps the parameters."""

    FUSED = "fused"  # one kernel for all parameters (optimizer state and step counters on the device)
    FOREACH = "foreach"  # multi-tensor ops, step counters on the host


def adamw_implementation(device: torch.device | str) -> AdamWImplementation:
    """Fused on CUDA and CPU (torch >= 2.4 has the kernel; faster on both), ``foreach`` on any other device."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return AdamWImplementation.FUSED if fused else AdamWImplementation.FOREACH


def build_adamw(
    groups: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device: torch.device | str,
    implementation: AdamWImplementation | str | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` in the implementation `adamw_implementation` picks for ``device`` (or the one
    given): the single place every trainer gets its optimiser from."""
    impl = AdamWImplementation(implementation) if implementation else adamw_implementation(device)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **{impl.value: True})


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> str:
    """``fused``, ``foreach`` or ``for-loop``: how ``optimizer`` (or the one an accelerate wrapper holds) steps
    (what run.json records)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    defaults = getattr(inner, "defaults", {})
    if defaults.get("fused"):
        return AdamWImplementation.FUSED.value
    if defaults.get("foreach"):
        return AdamWImplementation.FOREACH.value
    return "for-loop"
