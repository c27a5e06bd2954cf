"""The NaFlexViT family: NaFlex batches (patches, coordinates, validity) of different patch counts reach the
adapters as timm's padding mask."""

from __future__ import annotations

import contextlib
import copy

import torch

from attnxfer.models.attention import AttentionIO, attention_io, attention_layers

from .cases import TINY
from .oracles import recorded_maps


def test_naflex_padding_masks_reach_the_maps_and_copy():
    """NaFlexViT in NaFlex mode (patches + coordinates + validity: the second image is 3 of 4 patch rows,
    padded): the adapters' maps under timm's padding mask equal timm's softmax, and copying the captured
    q, k with the teacher's own weights reproduces its logits."""
    model = TINY["naflex"].build(seed=0)
    B, N = 2, 16
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 12:] = False
    batch = dict(
        patches=torch.randn(B, N, 8 * 8 * 3, generator=g),
        patch_coord=torch.stack([rows.flatten(), cols.flatten()], -1).expand(B, N, 2).clone(),
        patch_valid=valid,
    )
    reference = copy.deepcopy(model)
    with torch.no_grad(), recorded_maps(reference) as maps:
        expected = reference(batch)
    teacher = copy.deepcopy(model)
    ios = [AttentionIO(capture="qk", return_map=True) for _ in attention_layers(teacher)]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for (_, attn), io in zip(attention_layers(teacher), ios):
            stack.enter_context(attention_io(attn, io))
        torch.testing.assert_close(teacher(batch), expected, rtol=1e-5, atol=1e-6)
    for io, (_, ref) in zip(ios, maps):
        torch.testing.assert_close(io.map, ref, rtol=1e-5, atol=1e-6)
    assert (
        maps[0][1][1, :, :16, 16:] == 0
    ).all()  # valid rows give padded keys no weight (4 registers first)
    student = copy.deepcopy(model)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for (_, attn), io in zip(attention_layers(student), ios):
            stack.enter_context(attention_io(attn, AttentionIO(q=io.captured["q"], k=io.captured["k"])))
        torch.testing.assert_close(student(batch), expected, rtol=1e-5, atol=1e-6)
