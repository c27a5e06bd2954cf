"""timm's PVTv2 ``Attention`` as a softmax `TransferableAttention`: queries over the stage's N tokens, keys
and values over a reduced set (the ``sr`` conv, or the ``linear`` variant's 7×7 pooling), logits s·q kᵀ.

PVTv2 converts with the zoo attention over all tokens of the stage (EcoFormer's setting): ``q`` and ``kv``
become the fused ``qkv``, the reduction modules are dropped (a kernel attention over N keys costs O(N d²)).
With ``sr_ratio > 1`` the teacher's k/v weights were trained on reduced tokens, so stage 1 pools the
student's map onto the teacher's keys (``key_pooling``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models.pvt_v2 import Attention as PvtV2Attention

from ..adapters import register_adapter
from ..family import Family, ImageSizes, ModuleCoverage, Tiling, register_family, tilings_of
from ..key_pooling import KeyPooling
from ..placement import grid_argument
from ..slots import ConversionSlot, TokenLayout, new_linear
from ..softmax import SoftmaxCore
from ._projections import HeadsAttnDim, merged_heads_output
from ._reduced_keys import ReducedKeys, freeze_q_kv, project_q_kv


class PvtSlot:
    """Before a zoo attention class: PVTv2's call ``attn(x, feat_size)``, over every token of the stage."""

    def forward(self, x: torch.Tensor, feat_size: Sequence[int] | None = None) -> torch.Tensor:
        if feat_size is not None:
            self.set_token_layout(0, tuple(int(s) for s in feat_size))
        return super().forward(x)


class PvtV2Conversion(ConversionSlot):
    """A zoo attention in a PVTv2 layer's place: ``q`` and ``kv`` fused into ``qkv``, ``proj`` moved in."""

    call = PvtSlot

    @classmethod
    def config(cls, old: nn.Module, zoo: type[nn.Module], layout: TokenLayout | None) -> dict[str, Any]:
        return dict(
            dim=old.dim,
            num_heads=old.num_heads,
            attn_head_dim=old.head_dim,
            qkv_bias=old.q.bias is not None,
            proj_bias=old.proj.bias is not None,
            attn_drop=old.attn_drop.p,
            proj_drop=old.proj_drop.p,
            num_prefix_tokens=0,
        )

    @classmethod
    def moved(cls, old: nn.Module) -> dict[str, nn.Module]:
        bias = torch.cat([old.q.bias, old.kv.bias]) if old.q.bias is not None else None
        return {"qkv": new_linear(torch.cat([old.q.weight, old.kv.weight]), bias), "proj": old.proj}


@register_adapter(PvtV2Attention)
class TransferPvtV2Attention(HeadsAttnDim, ReducedKeys, SoftmaxCore, PvtV2Attention):
    conversion_slot = PvtV2Conversion

    @property
    def sr_ratio(self) -> int:
        """The stride of the key/value reduction (1: none; 0: the linear variant's fixed 7×7 pooling)."""
        if self.pool is not None:
            return 0
        return int(self.sr.kernel_size[0]) if self.sr is not None else 1

    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        return {"sr_ratio": self.sr_ratio, "linear": self.pool is not None}

    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int] | None:
        return grid_argument(args, kwargs, "feat_size")

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        if self.io is None:
            return PvtV2Attention.forward(self, x, feat_size)
        pooling = self.key_pooling(feat_size)
        if pooling is not None and "k" in self.io.capture:
            self.io.captured["key_pooling"] = pooling  # stage 1 pools a full-token student's map with it
        return self.transfer_forward(x, feat_size=feat_size)

    def key_pooling(self, feat_size: list[int]) -> KeyPooling | None:
        """Which tokens of the stage's grid each reduced key is made from; None without a reduction."""
        if self.pool is not None:
            return KeyPooling.adaptive(feat_size, self.pool.output_size)
        return KeyPooling.strided(feat_size, self.sr_ratio) if self.sr is not None else None

    def reduce(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        B, _, C = x.shape
        if self.pool is None and self.sr is None:
            return x
        grid = x.permute(0, 2, 1).reshape(B, C, *feat_size)
        if self.pool is not None:
            grid = self.pool(grid)
        r = self.norm(self.sr(grid).reshape(B, C, -1).permute(0, 2, 1))
        return self.act(r) if self.act is not None else r

    def project(
        self, x: torch.Tensor, which: str = "qkv", feat_size: list[int] | None = None
    ) -> dict[str, torch.Tensor]:
        return project_q_kv(self, x, which, lambda t: self.reduce(t, feat_size))

    _output = merged_heads_output

    freeze_projections = freeze_q_kv


def pvt_v2_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """Whole tokens at every stage's stride, and stage grids its spatial-reduction convs divide."""
    stride = [int(s) for s in model.patch_embed.proj.stride]
    out: dict[Tiling, None] = {}
    for k, stage in enumerate(model.stages):
        down = getattr(getattr(stage, "downsample", None), "proj", None)
        if down is not None:
            stride = [s * int(d) for s, d in zip(stride, down.stride)]
        out.update(dict.fromkeys(tilings_of(stride, what=f"stage {k}")))
        for block in stage.blocks:
            sr = block.attn.sr
            if block.attn.pool is None and sr is not None and max(sr.stride) > 1:
                reduced = [s * int(r) for s, r in zip(stride, sr.stride)]
                what = f"stage {k}'s {sr.stride[0]}x{sr.stride[0]} key reduction"
                out.update(dict.fromkeys(tilings_of(reduced, what=what)))
    return tuple(out)


FAMILY = register_family(
    Family(
        name="pvt_v2",
        title="PVTv2",
        hierarchical=True,
        modules=(ModuleCoverage("pvt_v2", 7, 7, 7, ("inspect", "convert", "export")),),
        sizes=ImageSizes(
            tilings=pvt_v2_tilings,
            size_argument=False,
            how="any multiple of its strides as built (conv stems and position-free: nothing to resample)",
        ),
    )
)
