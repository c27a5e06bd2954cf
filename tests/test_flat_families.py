"""The flat families' adapters against first principles, on tiny randomly initialised timm models.

RelPos ViT (own, shared and res-post tables, with and without a class token), SAM ViT (padded windows +
a global block, decomposed rel-pos bias), CaiT (talking heads + class attention), NaFlexViT, Qwen3-ViT and
Gemma4-ViT (``encoder.*``). The oracle (`family_oracles`) is timm's own unfused modules with a hook on the
softmax output — never attnxfer's code.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
from family_oracles import TINY, assert_distill_matches_oracle, logits_of, map_ce, oracle_maps, recorded_maps
from helpers import fast_cells
from test_export import card

from attnxfer import load_student
from attnxfer.checkpoints import export_student
from attnxfer.models.attention import AttentionIO, attention_io, attention_layers, attention_maps
from attnxfer.transfer import DualViT, PlanError, build_plan

FAMILIES = sorted(TINY)


def _pair(name: str):
    fam = TINY[name]
    return fam.build(seed=0), fam.build(seed=1), fam.images()


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("gemma4", "naflex")))
def test_swapped_layers_keep_timms_forward_and_names(name):
    teacher, _, x = _pair(name)
    expected = teacher(x)
    swapped = copy.deepcopy(teacher)
    layers = attention_layers(swapped)
    assert all(type(a).__name__.startswith("Transfer") for _, a in layers)
    assert list(swapped.state_dict()) == list(teacher.state_dict())
    torch.testing.assert_close(swapped(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("sam", "srelpos")))
def test_maps_on_request_equal_timms_softmax(name):
    """`attention_maps` (the adapters' explicit maps: pictures, inspect) = the softmax timm computes;
    SAM's windows are rows of the batch, talking heads' maps are the softmax before the head mixing."""
    teacher, _, x = _pair(name)
    oracle = oracle_maps(teacher, x)
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert len(maps) == len(oracle)
    for i, ref in enumerate(oracle):
        torch.testing.assert_close(maps[i], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mode", ["copy", *(pytest.param(m, marks=pytest.mark.slow) for m in ("copy_q", "copy_k", "copy_v"))]
)
@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("cait", "relpos")))
def test_copy_with_the_teachers_own_weights_reproduces_its_logits(name, mode):
    teacher, _, x = _pair(name)
    expected = teacher(x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(teacher), mode=mode).train()
    out = dual(x)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("relpos_rpn", "srelpos")))
def test_copy_uses_the_teachers_logits_not_the_students(name):
    """A student with other weights: copy = the student's values attended with the teacher's maps, so its
    logits move away from its own and its borrowed projections get no gradient."""
    teacher, student, x = _pair(name)
    own = student(x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    keys = list(dual.student.state_dict())
    out = dual(x)
    assert not torch.allclose(out.logits, own, atol=1e-4)
    assert keys == list(student.state_dict())  # frozen projections keep timm's names
    out.logits.square().mean().backward()
    trainable = sum(p.numel() for p in dual.student.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in student.parameters())


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("cait", "relpos_cls")))
def test_distill_ce_and_gradients_equal_the_materialised_maps(name):
    """Per layer, the exact CE (O(N) identity, or the chunked biased path) = -Σ P_t log P_s from timm's own
    maps, and the student's gradients = those of that materialised loss."""
    teacher, student, x = _pair(name)
    _, compared = assert_distill_matches_oracle(teacher, student, x, oracle_maps)
    assert compared


def test_sam_windows_are_padded_rows_of_the_batch_and_its_bias_takes_a_gradient():
    teacher, student, x = _pair("sam")
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert maps[0].shape == (2 * 4, 2, 16, 16)  # 6x6 patches padded to 2x2 windows of 4x4
    assert maps[1].shape == (2, 2, 36, 36)  # the global block
    dual = DualViT(copy.deepcopy(teacher), student, mode="distill").train()
    dual(x).loss.backward()
    for blk in student.blocks:
        assert blk.attn.rel_pos_h.grad is not None and blk.attn.rel_pos_h.grad.abs().sum() > 0


def test_differential_attention_is_refused_with_why():
    kw = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    teacher = timm.create_model("vit_tiny_patch16_224", attn_layer="diff", **kw)
    student = timm.create_model("vit_tiny_patch16_224", **kw)
    with pytest.raises(
        (TypeError, PlanError), match="blocks.0.attn is DiffAttention: differential attention"
    ):
        build_plan(teacher, student, "distill")


def _plain_vit_like_the_tiny_families(seed: int = 2) -> torch.nn.Module:
    """A plain timm ViT with the tiny families' token layout: 4x4 patches, no prefix token, mean pooling."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        class_token=False,
        global_pool="avg",
        num_classes=5,
    ).eval()


@pytest.mark.parametrize("name", ["relpos", "qwen3"])
def test_a_plain_vit_student_copies_and_distils_from_a_family_teacher(name):
    """Across families (same token layout): copy = the plain student run by timm with its softmax maps
    replaced by the teacher's (a hook on its ``attn_drop``; relpos: bias included), distill = the CE of
    the two families' own maps."""
    teacher, x = TINY[name].build(seed=0), TINY[name].images()
    student = _plain_vit_like_the_tiny_families()
    t_maps = oracle_maps(teacher, x)

    oracle = copy.deepcopy(student)
    for blk in oracle.blocks:
        blk.attn.fused_attn = False
    hooks = [
        blk.attn.attn_drop.register_forward_hook(lambda m, a, out, p=p: p)
        for blk, p in zip(oracle.blocks, t_maps)
    ]
    expected = logits_of(oracle, x)
    for h in hooks:
        h.remove()
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").eval()
    torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5)

    s_maps = oracle_maps(student, x)
    out = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()(x)
    for i, (t, s) in enumerate(zip(t_maps, s_maps)):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), map_ce(t, s), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("name", fast_cells(FAMILIES, ("relpos_cls", "qwen3")))
def test_a_family_student_exports_to_plain_timm_and_loads_back(name, tmp_path):
    """After a distillation step (layers walked and swapped), the student exports through timm's own
    save: timm.create_model and load_student rebuild it with bit-identical logits, timm's classes."""
    teacher, student, x = _pair(name)
    DualViT(teacher, student, mode="distill").train()(x)
    student.eval()
    out = export_student(student, tmp_path / "out", card=card())
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    first = next(m for n, m in plain.named_modules() if n.endswith(".attn"))
    assert type(first).__module__.startswith("timm.")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student(x), rtol=0, atol=0)
        torch.testing.assert_close(load_student(str(out))(x), student(x), rtol=0, atol=0)
