"""TransferAttention against timm's own attention and timm's own map extraction."""

import copy

import pytest
import torch
from helpers import tiny_vit
from timm.layers import set_fused_attn
from timm.utils import AttentionExtract

from attnxfer.errors import InputError
from attnxfer.models import (
    AttentionIO,
    PartialQKV,
    TransferAttention,
    attention_io,
    attention_maps,
    capture_attention,
    make_transfer_aware,
)


def test_plain_forward_matches_timm():
    timm_model = tiny_vit(plain_timm=True).eval()
    ours = make_transfer_aware(copy.deepcopy(timm_model)).eval()
    assert all(isinstance(b.attn, TransferAttention) for b in ours.blocks)
    assert list(timm_model.state_dict()) == list(ours.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), timm_model(x), rtol=1e-5, atol=1e-6)


def test_maps_equal_timm_attention_extract():
    set_fused_attn(False)  # AttentionExtract reads the explicit softmax, which only the unfused path has
    try:
        timm_model = tiny_vit(plain_timm=True, qkv_bias=True).eval()
        x = torch.randn(2, 3, 32, 32)
        extracted = AttentionExtract(timm_model)(x)  # torch.fx graph: the softmax node of each block
    finally:
        set_fused_attn(True)
    ours = make_transfer_aware(copy.deepcopy(timm_model)).eval()
    maps = attention_maps(ours, x)
    assert len(maps) == len(extracted) == len(ours.blocks)
    for i in range(len(ours.blocks)):
        ref = extracted[f"blocks.{i}.attn.softmax"]
        assert maps[i].shape == (2, 3, 17, 17)
        torch.testing.assert_close(maps[i], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps[i].sum(-1), torch.ones(2, 3, 17))


def test_layers_the_model_does_not_have_are_named_not_an_index_error():
    model = tiny_vit(depth=2).eval()
    with pytest.raises(InputError, match=r"layers \[5, -3\]: the model has 2 attention blocks, 0 to 1"):
        attention_maps(model, torch.randn(1, 3, 32, 32), layers=[1, 5, -3])
    # negatives count from the end, as build_plan's layers do; the maps are keyed by the block's own index
    assert list(attention_maps(model, torch.randn(1, 3, 32, 32), layers=[-1])) == [1]
    with capture_attention(model, layers=[-2]) as store:
        assert list(store) == [0]


def test_one_layer_given_as_an_int_not_a_list_says_to_write_a_list():
    model = tiny_vit(depth=2).eval()
    with pytest.raises(InputError, match=r"layers=1: a list of block indices"):
        attention_maps(model, torch.randn(1, 3, 32, 32), layers=1)


def test_one_field_given_as_a_name_not_a_list_is_that_field():
    model, x = tiny_vit(depth=2).eval(), torch.randn(1, 3, 32, 32)
    for field in ("input", "output", "q"):
        with torch.no_grad(), capture_attention(model, layers=[0], fields=field) as store:
            model(x)
        assert list(store[0]) == [field]


def test_capture_and_override_round_trip():
    model = tiny_vit().eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 48)
    io = AttentionIO(capture="qkv")
    with attention_io(attn, io):
        y = attn(x)
    assert set(io.captured) == {"q", "k", "v"} and io.captured["q"].shape == (2, 3, 17, 16)
    assert attn.io is None  # detached after the block
    # Feeding a layer its own q/k/v back gives the same output.
    with attention_io(attn, AttentionIO(q=io.captured["q"], k=io.captured["k"], v=io.captured["v"])):
        torch.testing.assert_close(attn(x), y)


@pytest.mark.parametrize("frozen", ["qk", "q", "v"])
def test_partial_qkv_keeps_timm_state_dict(frozen):
    model = tiny_vit(qkv_bias=True)
    attn = model.blocks[1].attn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 17, 48)
    y = attn(x)
    attn.freeze_projections(frozen)
    assert isinstance(attn.qkv, PartialQKV)
    after = model.state_dict()
    assert list(before) == list(after)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    torch.testing.assert_close(attn(x), y)
    trainable = {n for n, p in attn.named_parameters() if p.requires_grad}
    for c in "qkv":
        assert (f"qkv.{c}_weight" in trainable) == (c not in frozen)
    # loading a timm state dict into the split module restores exactly
    fresh = tiny_vit(qkv_bias=True, seed=5)
    fresh.blocks[1].attn.freeze_projections(frozen)
    fresh.load_state_dict(before)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_non_standard_attention_is_refused():
    model = tiny_vit(plain_timm=True)
    model.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"blocks.0.attn is Identity .*no adapter for it .*EvaAttention"):
        make_transfer_aware(model)


@pytest.mark.parametrize("dq,dv", [(16, 8), (8, 16), (16, 16)])
def test_sdpa_with_mixed_head_dims_equals_explicit_attention(dq, dv):
    from attnxfer.models.attention import sdpa

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 21, dq, generator=g), torch.randn(2, 3, 21, dq, generator=g)
    v = torch.randn(2, 3, 21, dv, generator=g, requires_grad=True)
    out = sdpa(q, k, v)
    ref = torch.softmax(q @ k.transpose(-2, -1) * dq**-0.5, -1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (g_out,) = torch.autograd.grad(out.sum(), [v])
    (g_ref,) = torch.autograd.grad(ref.sum(), [v])
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-6)
