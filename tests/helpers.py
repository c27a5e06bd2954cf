"""Small shared builders for the tests (plain functions, no fixtures magic)."""

from __future__ import annotations

import copy

import timm
import torch

from attnxfer.models import create_vit


def tiny_vit(
    depth: int = 4,
    embed_dim: int = 48,
    num_heads: int = 3,
    img_size: int = 32,
    patch_size: int = 8,
    num_classes: int = 10,
    seed: int = 0,
    plain_timm: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A ViT-Tiny-shaped model small enough for CPU tests (17 tokens by default)."""
    torch.manual_seed(seed)
    args = dict(
        img_size=img_size,
        patch_size=patch_size,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=num_classes,
        **kwargs,
    )
    if plain_timm:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    return create_vit("vit_tiny_patch16_224", **args)


def randomize_qkv_rows(
    model: torch.nn.Module, layers, chunks: str = "qk", seed: int = 123, std: float = 0.2
) -> torch.nn.Module:
    """A copy of ``model`` whose q/k/v projection rows in ``layers`` are re-drawn with ``std``.

    timm's init (std 0.02) gives near-uniform maps; std 0.2 gives peaked ones, as trained ViTs have.
    """
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for i in layers:
        attn = model.blocks[i].attn
        d = attn.attn_dim
        with torch.no_grad():
            for c in chunks:
                j = "qkv".index(c)
                attn.qkv.weight[j * d : (j + 1) * d] = torch.randn(d, attn.qkv.in_features, generator=g) * std
                if attn.qkv.bias is not None:
                    attn.qkv.bias[j * d : (j + 1) * d] = torch.randn(d, generator=g) * std
    return model


def peaked_teacher(depth: int = 4, seed: int = 1, **kwargs) -> torch.nn.Module:
    """A random teacher whose attention maps are far from uniform (something worth transferring)."""
    return randomize_qkv_rows(tiny_vit(depth=depth, seed=seed, **kwargs), range(depth), "qk", seed=seed + 100)
