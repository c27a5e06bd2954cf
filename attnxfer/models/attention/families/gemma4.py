"""The Gemma4-ViT family: timm's ``Gemma4Attention`` as a softmax `TransferableAttention` (logits q kᵀ at
scale 1 after RMS norms and a 2-D rope passed per call; grouped k/v heads repeated as timm does) and its
conversion slot. Zoo attentions build their maps around timm's d^-1/2, so the scale 1 is folded into q and
k: (q d^1/4)·(k d^1/4)·d^-1/2 = q·k, the teacher's logits, for every kernel."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from timm.models.gemma4_vit import Gemma4Attention, apply_multidimensional_rope

from ....errors import InputError
from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of
from ..partial_qkv import _to_buffer
from ..slots import TokenLayout
from ..softmax import SoftmaxCore
from ._projections import HeadsAttnDim
from ._rope import RopeSlot


class Gemma4Slot:
    """Before a zoo attention class: Gemma4's call signature and projections."""

    #: The teacher layer's logit scale (Gemma4: 1); stage 1 builds the teacher's maps with it.
    teacher_logit_scale = 1.0

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if rope is None and rope_cos is not None:
            rope = torch.stack((rope_cos, rope_sin))
        return self.transfer_forward(x, attn_mask=attn_mask, rope=rope)  # `project` below takes rope=None

    def call_extras(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The rope of a call ``attn(x, cos, sin)`` as cos and sin stacked, as stage 1 replays it."""
        if len(args) == 3 and args[1] is not None:
            return {"rope": torch.stack(args[1:])}
        rope = kwargs.get("rope")
        return {"rope": rope} if rope is not None else {}

    def project(
        self, x: torch.Tensor, which: str = "qkv", rope: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if rope is not None and not self.rope_keeps_map_kind:
            raise InputError(self.rope_refusal())
        cos, sin = (None, None) if rope is None else (rope[0], rope[1])
        fold = self.head_dim**0.25
        return {c: t * fold if c != "v" else t for c, t in gemma4_heads(self, x, which, cos, sin).items()}


class Gemma4Conversion(RopeSlot):
    """A zoo attention in a Gemma4 layer's place: its projections and norms move in."""

    call = Gemma4Slot

    @classmethod
    def config(cls, old: nn.Module, zoo: type[nn.Module], layout: TokenLayout | None) -> dict[str, Any]:
        return dict(
            dim=old.q_proj.linear.weight.shape[1],
            num_heads=old.num_heads,
            attn_head_dim=old.head_dim,
            qkv_bias=False,
            proj_bias=old.o_proj.linear.bias is not None,
            attn_drop=old.attn_drop.p,
            proj_drop=old.proj_drop.p,
            num_prefix_tokens=layout.prefix if layout is not None else None,
            grid_size=layout.grid if layout is not None else None,
        )

    @classmethod
    def moved(cls, old: nn.Module) -> dict[str, nn.Module]:
        names = ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "v_norm")
        return {**{n: getattr(old, n) for n in names}, "proj": old.o_proj, "norm": nn.Identity()}

    @classmethod
    def finish(cls, new: nn.Module, old: nn.Module, layout: TokenLayout | None, where: str) -> None:
        del new.qkv
        new.num_kv_heads, new.num_kv_groups = old.num_kv_heads, old.num_kv_groups


@register_adapter(Gemma4Attention)
class TransferGemma4Attention(HeadsAttnDim, SoftmaxCore, Gemma4Attention):
    conversion_slot = Gemma4Conversion

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if rope is not None:  # cos and sin stacked, as capture records them (stage 1, map agreement)
            rope_cos, rope_sin = rope[0], rope[1]
        if self.io is None:
            return Gemma4Attention.forward(self, x, rope_cos, rope_sin, attn_mask=attn_mask)
        return self.transfer_forward(x, attn_mask=attn_mask, rope_cos=rope_cos, rope_sin=rope_sin)

    def project(
        self,
        x: torch.Tensor,
        which: str = "qkv",
        rope_cos: torch.Tensor | None = None,
        rope_sin: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if rope is not None:
            rope_cos, rope_sin = rope[0], rope[1]
        return gemma4_heads(self, x, which, rope_cos, rope_sin)

    def logit_scale(self, q: torch.Tensor) -> float:
        return 1.0

    call_extras = Gemma4Slot.call_extras  # the same block call, the same rope

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return self.proj_drop(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        for c in set(chunks):
            _to_buffer(getattr(self, f"{c}_proj").linear, "weight", "bias")
            if c in "qk":
                getattr(self, f"{c}_norm").requires_grad_(False)


def gemma4_heads(
    attn: nn.Module,
    x: torch.Tensor,
    which: str = "qkv",
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """q/k/v heads (B, H, N, d) as ``Gemma4Attention.forward`` makes them (adapter and converted student)."""
    B, N, _ = x.shape
    out = {}
    for c in "qkv":
        if c not in which:
            continue
        heads = attn.num_heads if c == "q" else attn.num_kv_heads
        t = getattr(attn, f"{c}_proj")(x).view(B, N, heads, attn.head_dim)
        t = getattr(attn, f"{c}_norm")(t)
        if c != "v" and rope_cos is not None:
            t = apply_multidimensional_rope(t, rope_cos, rope_sin, ndim=2, unsqueeze_dim=2)
        t = t.transpose(1, 2)
        if c != "q" and attn.num_kv_groups > 1:
            t = t.repeat_interleave(attn.num_kv_groups, dim=1)
        out[c] = t
    return out


def gemma4_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """Whole patches; with its soft-token pooler, a patch grid of whole k×k pooling cells."""
    encoder = getattr(model, "encoder", model)
    patch = [int(p) for p in encoder.patch_embed.patch_size]
    if getattr(encoder, "global_pool", None) != "soft":
        return tilings_of(patch, what=f"{patch[0]} px patches")
    k = int(encoder.pooling_kernel_size)
    return tilings_of([p * k for p in patch], what=f"{patch[0]} px patches in {k}x{k} pooling cells")


FAMILY = register_family(
    Family(
        name="gemma4",
        title="Gemma4-ViT",
        patch_embedding="encoder.patch_embed",
        rope=True,
        modules=(ModuleCoverage("gemma4_vit", 4, 4, 4, ("inspect", "convert", "export")),),
        sizes=ImageSizes(
            tilings=gemma4_tilings,
            how="positions looked up per patch and the rope per call: nothing to resample",
        ),
    )
)
