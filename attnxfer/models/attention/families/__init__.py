"""One adapter file per timm attention class (`attnxfer.models.attention.adapters`).

==================  ======================================================  ==============================
file                timm class                                              what its logits add
==================  ======================================================  ==============================
``eva``             ``timm.models.eva.EvaAttention`` (EVA-02, DINOv3, PE)   rope on q, k after the prefix
``attention_rope``  ``timm.layers.AttentionRope`` (eva ``attn_type=rope``)  rope; grouped k/v heads
``beit``            ``timm.models.beit.Attention`` (BEiT, BEiT-v2)          relative-position bias table
``relpos``          ``timm.models.vision_transformer_relpos.RelPosAttention`` relative-position bias (own/shared)
``sam``             ``timm.models.vision_transformer_sam.Attention`` (SAM)  decomposed rel-pos bias; windows
``cait_talking_heads`` ``timm.models.cait.TalkingHeadAttn``                 pre-softmax head mix (in q')
``cait_class_attn`` ``timm.models.cait.ClassAttn``                          one query row (class token)
``gemma4``          ``timm.models.gemma4_vit.Gemma4Attention``              2-D rope, scale 1, v norm
``swin``            ``timm.models.swin_transformer.WindowAttention``        rel-pos table; windows, shift mask
``swin_v2``         ``timm.models.swin_transformer_v2.WindowAttention``     cosine · τ, continuous pos bias
``pvt_v2``          ``timm.models.pvt_v2.Attention`` (PVTv2)                keys/values over reduced tokens
``twins``           ``timm.models.twins.LocallyGroupedAttn`` / ``GlobalSubSampleAttn``  padded windows / reduced keys
``hiera``           ``timm.models.hiera.MaskUnitAttention`` (Hiera)         mask units; pooled queries
``diff_attention``  ``timm.layers.DiffAttention``                           refused: signed maps
==================  ======================================================  ==============================

timm's plain ``Attention`` is `attnxfer.models.attention.softmax.TransferAttention`. Importing this
package registers every adapter.
"""

from . import (
    attention_rope,
    beit,
    cait_class_attn,
    cait_talking_heads,
    diff_attention,
    eva,
    gemma4,
    hiera,
    pvt_v2,
    relpos,
    sam,
    swin,
    swin_v2,
    twins,
)

__all__ = [
    "attention_rope",
    "beit",
    "cait_class_attn",
    "cait_talking_heads",
    "diff_attention",
    "eva",
    "gemma4",
    "hiera",
    "pvt_v2",
    "relpos",
    "sam",
    "swin",
    "swin_v2",
    "twins",
]
