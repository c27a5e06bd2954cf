"""`TransferPvtV2Attention`: timm's PVTv2 ``Attention`` (``timm.models.pvt_v2``) as a softmax
`TransferableAttention`.

Spatial-reduction attention: queries come from all N = H·W tokens of the stage, keys and values from a
reduced set — the ``sr`` conv (kernel = stride = ``sr_ratio``) + ``norm`` give N_k = N / sr² tokens, or,
in the ``linear`` variant (``pvt_v2_b2_li``), adaptive average pooling to 7×7 + a 1×1 ``sr`` conv + ``norm``
+ GELU give N_k = 49 at any resolution. Its logits are s·q kᵀ (N_q × N_k, s = d^-0.5, no bias), so
``project`` hands out q with N_q rows and k/v with N_k rows; copy is the student's own (reduced) v attended
with the teacher's q and k (SDPA), distillation the exact CE over each row's N_k keys. The block passes
the stage's ``feat_size`` (H, W) per call. ``norm`` here is the reduction's LayerNorm, not an output norm.

PVTv2 converts (`PvtV2Conversion`, `PvtSlot`): the zoo attention runs over **all tokens of the stage**
(EcoFormer's setting for its hashing attention: keys and values are not sub-sampled), its grid the stage's
``feat_size`` at each call. The teacher's ``q`` and ``kv`` Linears become the fused ``qkv`` (rows q, k, v, as
timm splits ``kv``), ``proj`` moves in; the spatial-reduction modules (``sr``, its ``norm``, the ``linear``
variant's pool) are dropped: a kernel attention over N keys costs O(N d²) and needs no sub-sampling. With
``sr_ratio > 1`` the teacher's k/v weights were trained on reduced tokens, so they are a starting point, not
the teacher's own keys; stage 1 pools the student's map onto the teacher's keys (``key_pooling``).
"""

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
from ..slots import ConversionSlot, TokenLayout, stacked_linear
from ..softmax import SOFTMAX, SoftmaxCore
from ._projections import merged_heads_output
from ._reduced_keys import ReducedKeys, freeze_q_kv, project_q_kv


class PvtSlot:
    """Before a zoo attention class: PVTv2's call ``attn(x, feat_size)``, the zoo attention over every token of
    the stage's grid."""

    def forward(self, x: torch.Tensor, feat_size: Sequence[int] | None = None) -> torch.Tensor:
        if feat_size is not None:
            self.set_token_layout(0, tuple(int(s) for s in feat_size))
        return super().forward(x)


class PvtV2Conversion(ConversionSlot):
    """A zoo attention in a PVTv2 layer's place (see the module docstring): ``q`` and ``kv`` fused into
    ``qkv``, ``proj`` moved in, no prefix tokens, the grid per call."""

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
        return {"qkv": stacked_linear([old.q, old.kv]), "proj": old.proj}


@register_adapter(PvtV2Attention)
class TransferPvtV2Attention(ReducedKeys, SoftmaxCore, PvtV2Attention):
    """PVTv2's ``Attention`` meeting `TransferableAttention`; without an `AttentionIO` its forward is timm's."""

    attention_name = SOFTMAX  # a softmax attention: exports as timm's own class
    conversion_slot = PvtV2Conversion

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def sr_ratio(self) -> int:
        """The stride of the key/value reduction (1: keys over every token); 0 for the linear variant,
        whose keys are a fixed 7×7 pooling."""
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
        """Which tokens of the stage's ``feat_size`` grid each reduced key is made from (`KeyPooling`: the
        conv's sr×sr blocks, or the linear variant's 7×7 adaptive bins); None without a reduction."""
        if self.pool is not None:
            return KeyPooling.adaptive(feat_size, self.pool.output_size)
        if self.sr is None:
            return None
        return KeyPooling.strided(feat_size, self.sr_ratio)

    def reduce(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        """The tokens keys and values are computed from: (B, N_k, C), as timm reduces them."""
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
        """q (B, H, N, d) of every token; k, v (B, H, N_k, d) of the reduced tokens."""
        return project_q_kv(
            self, x, which, lambda t: self.reduce(t, feat_size), self.num_heads, self.head_dim
        )

    _output = merged_heads_output

    freeze_projections = freeze_q_kv


def pvt_v2_tilings(model: nn.Module) -> tuple[Tiling, ...]:
    """PVTv2's sizes: whole tokens at every stage's stride (its overlapping stems round a partial patch up), and
    stage grids its spatial-reduction convs divide (the linear variant pools to 7x7 at any size)."""
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
