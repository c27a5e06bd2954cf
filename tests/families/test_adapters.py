"""Every family's adapters against first principles: the suites every case of the family table runs.

Each case (`cases.CASES`: a tiny randomly initialised timm model of a family, with peaked maps) is checked
against its oracle (`oracles`: timm's own unfused modules with a hook on the softmax output, Hiera's maps
recomputed from its weights, Swin's in float64) — never attnxfer's code: the swap keeps timm's forward and
names; the maps on request are timm's; copy with the teacher's own weights reproduces its logits, and with
other weights attends the student's values with the teacher's maps; the distillation's CE terms and
gradients equal those of the materialised maps; a mirrored student plans every layer with its own; each
layer's rows are placed on the image where the layer computes them (inspect); a family converts into a zoo
student exactly when its file says so; a distilled student exports to plain timm. What only one family does
is tested in its own module (``test_swin.py``, ``test_eva_beit.py``, ...).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
from helpers import card, fast_cells

from attnxfer import load_student
from attnxfer.analysis import layer_qk
from attnxfer.analysis.positions import row_positions
from attnxfer.checkpoints import export_student
from attnxfer.errors import InputError
from attnxfer.models.attention import (
    AttentionIO,
    attention_io,
    attention_layers,
    attention_maps,
    attention_name_of,
    families,
)
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.compile import checkpoint_gradients
from attnxfer.transfer import TeacherStudent, build_plan

from .cases import CASES, NAMES, TINY, plain_vit, sharpen
from .oracles import (
    assert_distill_matches_oracle,
    assert_shared_drop_path_copy_is_timms,
    attention_modules,
    logits_of,
    map_ce,
    oracle_maps,
)

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
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(teacher), mode=mode).train()
    torch.testing.assert_close(pair(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", fast_cells(NAMES, ("relpos_rpn", "srelpos")))
def test_copy_uses_the_teachers_logits_not_the_students(name):
    """A student with other weights: copy = the student's values attended with the teacher's maps, so its
    logits move away from its own and its borrowed projections get no gradient (they keep timm's names)."""
    teacher, student, x = CASES[name].pair()
    own = logits_of(student, x)
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    keys = list(pair.student.state_dict())
    out = pair(x)
    assert not torch.allclose(out.logits, own, atol=1e-4)
    # frozen projections keep timm's names (a separate q bias that becomes a buffer moves within its module)
    assert sorted(keys) == sorted(student.state_dict())
    out.logits.square().mean().backward()
    trainable = sum(p.numel() for p in pair.student.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in student.parameters())


@pytest.mark.parametrize("name", fast_cells(NAMES, ("beit", "cait", "gemma4", "twins_svt")))
def test_a_student_wrapped_for_copy_then_for_distill_trains_all_of_itself_again(name):
    """A notebook's next cell: the copy pair froze the projections it borrowed; a distill pair of the same
    student trains them again (the same weights under the same names), and a copy pair freezes them again."""
    teacher, student, _ = CASES[name].pair()
    fresh = copy.deepcopy(student)
    TeacherStudent(teacher, student, mode="copy")
    TeacherStudent(teacher, student, mode="distill")
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in fresh.named_parameters() if p.requires_grad}
    torch.testing.assert_close(student.state_dict(), fresh.state_dict(), rtol=0, atol=0)
    TeacherStudent(teacher, student, mode="copy")
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in fresh.parameters())


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


@pytest.mark.parametrize("name", fast_cells(NAMES, ("cait", "twins_svt")))
def test_a_mirrored_student_plans_every_layer_with_its_own(name):
    """Teacher and student of one case (same arch, other weights): copy and distill pair layer i with layer i,
    each layer's token partition (windows, shifts, reduction ratios, mask units) alike."""
    teacher, student, _ = CASES[name].pair()
    depth = len(attention_layers(teacher))
    for mode in ("copy", "distill"):
        assert build_plan(teacher, student, mode).pairs == tuple((i, i) for i in range(depth))


@pytest.mark.parametrize("name", fast_cells(NAMES, ("hiera", "swin_padded", "twins_svt", "vit")))
def test_rows_are_placed_on_the_image_where_each_layer_computes_them(name):
    """`row_positions` (inspect's pictures and attention distance) asks each layer's adapter where its rows
    sit: hierarchical families place every layer, flat ones none (their rows are the image's tokens). A
    placement fits the layer's own q/k (windows, query rows, keys), and its query rows cover the layer's grid
    once: every cell in one window's row, padding aside."""
    case = CASES[name]
    model, x = case.make(0), case.images(2)
    placed = row_positions(model, x)
    hierarchical = next(f for f in families() if f.name == case.family).hierarchical
    assert any(p is not None for p in placed) == hierarchical
    for pos, sig in zip(placed, layer_qk(model, x), strict=True):
        if pos is None:
            continue
        assert pos.matches(sig, 2), (sig.name, sig.shape, pos.queries.shape, pos.keys.shape)
        cells = pos.queries[pos.queries >= 0]
        assert sorted(cells.tolist()) == list(range(pos.grid[0] * pos.grid[1])), sig.name
        assert pos.keys.max() < pos.key_grid[0] * pos.key_grid[1]


@pytest.mark.parametrize("name", fast_cells(NAMES, ("pvt_v2", "qwen3", "relpos")))
def test_a_family_converts_exactly_when_its_file_says_so(name):
    """The coverage table's convert column is each family's declaration: a family that converts gives a zoo
    student of its teacher (relu_linear in every layer, through its conversion slot) that runs; the others are
    refused before anything is built, with a message about the teacher."""
    case = CASES[name]
    teacher, x = case.make(0), case.images(2)
    if not next(f for f in families() if f.name == case.family).converts:
        with pytest.raises(InputError, match="teacher"):
            build_efficient_student(teacher, "relu_linear")
        return
    student = build_efficient_student(teacher, "relu_linear").eval()
    assert {attention_name_of(a) for _, a in attention_layers(student)} == {"relu_linear"}
    with torch.no_grad():
        out = student(x)
    assert out.shape == logits_of(teacher, x).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", fast_cells(NAMES, ("beit", "hiera", "qwen3", "relpos_cls", "swin")))
def test_a_distilled_student_exports_to_plain_timm_and_loads_back(name, tmp_path):
    """After a distillation step (layers walked and swapped), the student exports through timm's own save:
    timm.create_model and load_student rebuild it with bit-identical logits and timm's own classes."""
    teacher, student, x = CASES[name].pair()
    TeacherStudent(teacher, student, mode="distill").train()(x)
    student.eval()
    out = export_student(student, tmp_path / "out", card=card())
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert all(
        type(m).__module__.startswith("timm.") for n, m in plain.named_modules() if n.endswith(".attn")
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student(x), rtol=0, atol=0)
        torch.testing.assert_close(load_student(str(out))(x), student(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["relpos", "qwen3"])
def test_a_plain_vit_student_copies_and_distils_from_a_family_teacher(name):
    """Across families (same token layout): copy = the plain student run by timm with its softmax maps
    replaced by the teacher's (a hook on its ``attn_drop``; relpos: bias included), distill = the CE of
    the two families' own maps."""
    teacher, x = TINY[name].build(seed=0), TINY[name].images()
    student = plain_vit()
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
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").eval()
    torch.testing.assert_close(pair(x).logits, expected, rtol=1e-5, atol=1e-5)

    s_maps = oracle_maps(student, x)
    out = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()(x)
    for i, (t, s) in enumerate(zip(t_maps, s_maps)):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), map_ce(t, s), rtol=1e-5, atol=1e-6)


def test_shared_drop_path_reaches_caits_one_drop_path_per_block():
    """CaiT's blocks have one ``drop_path`` that both residual branches call, each with its own draw, where
    other families have drop_path1/drop_path2. Copy from a teacher with the student's own weights under shared
    drop path is then timm's own train-mode forward of the student with the same random stream; the student
    used to drop branches alone, under maps of a teacher that kept them."""
    tiny = TINY["cait"]
    teacher = sharpen(
        timm.create_model(tiny.arch, pretrained=False, num_classes=5, drop_path_rate=0.5, **tiny.kwargs)
    ).eval()
    x = tiny.images(4)
    assert_shared_drop_path_copy_is_timms(teacher, x)


def _saved_bytes_and_grads(pair: TeacherStudent, x: torch.Tensor) -> tuple[int, list[torch.Tensor | None]]:
    """One step of ``pair`` (its loss plus the logits' squares, so that copy trains too): the bytes autograd
    saved for the backward during the forward, and the student's gradients."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with pair.kept_for_backward():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pair(x)
        (out.logits.pow(2).mean() + (out.loss if out.loss is not None else 0)).backward()
    return saved, [p.grad for p in pair.student.parameters()]


@pytest.mark.parametrize("mode", ("copy", "distill"))
@pytest.mark.parametrize("name", fast_cells([n for n in NAMES if n != "twins_svt"], ("vit", "swin")))
def test_a_checkpointing_student_gets_the_gradients_of_one_that_keeps_its_activations(name, mode):
    """timm's gradient checkpointing recomputes the student's blocks in the backward pass: they must borrow
    the teacher's q/k (copy) and capture their maps (distill) again, or the gradients go wrong. The same
    gradients, from fewer saved bytes (so the checkpointing did run)."""
    case = CASES[name]
    teacher, student, x = case.pair()
    runs = []
    for checkpointing in (False, True):
        s = copy.deepcopy(student)
        s.set_grad_checkpointing(checkpointing)
        runs.append(_saved_bytes_and_grads(TeacherStudent(teacher, s, mode=mode).train(), x))
    (kept_bytes, want), (recomputed_bytes, got) = runs
    assert recomputed_bytes < kept_bytes
    assert [g is None for g in got] == [g is None for g in want]
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_twins_has_no_gradient_checkpointing_and_a_run_is_told_so():
    with pytest.raises(InputError, match="timm's Twins has no gradient checkpointing; remove it"):
        checkpoint_gradients(CASES["twins_svt"].make(0))
