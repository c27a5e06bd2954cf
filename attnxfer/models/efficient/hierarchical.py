"""Zoo attentions in hierarchical teachers (timm PVTv2, Swin): the swap, stage by stage.

A hierarchical model keeps its attention layers at ``stages.S.blocks.B.attn`` (PVTv2) or
``layers.S.blocks.B.attn`` (Swin), and its blocks call them with their own arguments. Each layer is
replaced by a *slot*: a subclass of the chosen zoo class whose ``forward`` takes those arguments.

* **PVTv2** (``attn(x, feat_size)``): the zoo attention runs over **all tokens of the stage** (EcoFormer's
  setting for its hashing attention: keys and values are not sub-sampled), its grid is the stage's
  ``feat_size`` at each call. The teacher's ``q`` and ``kv`` Linears become the fused ``qkv`` (rows q, k,
  v, as timm splits ``kv``), ``proj`` moves in; the spatial-reduction modules (``sr``, its ``norm``, the
  ``linear`` variant's pool) are dropped: a kernel attention over N keys costs O(N d²) and needs no
  sub-sampling. With ``sr_ratio > 1`` the teacher's k/v weights were trained on reduced tokens, so they
  are a starting point, not the teacher's own keys.
* **Swin** (``attn(x_windows, mask=...)``): the zoo attention runs **inside the teacher's windows**, so its
  key set is the teacher's (stage 1 compares maps over the same keys) and the block's window partition,
  shift and padding stay timm's. Swin's shift mask (0 / -100 between regions of a shifted window) is
  honoured exactly for row-stochastic maps: the window's map rows are restricted to the query's region and
  renormalised (the kernel attention over that region's keys). The relative-position bias table is
  dropped (zoo attentions have no logit bias). Inside a 7x7 window a kernel attention costs about what
  softmax does (N = 49 ≈ d): Swin conversion changes what the layer computes, not its cost.

`stage_of_layers` gives each attention layer's stage, so ``convert.attention`` may list one name per stage.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import InputError
from ..attention.interface import TransferableAttention
from ..attention.registry import get_attention_class

__all__ = [
    "build_hierarchical_student",
    "expand_attention_names",
    "hierarchical_slots",
    "is_hierarchical",
    "stage_of_layers",
]

#: The timm attention classes a hierarchical student is built from, by family (the class name and module).
_FAMILIES = {
    ("timm.models.pvt_v2", "Attention"): "pvt_v2",
    ("timm.models.swin_transformer", "WindowAttention"): "swin",
}


def _family_of(module: nn.Module) -> str | None:
    """'pvt_v2' / 'swin' for timm's attention classes (or adapters subclassing them), else None."""
    for klass in type(module).__mro__:
        family = _FAMILIES.get((klass.__module__, klass.__name__))
        if family:
            return family
    return None


def hierarchical_slots(model: nn.Module) -> list[tuple[str, nn.Module, int, str]]:
    """(qualified name, parent block, stage, family) of every attention layer of a hierarchical timm model,
    in forward order; empty for a model that is not one (a plain ViT keeps ``blocks``)."""
    slots = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] != "attn" or parts[0] not in ("stages", "layers"):
            continue
        family = getattr(module, "hierarchical_family", None) or _family_of(module)
        if family is None:
            continue
        slots.append((name, model.get_submodule(name.rsplit(".", 1)[0]), int(parts[1]), family))
    return slots


def is_hierarchical(model: nn.Module) -> bool:
    """A timm PVTv2 or Swin model (attention layers inside stages)."""
    return not hasattr(model, "blocks") and bool(hierarchical_slots(model))


def stage_of_layers(model: nn.Module) -> list[int]:
    """The stage index of each attention layer, in forward order."""
    return [stage for _, _, stage, _ in hierarchical_slots(model)]


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


_SLOT_CLASSES: dict[tuple[type, str], type] = {}


def _slot_class(cls: type[TransferableAttention], family: str) -> type[TransferableAttention]:
    """The zoo class ``cls`` with the forward signature the family's blocks call (made once per pair)."""
    key = (cls, family)
    if key not in _SLOT_CLASSES:
        base = _PvtSlot if family == "pvt_v2" else _SwinSlot
        _SLOT_CLASSES[key] = type(f"{base.__name__}{cls.__name__}", (base, cls), {"__module__": __name__})
    return _SLOT_CLASSES[key]


class _PvtSlot:
    """PVTv2's call ``attn(x, feat_size)``: the zoo attention over every token of the stage's grid."""

    hierarchical_family = "pvt_v2"

    def forward(self, x: torch.Tensor, feat_size: Sequence[int] | None = None) -> torch.Tensor:
        if feat_size is not None:
            self.set_token_layout(0, tuple(int(s) for s in feat_size))
        return super().forward(x)


class _SwinSlot:
    """Swin's call ``attn(x_windows, mask=...)``: the zoo attention inside each window, regions of a shifted
    window kept apart (``mask``: timm's (num_windows, N, N) additive 0 / -100)."""

    hierarchical_family = "swin"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = None
        if mask is not None:
            windows = mask.shape[0]
            keep = (mask == 0).unsqueeze(0).expand(x.shape[0] // windows, -1, -1, -1)
            keep = keep.reshape(x.shape[0], 1, *mask.shape[1:])
        return super().forward(x, attn_mask=keep)

    def attend(self, q, k, v, *, attn_mask=None, is_causal=False):
        if attn_mask is None or (attn_mask.dtype == torch.bool and bool(attn_mask.all())):
            return super().attend(q, k, v, is_causal=is_causal)
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"{type(self).__name__} takes a boolean region mask, got {attn_mask.dtype}")
        if not self.map_kind.row_stochastic:
            return torch.zeros_like(v) if not self.map_kind.has_map else _refuse_masked(self)
        # The kernel attention over the query's region: its map rows restricted there and renormalised.
        rows = self.attention_map(q, k) * attn_mask
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
        return (rows @ v.float()).to(v.dtype)

    def region_log_mass(self, q: torch.Tensor, k: torch.Tensor, bias_t: torch.Tensor) -> torch.Tensor:
        """Mean over rows of log(the mass of this layer's window row on the query's region), the regions read
        off a Swin teacher's logit bias (its shift mask adds -100 between regions). The student's output uses
        its rows restricted to the region and renormalised, so CE(P, restricted) = CE(P, row) + this (P is 0
        outside the region): stage 1 adds it to fit what the layer computes. 0 for unshifted windows."""
        keep = bias_t > -50.0  # relative-position biases are O(1); the shift mask is -100
        if bool(keep.all()):
            return q.new_zeros((), dtype=torch.float32)
        rows = self.attention_map(q, k)
        mass = (rows * keep).sum(-1).clamp_min(torch.finfo(rows.dtype).tiny)
        return mass.log().mean()


def _refuse_masked(attn: nn.Module):
    raise InputError(
        f"{attn.attention_name} has a signed map and cannot be restricted to a shifted window's regions; "
        "choose a row-stochastic attention (hashing, relu_linear, performer, ...) for Swin"
    )


def _pvt_config(attn: nn.Module) -> dict[str, Any]:
    """Constructor arguments and the fused qkv of a PVTv2 ``Attention``."""
    qkv = nn.Linear(
        attn.q.in_features, attn.q.out_features + attn.kv.out_features, bias=attn.q.bias is not None
    )
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([attn.q.weight, attn.kv.weight], 0))
        if qkv.bias is not None:
            qkv.bias.copy_(torch.cat([attn.q.bias, attn.kv.bias], 0))
    qkv.to(device=attn.q.weight.device, dtype=attn.q.weight.dtype)
    config = dict(
        dim=attn.dim,
        num_heads=attn.num_heads,
        attn_head_dim=attn.head_dim,
        qkv_bias=attn.q.bias is not None,
        proj_bias=attn.proj.bias is not None,
        attn_drop=attn.attn_drop.p,
        proj_drop=attn.proj_drop.p,
        num_prefix_tokens=0,
    )
    return {"config": config, "modules": {"qkv": qkv, "proj": attn.proj}}


def _swin_config(attn: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a Swin ``WindowAttention`` (its qkv and proj move in unchanged)."""
    head_dim = attn.qkv.out_features // (3 * attn.num_heads)
    config = dict(
        dim=attn.qkv.in_features,
        num_heads=attn.num_heads,
        attn_head_dim=head_dim,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        attn_drop=attn.attn_drop.p,
        proj_drop=attn.proj_drop.p,
        num_prefix_tokens=0,
        grid_size=tuple(attn.window_size),
    )
    return {"config": config, "modules": {"qkv": attn.qkv, "proj": attn.proj}}


def swap_hierarchical(
    model: nn.Module, names: Sequence[str], options: Sequence[dict[str, Any]] | None = None
) -> nn.Module:
    """Replace every attention layer of a hierarchical ``model`` in place (layer i gets ``names[i]`` with
    ``options[i]``); see the module docstring for what each family keeps."""
    slots = hierarchical_slots(model)
    options = [{} for _ in slots] if options is None else list(options)
    if len(names) != len(slots) or len(options) != len(slots):
        raise ValueError(
            f"one attention name and one options dict per attention layer: the model has {len(slots)}, got "
            f"{len(names)} names and {len(options)} option dicts"
        )
    for index, ((_, block, _, family), name, opts) in enumerate(zip(slots, names, options)):
        old = block.attn
        made = _pvt_config(old) if family == "pvt_v2" else _swin_config(old)
        cls = _slot_class(get_attention_class(name), family)
        config = {**made["config"], "depth": index, **opts}
        weight = made["modules"]["qkv"].weight
        new = cls(**config).to(device=weight.device, dtype=weight.dtype)
        for attr, module in made["modules"].items():
            setattr(new, attr, module)
        new.train(old.training)
        block.attn = new
    return model


def build_hierarchical_student(
    teacher: nn.Module, attention: str | Sequence[str], what: str = "convert.attention", **attention_kwargs
) -> nn.Module:
    """A trainable copy of a PVTv2 / Swin ``teacher`` with zoo attentions in its attention layers:
    ``attention`` is one name, one per stage or one per layer; options go to the attentions that take them."""
    slots = hierarchical_slots(teacher)
    for qualified, block, _, _ in slots:
        if isinstance(block.attn, TransferableAttention) and block.attn.attention_name not in ("", "softmax"):
            raise InputError(
                f"the teacher's {qualified} is {block.attn.attention_name!r}, not softmax attention: "
                "conversion needs a softmax teacher. Use the original pretrained model as teacher"
            )
    names = expand_attention_names(attention, [s for _, _, s, _ in slots], what)
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
