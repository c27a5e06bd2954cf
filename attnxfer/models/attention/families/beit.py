"""BEiT's ``Attention`` as a softmax `TransferableAttention`: logits s·q kᵀ + B, B the layer's gathered
relative-position table plus the model's shared bias when it has one (passed per call)."""

from __future__ import annotations

import torch
from timm.models.beit import Attention as BeitAttention

from ..adapters import register_adapter
from ..bias_rows import BiasRows, gathered_bias_rows
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..softmax import SoftmaxCore
from ._projections import FusedQKVDims, merged_heads_output, project_heads


@register_adapter(BeitAttention)
class TransferBeitAttention(FusedQKVDims, SoftmaxCore, BeitAttention):
    has_logit_bias = True

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.io is None:
            return BeitAttention.forward(self, x, shared_rel_pos_bias=shared_rel_pos_bias)
        return self.transfer_forward(x, shared_rel_pos_bias=shared_rel_pos_bias)

    def project(
        self, x: torch.Tensor, which: str = "qkv", shared_rel_pos_bias: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return project_heads(self, x, which, self.head_dim)

    def logit_bias(
        self, q: torch.Tensor, k: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return bias

    def logit_bias_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        bias: torch.Tensor,
        shared_rel_pos_bias: torch.Tensor | None = None,
    ) -> BiasRows:
        if self.relative_position_bias_table is None:
            return BiasRows.of_tensor(bias)
        return gathered_bias_rows(
            self.relative_position_bias_table,
            self.relative_position_index,
            bias.shape[-1],
            extra=shared_rel_pos_bias,
        )

    _output = merged_heads_output


FAMILY = register_family(
    Family(
        name="beit",
        title="BEiT",
        modules=(ModuleCoverage("beit", 7, 7, 7, ("inspect", "export")),),
        sizes=ImageSizes(how="relative-position tables resized by timm's checkpoint filter"),
    )
)
