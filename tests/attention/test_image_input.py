"""`image_input`: channels, image size, patch size and grid of any supported timm model, wherever its family
keeps the patch embedding, checked against the tokens the model's own first attention layer receives."""

from __future__ import annotations

import pytest
import timm
import torch
from families.cases import TINY
from families.oracles import attention_modules

from attnxfer.errors import InputError
from attnxfer.models.image_input import image_input


def _tokens_at_first_attention(model: torch.nn.Module, x: torch.Tensor) -> int:
    seen = []
    _, attn = attention_modules(model)[0]
    hook = attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def _prefix(model: torch.nn.Module) -> int:
    return getattr(model, "num_prefix_tokens", None) or getattr(model.encoder, "num_prefix_tokens", 0)


@pytest.mark.parametrize(
    ("name", "where", "kwargs"),
    [
        ("naflex", "embeds", {}),  # NaFlexViT: a linear patch projection, no img_size of its own
        ("qwen3", "encoder.patch_embed", {}),
        ("gemma4", "encoder.patch_embed", {"in_chans": 1, "img_size": 48}),  # channels: the encoder's
    ],
)
def test_the_grid_is_the_patch_tokens_the_first_attention_layer_sees(name, where, kwargs):
    family = TINY[name]
    torch.manual_seed(0)
    model = timm.create_model(
        family.arch, pretrained=False, num_classes=5, **{**family.kwargs, **kwargs}
    ).eval()
    got = image_input(model)
    side = kwargs.get("img_size", family.img_size)
    chans = kwargs.get("in_chans", 3)
    assert (got.where, got.in_chans, got.img_size, got.patch_size) == (where, chans, (side, side), (8, 8))
    assert got.grid == (side // 8, side // 8)
    x = torch.randn(1, chans, side, side)
    assert _tokens_at_first_attention(model, x) == got.grid[0] * got.grid[1] + _prefix(model)


def test_a_plain_vit_with_a_non_square_input():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=(48, 32),
        patch_size=8,
        in_chans=1,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    got = image_input(model)
    assert (got.in_chans, got.img_size, got.patch_size, got.grid) == (1, (48, 32), (8, 8), (6, 4))
    assert _tokens_at_first_attention(model.eval(), torch.randn(1, 1, 48, 32)) == 6 * 4 + 1


def test_a_model_without_a_known_patch_embedding_is_one_input_error():
    with pytest.raises(InputError, match=r"Sequential has no patch embedding .*supported are .*NaFlexViT"):
        image_input(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4)))
