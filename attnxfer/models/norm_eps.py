"""A copy of a teacher whose norms become what its recorded construction arguments build.

A teacher can be built with arguments no JSON value names: transformers' ViT and BEiT normalise with
LayerNorm eps 1e-12 (timm's default is 1e-6), which only a ``functools.partial`` norm layer expresses. The
teacher keeps that eps (so it computes exactly what transformers computes), and its recorded arguments
leave the partial out (``_teacher_only_args``). A student made by copying such a teacher (a converted
student) would keep the eps too, and then differ from everything that rebuilds it from those arguments: its
export (timm's ``create_model``, transformers' timm wrapper, ``load_student``). So the copy takes the eps of
the model its arguments build, and is exactly what it exports; it starts a relative ~1e-6 / variance off
the teacher, which its own training absorbs.
"""

from __future__ import annotations

import timm
import torch
from timm.models import get_model_args
from torch import nn

# create_model arguments that are runtime settings, not architecture (and would not build on meta)
_RUNTIME = ("pretrained_model_args", "pretrained_strict", "device", "dtype", "features_only", "out_indices")


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "eps", None), float)


def _recorded_build(model: nn.Module) -> nn.Module:
    """The model's architecture built (on the meta device, no memory) from its recorded arguments."""
    arch = model.pretrained_cfg["architecture"]
    args = {k: v for k, v in get_model_args(model).items() if k not in _RUNTIME and k != "attn_layer"}
    with torch.device("meta"):
        try:
            return timm.create_model(arch, pretrained=False, **args)
        except TypeError as e:  # a family that takes any input size (PVTv2) records none to take back
            if "'img_size'" not in str(e):
                raise
            return timm.create_model(
                arch, pretrained=False, **{k: v for k, v in args.items() if k != "img_size"}
            )


def norms_as_recorded(model: nn.Module) -> nn.Module:
    """``model`` (a copy of a teacher) with every norm's eps set to what its recorded arguments build, and
    no longer marked as holding arguments it does not record. A model without such arguments is returned
    as it is."""
    if not getattr(model, "_teacher_only_args", ()):
        return model
    recorded = {name: m.eps for name, m in _recorded_build(model).named_modules() if _is_norm(m)}
    for name, m in model.named_modules():
        if name in recorded and _is_norm(m):
            m.eps = recorded[name]
    del model._teacher_only_args
    return model
