"""timm's ``RelPosAttention`` (``vit_relpos_*``, ``vit_srelpos_*``) as a softmax `TransferableAttention`:
logits s·q kᵀ + B, B the layer's own relative-position bias or the model's shared one passed per call."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import RelPosAttention

from ..adapters import register_adapter
from ..bias_rows import BiasRows, gathered_bias_rows
from ..family import Family, ImageSizes, ModuleCoverage, register_family
from ..softmax import SoftmaxCore
from ._projections import HeadsAttnDim, merged_heads_output, project_heads


@register_adapter(RelPosAttention)
class TransferRelPosAttention(HeadsAttnDim, SoftmaxCore, RelPosAttention):
    has_logit_bias = True

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if self.io is None:
            return RelPosAttention.forward(self, x, shared_rel_pos=shared_rel_pos)
        return self.transfer_forward(x, shared_rel_pos=shared_rel_pos)

    def project(
        self, x: torch.Tensor, which: str = "qkv", shared_rel_pos: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = project_heads(self, x, which, self.head_dim)
        for c, norm in (("q", self.q_norm), ("k", self.k_norm)):
            if c in out:
                out[c] = norm(out[c])
        return out

    def logit_bias(
        self, q: torch.Tensor, k: torch.Tensor, shared_rel_pos: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self.rel_pos is not None:
            return self.rel_pos.get_bias()
        return shared_rel_pos

    def logit_bias_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        bias: torch.Tensor,
        shared_rel_pos: torch.Tensor | None = None,
    ) -> BiasRows:
        """The layer's table or MLP output gathered a chunk of rows at a time; else (a shared bias, an MLP
        that draws dropout) rows of the full tensor."""
        rel = self.rel_pos
        index = getattr(rel, "relative_position_index", None)
        if rel is None or index is None:
            return BiasRows.of_tensor(bias)
        if isinstance(rel, RelPosBias):
            return gathered_bias_rows(rel.relative_position_bias_table, index, bias.shape[-1])
        draws_dropout = rel.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in rel.modules())
        if isinstance(rel, RelPosMlp) and not draws_dropout:  # recomputed, a dropout would give other rows
            gain = rel.bias_gain
            act = rel.bias_act
            post = act if gain is None else (lambda b: gain * act(b))
            values = rel.mlp(rel.rel_coords_log).view(-1, rel.num_heads)
            return gathered_bias_rows(values, index, bias.shape[-1], prefix_pad=rel.prefix_tokens, post=post)
        return BiasRows.of_tensor(bias)

    _output = merged_heads_output


FAMILY = register_family(
    Family(
        name="relpos",
        title="relpos ViT",
        modules=(ModuleCoverage("vision_transformer_relpos", 9, 9, 9, ("inspect", "export")),),
        sizes=ImageSizes(
            how="relative positions rebuilt for the new grid (an MLP of log coordinates, or a table resized by "
            "timm's checkpoint filter)"
        ),
    )
)
