"""Conversion slots: how a zoo attention takes a softmax layer's place. What moves in, with which arguments,
how the family's blocks call the new layer and which zoo attentions a family refuses are the family's own:
its adapter names a `ConversionSlot`, and the swap asks the slot, never the family."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .adapters import adapter_for
from .interface import COUNTERPART_MODULES, TransferableAttention


@dataclass(frozen=True)
class TokenLayout:
    """A flat model's prefix tokens and patch grid (None: the attention infers it per call)."""

    prefix: int
    grid: tuple[int, int] | None


class ConversionSlot:
    """How a zoo attention takes the place of one family's attention layer: declared, never built (class
    methods); ``build`` is the entry point, subclasses change the parts that differ for their family."""

    #: The call the family's blocks make, as methods placed before the zoo class's; None: timm's call.
    call: ClassVar[type | None] = None

    @classmethod
    def keeps(cls, zoo: type[nn.Module]) -> bool:
        """The teacher's layer stays as it is when ``zoo`` is chosen for it."""
        return False

    @classmethod
    def refusal(cls, zoo: type[nn.Module]) -> str | None:
        """Why ``zoo`` cannot take this family's layer, or None."""
        return None

    @classmethod
    @functools.cache
    def zoo_class(cls, zoo: type[nn.Module]) -> type[nn.Module]:
        """``zoo`` with the slot's ``call`` before it (made once per pair)."""
        if cls.call is None:
            return zoo
        return type(
            f"{cls.call.__name__}{zoo.__name__}",
            (cls.call, zoo),
            {"__module__": cls.call.__module__, "conversion_slot": cls},
        )

    @classmethod
    def config(cls, old: nn.Module, zoo: type[nn.Module], layout: TokenLayout | None) -> dict[str, Any]:
        """Constructor arguments for ``old``'s head layout and the model's token layout."""
        config = attention_config(old)
        if layout is not None:
            config.update(num_prefix_tokens=layout.prefix, grid_size=layout.grid)
            if zoo.accepts_option("seq_len") and layout.grid is not None:
                config["seq_len"] = layout.prefix + layout.grid[0] * layout.grid[1]
        return config

    @classmethod
    def moved(cls, old: nn.Module) -> dict[str, nn.Module]:
        """The teacher layer's modules that move into the new one, by the name they take there."""
        found = {
            name: fused_qkv(old) if name == "qkv" else getattr(old, name, None)
            for name in COUNTERPART_MODULES
        }
        return {name: module for name, module in found.items() if module is not None}

    @classmethod
    def finish(cls, new: nn.Module, old: nn.Module, layout: TokenLayout | None, where: str) -> None:
        """Whatever else the new layer takes from ``old`` (``where`` names the layer in a refusal)."""

    @classmethod
    def build(
        cls,
        old: nn.Module,
        zoo: type[nn.Module],
        *,
        depth: int,
        layout: TokenLayout | None,
        options: dict[str, Any],
        where: str,
    ) -> nn.Module:
        """``zoo`` in ``old``'s place, in ``old``'s device, dtype and mode."""
        config = {**cls.config(old, zoo, layout), "depth": depth, **options}
        moved = cls.moved(old)
        reference = next(itertools.chain.from_iterable(m.parameters() for m in moved.values()))
        new = cls.zoo_class(zoo)(**config).to(device=reference.device, dtype=reference.dtype)
        for name, module in moved.items():
            setattr(new, name, module)
        cls.finish(new, old, layout, where)
        new.train(old.training)
        return new


def slot_of(attn: nn.Module) -> type[ConversionSlot] | None:
    """The conversion slot of a layer's family (its class's, else its adapter's), or None."""
    slot = getattr(type(attn), "conversion_slot", None)
    if slot is None and not isinstance(attn, TransferableAttention):
        slot = getattr(adapter_for(type(attn)), "conversion_slot", None)
    return slot


def attention_config(attn: nn.Module) -> dict[str, Any]:
    fused = isinstance(getattr(attn, "qkv", None), nn.Linear)
    separate = all(isinstance(getattr(attn, f"{c}_proj", None), nn.Linear) for c in "qkv")
    missing = [name for name in ("proj", "num_heads") if not hasattr(attn, name)]
    if missing or not (fused or separate):
        raise TypeError(
            f"cannot convert {type(attn).__name__}: expected a timm Attention with a fused qkv Linear "
            f"(or q_proj/k_proj/v_proj), proj and num_heads (missing: {missing or ['qkv']})"
        )
    if getattr(attn, "gate", None) is not None:
        raise TypeError(
            "gated timm attention (gated=True) has no efficient counterpart here; use a non-gated teacher"
        )
    dim = attn.qkv.in_features if fused else attn.q_proj.in_features
    rows = attn.qkv.out_features // 3 if fused else attn.q_proj.out_features
    head_dim = getattr(attn, "head_dim", rows // attn.num_heads)
    if attn.proj.out_features != dim:
        raise TypeError("attention with dim_out != dim is not supported")
    return dict(
        dim=dim,
        num_heads=attn.num_heads,
        attn_head_dim=head_dim,
        qkv_bias=fused_qkv(attn).bias is not None,
        proj_bias=attn.proj.bias is not None,
        attn_drop=getattr(getattr(attn, "attn_drop", None), "p", 0.0),
        proj_drop=getattr(getattr(attn, "proj_drop", None), "p", 0.0),
    )


def fused_qkv(attn: nn.Module) -> nn.Linear:
    """The teacher's q/k/v projection as one fused ``qkv`` Linear, exactly: separate q/k/v biases folded in,
    separate projections stacked with grouped k/v heads repeated (as timm repeats them after projecting)."""
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        if getattr(attn, "q_bias", None) is None:
            return qkv
        return new_linear(qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    groups = int(getattr(attn, "num_kv_groups", 1))
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]

    def heads(t: torch.Tensor, repeat: int) -> torch.Tensor:
        if repeat == 1:
            return t
        return t.reshape(-1, attn.head_dim, *t.shape[1:]).repeat_interleave(repeat, 0).flatten(0, 1)

    reps = (1, groups, groups)
    weight = torch.cat([heads(p.weight.detach(), r) for p, r in zip(projs, reps)])
    bias = None
    if any(p.bias is not None for p in projs):  # q and v biased, k not (a zero bias)
        biases = [p.weight.new_zeros(p.out_features) if p.bias is None else p.bias.detach() for p in projs]
        bias = torch.cat([heads(b, r) for b, r in zip(biases, reps)])
    return new_linear(weight, bias)


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new Linear holding copies of ``weight`` and ``bias``, on their device and in their dtype."""
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fused = fused.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if bias is not None:
            fused.bias.copy_(bias)
    return fused
