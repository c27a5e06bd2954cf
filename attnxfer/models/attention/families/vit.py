"""The ViT family: timm's plain ``Attention`` (``vision_transformer``, ``deit``), and the one refusal in its
archs.

timm's ``Attention`` is `attnxfer.models.attention.softmax.TransferAttention`'s base: registered here as its
adapter, so every model walk swaps ViT and DeiT layers to it; its conversion slot is the base
`ConversionSlot` (fused ``qkv``, the model's token layout).

timm's ``DiffAttention`` (differential attention, ``vit_dlittle_*``/``vit_dwee_*``) is refused: a layer's
output is (softmax(s·q₁k₁ᵀ) − λ·softmax(s·q₂k₂ᵀ))·v, the difference of two softmax maps with a learned λ,
so rows are signed and sum to 1 − λ. There is no row-stochastic map to copy into SDPA or to distil with a
cross-entropy, and splitting it into its two halves would transfer something the layer never uses on its own.
"""

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

#: The 4 vision_transformer archs that do not plan: ``vit_dlittle_*``/``vit_dwee_*`` use differential attention
#: (refused above), ``vit_pwee_*``/``vit_dpwee_*`` parallel blocks whose attention is computed inside the block
#: (no ``attn`` module to adapt).
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
