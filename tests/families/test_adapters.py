"""Every family's adapters against first principles: the suites every case of the family table runs.

Each case (`cases.CASES`: a tiny randomly initialised timm model of a family, with peaked maps) is checked
against its oracle (`oracles`: timm's own unfused modules with a hook on the softmax output, Hiera's maps
recomputed from its weights, Swin's in float64) — never attnxfer's code: the swap keeps timm's forward and
names; the maps on request are timm's; copy with the teacher's own weights reproduces its logits, and with
other weights attends the student's values with the teacher's maps; the distillation's CE terms and
gradients equal those of the materialised maps; a distilled student exports to plain timm. What only one
family does is tested in its own module (``test_swin.py``, ``test_eva_beit.py``, ...).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
from helpers import fast_cells
from test_export import card

from attnxfer import load_student
from attnxfer.checkpoints import export_student
from attnxfer.models.attention import AttentionIO, attention_io, attention_layers, attention_maps
from attnxfer.transfer import DualViT

from .cases import CASES, NAMES, TINY
from .oracles import assert_distill_matches_oracle, attention_modules, logits_of, map_ce, oracle_maps

COPY_MODES = ("copy", "copy_q", "copy_k", "copy_v")


@pytest.mark.parametrize(
    "name",
    fast_cells(
        NAMES, ("beit_shared", "beitv2", "gemma4", "naflex", "pe_gqa", "pvt_v2_linear", "swin_padded")
    ),
)
def test_swapped_layers_keep_timms_forward_and_names(name):
    """The class swap changes nothing timm computes (bit for bit) and adds no state; through the interface's
    decomposition (an empty `AttentionIO` on every layer) the model computes the same within fp32 rounding."""
    case = CASES[name]
    teacher, x = case.make(0), case.images(2)
    expected = logits_of(teacher, x)
    swapped = copy.deepcopy(teacher)
    layers = attention_layers(swapped)
    assert len(layers) == len(attention_modules(teacher))  # every attention layer of timm's, once
    assert all(type(a).__name__.startswith("Transfer") for _, a in layers)
    assert list(swapped.state_dict()) == list(teacher.state_dict())  # timm's names, nothing added
    torch.testing.assert_close(logits_of(swapped, x), expected, rtol=0, atol=0)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for _, attn in layers:
            stack.enter_context(attention_io(attn, AttentionIO()))
        torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", fast_cells(NAMES, ("beit_shared", "dinov3", "pvt_v2_linear", "sam", "srelpos", "swinv2"))
)
def test_maps_on_request_equal_timms_softmax(name):
    """`attention_maps` (the adapters' explicit maps: pictures, inspect) = the softmax timm computes, each over
    its own key set: windows as rows of the batch (SAM, Swin, Twins, Hiera's mask units), reduced keys
    (PVTv2, Twins' GSA), pooled queries (Hiera), the maps before talking heads' post-softmax mixing (CaiT),
    biases and shift masks inside."""
    case = CASES[name]
    teacher, x = case.make(0), case.images(2)
    oracle = case.oracle(teacher, x)
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert len(maps) == len(oracle) == len(attention_modules(teacher))
    for i, ref in enumerate(oracle):
        torch.testing.assert_close(maps[i], ref.to(maps[i].dtype), **case.map_tol)


def _copy_cells():
    fast = {
        ("cait", "copy"),
        ("relpos", "copy"),
        ("swin", "copy"),
        ("pvt_v2_linear", "copy"),
        ("twins_svt", "copy"),
    }
    return [
        (name, mode) if (name, mode) in fast else pytest.param(name, mode, marks=pytest.mark.slow)
        for name in NAMES
        for mode in (COPY_MODES if CASES[name].copy_chunks else COPY_MODES[:1])
    ]


@pytest.mark.parametrize(("name", "mode"), _copy_cells())
def test_copy_with_the_teachers_own_weights_reproduces_its_logits(name, mode):
    """copy, copy_q, copy_k, copy_v with the teacher as its own student: the borrowed q/k/v (and bias) over the
    teacher's own key set put back exactly what the teacher computes."""
    case = CASES[name]
    teacher, x = case.make(0), case.images(2)
    expected = logits_of(teacher, x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(teacher), mode=mode).train()
    torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", fast_cells(NAMES, ("relpos_rpn", "srelpos")))
def test_copy_uses_the_teachers_logits_not_the_students(name):
    """A student with other weights: copy = the student's values attended with the teacher's maps, so its
    logits move away from its own and its borrowed projections get no gradient (they keep timm's names)."""
    teacher, student, x = CASES[name].pair()
    own = logits_of(student, x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    keys = list(dual.student.state_dict())
    out = dual(x)
    assert not torch.allclose(out.logits, own, atol=1e-4)
    # frozen projections keep timm's names (a separate q bias that becomes a buffer moves within its module)
    assert sorted(keys) == sorted(student.state_dict())
    out.logits.square().mean().backward()
    trainable = sum(p.numel() for p in dual.student.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in student.parameters())


@pytest.mark.parametrize("name", fast_cells(NAMES, ("cait", "hiera", "relpos_cls", "swinv2_cr")))
def test_distill_ce_and_gradients_equal_the_materialised_maps(name):
    """Per layer, the exact CE (the O(N) identity, or the chunked biased path: relative-position tables,
    continuous position biases, τ, shift masks, padded windows, reduced keys, pooled queries) = -Σ P_t log P_s
    of timm's own maps, and the student's gradients (the logits' own parameters included) = those of that
    materialised loss."""
    case = CASES[name]
    teacher, student, x = case.pair()
    layers, compared = assert_distill_matches_oracle(
        teacher,
        student,
        x,
        case.oracle,
        ce=case.ce,
        rel=case.distill_rel,
        float64_reference=case.float64_reference,
    )
    assert layers == len(attention_modules(teacher))
    assert compared
    assert all(any(n.endswith(p) for n in compared) for p in case.learns), compared


@pytest.mark.parametrize("name", fast_cells(NAMES, ("beit", "hiera", "qwen3", "relpos_cls", "swin")))
def test_a_distilled_student_exports_to_plain_timm_and_loads_back(name, tmp_path):
    """After a distillation step (layers walked and swapped), the student exports through timm's own save:
    timm.create_model and load_student rebuild it with bit-identical logits and timm's own classes."""
    teacher, student, x = CASES[name].pair()
    DualViT(teacher, student, mode="distill").train()(x)
    student.eval()
    out = export_student(student, tmp_path / "out", card=card())
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert all(
        type(m).__module__.startswith("timm.") for n, m in plain.named_modules() if n.endswith(".attn")
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student(x), rtol=0, atol=0)
        torch.testing.assert_close(load_student(str(out))(x), student(x), rtol=0, atol=0)


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
