"""Attention modules and ViT builders (timm models with transfer-aware attention)."""
from .attention import (AttentionIO, PartialQKV, TransferAttention, attention_io, attention_maps,
                        explicit_attention_map, make_transfer_aware, transfer_attentions)
from .student import attention_kind, attention_layout, student_from_spec, student_like, student_spec, vit_traits
from .vit import create_vit

__all__ = ["AttentionIO", "PartialQKV", "TransferAttention", "attention_io", "attention_maps",
           "explicit_attention_map", "make_transfer_aware", "transfer_attentions", "create_vit",
           "attention_kind", "attention_layout", "student_from_spec", "student_like", "student_spec", "vit_traits"]
