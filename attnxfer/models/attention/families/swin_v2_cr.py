"""Swin V2-CR's ``WindowMultiHeadAttention`` as a softmax `TransferableAttention`: Swin V2's cosine core with
its own position bias, ``meta_mlp`` of the log-spaced relative coordinates (no sigmoid)."""

from __future__ import annotations

import torch
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention

from ..adapters import register_adapter
from ..family import Family, ModuleCoverage, register_family
from .swin import SWIN_SIZES
from .swin_v2 import CosineWindowCore


@register_adapter(WindowMultiHeadAttention)
class TransferSwinV2CrAttention(CosineWindowCore, WindowMultiHeadAttention):
    """Swin V2-CR's window attention; (B·nW, N, C) windows in and out."""

    def _make_pair_wise_relative_positions(self) -> None:
        device = self._parameters["logit_scale"].device  # timm's reads self.logit_scale: the method here
        n = self.window_size[0] * self.window_size[1]
        coords = torch.stack(
            torch.meshgrid(
                torch.arange(self.window_size[0], device=device, dtype=torch.float32),
                torch.arange(self.window_size[1], device=device, dtype=torch.float32),
                indexing="ij",
            )
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(n * n, 2)
        log_rel = torch.sign(rel) * torch.log1p(rel.abs())
        self.relative_coordinates_log.copy_(log_rel.to(self.relative_coordinates_log.dtype))

    _position_bias = WindowMultiHeadAttention._relative_positional_encodings


FAMILY = register_family(
    Family(
        name="swin_v2_cr",
        title="Swin V2-CR",
        hierarchical=True,
        modules=(ModuleCoverage("swin_transformer_v2_cr", 3, 3, 3, ("inspect", "export")),),
        sizes=SWIN_SIZES,
    )
)
