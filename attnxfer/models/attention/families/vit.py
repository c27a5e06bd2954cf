"""The ViT family: timm's plain ``Attention`` (registered as `TransferAttention`'s adapter, the base
`ConversionSlot`), and the refusal of ``DiffAttention``, whose map is a signed difference of two softmax
maps: no distribution to copy or distil, and its halves are never used on their own."""

from __future__ import annotations

from timm.layers import Attention, DiffAttention

from ..adapters import refuse_attention, register_adapter
from ..family import Family, ModuleCoverage, register_family
from ..softmax import TransferAttention

register_adapter(Attention)(TransferAttention)

DIFF_ATTENTION_REASON = (
    "differential attention's map is the difference of two softmax maps (λ-weighted), signed, with rows "
    "summing to 1 − λ, not a distribution: attnxfer's softmax copy and CE distillation have nothing to take "
    "from it. Use a teacher with softmax attention (e.g. the same family without attn_layer='diff')"
)

refuse_attention(DiffAttention, DIFF_ATTENTION_REASON)

#: The 4 vision_transformer archs that do not plan: differential attention (refused above), and parallel
#: blocks that compute their attention inside the block (``vit_pwee_*``/``vit_dpwee_*``: no ``attn`` module).
FAMILY = register_family(
    Family(
        name="vit",
        title="ViT/DeiT",
        modules=(
            ModuleCoverage("vision_transformer", 145, 141, 141, ("inspect", "convert", "export")),
            ModuleCoverage("deit", 16, 16, 16, ("inspect", "convert", "export")),
        ),
    )
)
