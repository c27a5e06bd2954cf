"""A copy of a teacher whose norms take the eps its recorded construction arguments build. transformers' ViT
and BEiT normalise with LayerNorm eps 1e-12, which only a ``functools.partial`` (left out of the recorded
arguments) expresses; a converted student keeping it would differ from its own export, so it takes the
rebuilt eps (a relative ~1e-6 / variance off the teacher, which its training absorbs)."""

from __future__ import annotations

import torch
from timm.models import get_model_args
from torch import nn

from .vit import create_dropping

# create_model arguments that are runtime settings, not architecture (and would not build on meta)
_RUNTIME = ("pretrained_model_args", "pretrained_strict", "device", "dtype", "features_only", "out_indices")


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "eps", None), float)


def _recorded_build(model: nn.Module) -> nn.Module:
    """The model's architecture built on the meta device from its recorded arguments."""
    arch = model.pretrained_cfg["architecture"]
    args = {k: v for k, v in get_model_args(model).items() if k not in _RUNTIME and k != "attn_layer"}
    with torch.device("meta"):  # a family that takes any input size (PVTv2) records none to take back
        return create_dropping(arch, False, args, optional=("img_size",))


def norms_as_recorded(model: nn.Module) -> nn.Module:
    """``model`` (a copy of a teacher) with every norm's eps set to what its recorded arguments build."""
    if not getattr(model, "_teacher_only_args", ()):
        return model
    recorded = {name: m.eps for name, m in _recorded_build(model).named_modules() if _is_norm(m)}
    for name, m in model.named_modules():
        if name in recorded and _is_norm(m):
            m.eps = recorded[name]
    del model._teacher_only_args
    return model
