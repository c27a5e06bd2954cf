"""One adapter file per timm attention class (`attnxfer.models.attention.adapters`).

==================  ======================================================  ==============================
file                timm class                                              what its logits add
==================  ======================================================  ==============================
``eva``             ``timm.models.eva.EvaAttention`` (EVA-02, DINOv3, PE)   rope on q, k after the prefix
``attention_rope``  ``timm.layers.AttentionRope`` (eva ``attn_type=rope``)  rope; grouped k/v heads
``beit``            ``timm.models.beit.Attention`` (BEiT, BEiT-v2)          relative-position bias table
==================  ======================================================  ==============================

timm's plain ``Attention`` is `attnxfer.models.attention.softmax.TransferAttention`. Importing this
package registers every adapter.
"""

from . import attention_rope, beit, eva

__all__ = ["attention_rope", "beit", "eva"]
