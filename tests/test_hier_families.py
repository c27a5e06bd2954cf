"""Swin and Swin V2 (hierarchical, windowed) as teachers and students, against first principles.

Tiny random timm models: 16x16 patches in 4x4 windows, two stages of two blocks (the second block of each
stage shifted, with timm's shifted-window mask), and a padded variant (10x10 patches: windows padded to
12x12, 5x5 in stage 2 padded to 8x8). The oracle is timm's own modules, unfused, with a hook on
``attn_drop`` (the softmax after bias and mask) — never attnxfer's code.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import timm
import torch
import torch.nn as nn
from family_oracles import logits_of
from test_export import card

from attnxfer import load_student
from attnxfer.checkpoints import export_student
from attnxfer.models.attention import attention_layers, attention_maps, attention_stages
from attnxfer.transfer import DualViT, PlanError, build_plan

_BASE = dict(
    pretrained=False,
    drop_path_rate=0.0,
    window_size=4,
    depths=(2, 2),
    num_heads=(2, 4),
    embed_dim=32,
    num_classes=5,
)

#: name -> (arch, kwargs, image size)
TINY = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2), 32),
    "swin_padded": ("swin_tiny_patch4_window7_224", dict(img_size=40, patch_size=4), 40),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2), 32),
    "swinv2_cr": ("swinv2_cr_tiny_ns_224", dict(img_size=32, patch_size=2), 32),
}
NAMES = sorted(TINY)


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny model with peaked maps (q/k rows and position tables drawn wider than timm's init; Swin V2's
    per-head log scales spread over [1, 5], above timm's clamp at log 100 included). Swin V2 initialises its
    post-norm gains at 0 (the attention branch would not reach the logits): they are set to 1."""
    arch, kwargs, _ = TINY[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**_BASE, **kwargs, **overrides})
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in _timm_attentions(model):
            for pname, p in m.named_parameters():
                if pname == "logit_scale":
                    p.copy_(torch.rand(p.shape, generator=g) * 4 + 1)
                elif any(t in pname for t in ("relative_position", "cpb_mlp", "meta_mlp")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() >= 2 else 0.1))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None and not m.weight.any():
                m.weight.fill_(1.0)
    return model.eval()


def images(name: str, batch: int = 2) -> torch.Tensor:
    size = TINY[name][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _timm_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(".attn")]


def oracle_maps(model: nn.Module, x: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
    """Each window attention's softmax maps (B·nW, H, N, N), in forward order, from timm's own unfused
    modules in float64 (Swin V2's τ up to 100 spreads logits over ±200: in fp32 maps, keys below e^-103
    underflow to 0 while their log still counts in the CE). On a float64 copy unless ``grad``: then
    ``model`` must be float64 already, and the maps' graph reaches its parameters."""
    model = model if grad else copy.deepcopy(model).double()
    maps: list[torch.Tensor] = []
    handles = []
    for m in _timm_attentions(model):
        assert type(m).__module__.startswith("timm."), type(m)  # the oracle never runs an adapter
        m.fused_attn = False
        handles.append(m.attn_drop.register_forward_hook(lambda mod, a, out: maps.append(out)))
    with torch.no_grad() if not grad else contextlib.nullcontext():
        model(x.double())
    for h in handles:
        h.remove()
    return maps


def map_ce(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """The per-layer CE from explicit maps, mean over (window, head, query) of -Σ_j P_t log P_s; keys the
    shift mask sends to exactly 0 in fp32 (exp(-100) underflows) contribute 0, without a NaN gradient."""
    p_s = p_s.double()
    log_p_s = torch.log(torch.where(p_s > 0, p_s, torch.ones_like(p_s)))
    return -(p_t.double() * log_p_s).sum(-1).mean()


def _pair(name: str):
    return build(name, seed=0), build(name, seed=1), images(name)


@pytest.mark.parametrize("name", NAMES)
def test_swapped_layers_keep_timms_forward_names_and_stages(name):
    teacher, _, x = _pair(name)
    expected = logits_of(teacher, x)
    swapped = copy.deepcopy(teacher)
    layers = attention_layers(swapped)
    names = [f"{{}}.{i}.blocks.{j}.attn" for i in range(2) for j in range(2)]
    assert all(type(a).__name__.startswith("TransferSwin") for _, a in layers)
    prefix = "stages" if name == "swinv2_cr" else "layers"
    assert [n for n, _ in layers] == [n.format(prefix) for n in names]
    assert attention_stages(swapped) == [(f"{prefix}.0", [0, 1]), (f"{prefix}.1", [2, 3])]
    assert list(swapped.state_dict()) == list(teacher.state_dict())
    # Swin's forward is timm's own; Swin V2's (whose `logit_scale` parameter the interface's method hides) is
    # timm's arithmetic in timm's order
    torch.testing.assert_close(logits_of(swapped, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_maps_on_request_equal_timms_softmax_with_the_shift_mask(name):
    teacher, _, x = _pair(name)
    oracle = oracle_maps(teacher, x)
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert len(maps) == len(oracle) == 4
    # fp32 maps vs float64; cosine attention's logits reach ±200 (τ = 100), and fp32 rounds them at ~1e-5
    tol = 1e-6 if name in ("swin", "swin_padded") else 2e-5
    for i, ref in enumerate(oracle):
        torch.testing.assert_close(maps[i], ref.float(), rtol=1e-5, atol=tol)
    # the shifted blocks' masks reach the maps: pairs from different regions get (almost) no weight
    assert (oracle[1] < 1e-30).any()


@pytest.mark.parametrize(
    "mode", ["copy", *(pytest.param(m, marks=pytest.mark.slow) for m in ("copy_q", "copy_k", "copy_v"))]
)
@pytest.mark.parametrize("name", NAMES)
def test_copy_with_the_teachers_own_weights_reproduces_its_logits(name, mode):
    teacher, _, x = _pair(name)
    expected = logits_of(teacher, x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(teacher), mode=mode).train()
    torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_copy_uses_the_teachers_windows_not_the_students(name):
    teacher, student, x = _pair(name)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    out = dual(x)
    own = logits_of(student, x)
    assert (out.logits - own).abs().max() > 1e-2 * own.abs().max()
    out.logits.square().mean().backward()
    for _, attn in attention_layers(dual.student):  # borrowed q, k: frozen, no gradient
        assert not any(p.requires_grad for n, p in attn.qkv.named_parameters() if n[0] in "qk")


@pytest.mark.parametrize("name", NAMES)
def test_distill_ce_and_gradients_equal_the_materialised_maps(name):
    """Per window attention, the chunked biased CE = -Σ P_t log P_s of timm's own maps (relative-position
    bias, continuous position bias, τ, the shift mask, padded windows), and the student's gradients (its
    tables, cpb_mlp, logit scales included) = those of that materialised loss."""
    teacher, student, x = _pair(name)
    ref_student = copy.deepcopy(student).double().train()
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()
    out = dual(x)
    t_maps = oracle_maps(teacher, x)
    s_maps = oracle_maps(ref_student, x, grad=True)
    assert set(out.terms) == {f"attn_ce/{i}" for i in range(4)}
    ref_terms = [map_ce(t, s) for t, s in zip(t_maps, s_maps)]
    for i, ref in enumerate(ref_terms):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    torch.stack(ref_terms).sum().backward()
    grads = dict(ref_student.named_parameters())
    tol = 1e-5 * max(p.grad.abs().max().item() for p in grads.values() if p.grad is not None)
    compared = set()
    for n, p in dual.student.named_parameters():
        ref = grads[n].grad if grads[n].grad is not None else torch.zeros_like(p)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=0, atol=tol, msg=n)
        if ref.abs().max() > 100 * tol:
            compared.add(n.rsplit(".", 1)[-1] if "attn" in n else n)
    bias_params = {
        "swinv2": {"logit_scale", "0.weight"},  # τ and cpb_mlp
        "swinv2_cr": {"logit_scale", "0.weight"},  # τ and meta_mlp
    }.get(name, {"relative_position_bias_table"})
    assert bias_params <= compared, compared


def test_shared_drop_path_masks_fit_the_stages_nhwc_blocks():
    """Copy from a teacher with the student's own weights under shared drop path (rate 0.5): each block
    applies the student's per-sample draw on both sides, so the result is timm's own train-mode forward of
    the student with the same random stream (its DropPath draws (B, 1, 1, 1) masks in the same order)."""
    teacher = build("swin", drop_path_rate=0.5)
    x = images("swin", batch=4)
    plan = build_plan(teacher, teacher, "copy", share_drop_path=True)
    torch.manual_seed(3)
    expected = copy.deepcopy(teacher).train()(x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(teacher), plan).train()
    torch.manual_seed(3)
    torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_deeper_teacher_pairs_within_stages_with_the_same_shift():
    """Teacher depths (2, 6), student (2, 3): stage 2 maps uniformly (0, 2, 5 of 6), then each student block
    takes the nearest teacher block with its own shift (odd blocks are shifted)."""
    teacher = build("swin", depths=(2, 6))
    student = build("swin", depths=(2, 3))
    plan = build_plan(teacher, student, "distill")
    assert plan.pairs == ((0, 0), (1, 1), (2, 2), (3, 3), (4, 6))
    x = images("swin")
    assert set(DualViT(teacher, student, plan).train()(x).terms) == {f"attn_ce/{i}" for i in range(5)}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(window_size=2),
            "stage layers.0 (student layer 0 <- teacher layer 0) partitions its tokens differently: "
            "window teacher 4x4, student 2x2",
        ),
        (dict(depths=(2, 2, 2), num_heads=(2, 2, 2)), "stage layouts differ: teacher has 2 stages"),
        (dict(img_size=64), "token grids differ: teacher has 16x16 patches"),
    ],
)
def test_mismatched_stage_layouts_fail_at_plan_time_with_one_message(overrides, message):
    teacher = build("swin")
    student = build("swin", **overrides)
    for mode in ("copy", "distill"):
        with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_plan(teacher, student, mode)


def test_swin_v2_student_of_a_swin_teacher_distils_and_copies():
    """Across Swin versions (same stages and windows): the V1 teacher's maps into a V2 student. Distill = the
    CE of the two versions' own maps; copy = the V2 student run by timm with its softmax maps replaced by the
    V1 teacher's (a hook on its ``attn_drop``): the teacher's scale d^-0.5 travels with its q, k, not the
    student's 1."""
    teacher, student, x = build("swin"), build("swinv2", seed=1), images("swin")
    out = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()(x)
    t_maps, s_maps = oracle_maps(teacher, x), oracle_maps(student, x)
    for i, (t, s) in enumerate(zip(t_maps, s_maps)):
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].double(), map_ce(t, s), rtol=1e-5, atol=1e-6)

    oracle = copy.deepcopy(student)
    hooks = [
        m.attn_drop.register_forward_hook(lambda mod, a, o, p=p: p.float())
        for m, p in zip(_timm_attentions(oracle), t_maps)
    ]
    expected = logits_of(oracle, x)
    for h in hooks:
        h.remove()
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").eval()
    torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["swin", "swinv2", "swinv2_cr"])
def test_a_swin_student_exports_to_plain_timm_and_loads_back(name, tmp_path):
    teacher, student, x = _pair(name)
    DualViT(teacher, student, mode="distill").train()(x)
    student.eval()
    out = export_student(student, tmp_path / "out", card=card())
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(_timm_attentions(plain)[0]).__module__.startswith("timm.")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), student(x), rtol=0, atol=0)
        torch.testing.assert_close(load_student(str(out))(x), student(x), rtol=0, atol=0)
