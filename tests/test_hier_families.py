"""Swin and Swin V2 (hierarchical, windowed) as teachers and students, against first principles.

Tiny random timm models: 16x16 patches in 4x4 windows, two stages of two blocks (the second block of each
stage shifted, with timm's shifted-window mask), and a padded variant (10x10 patches: windows padded to
12x12, 5x5 in stage 2 padded to 8x8). The oracle is timm's own modules, unfused, with a hook on
``attn_drop`` (the softmax after bias and mask) — never attnxfer's code.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from family_oracles import assert_distill_matches_oracle, logits_of
from helpers import fast_cells
from safetensors.torch import load_file
from test_export import card

from attnxfer import load_student
from attnxfer.apps.training import train
from attnxfer.checkpoints import export_student
from attnxfer.checkpoints.export import ModelCardInfo, export_run
from attnxfer.config import load_config
from attnxfer.models.attention import attention_blocks, attention_layers, attention_maps, attention_stages
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
    post-norm gains at 0 (the attention branch would not reach the logits): they are set to 1; dropout is
    off."""
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
            if isinstance(m, nn.Dropout):  # Swin V2-CR's meta_mlp has dropout: tiny models are deterministic
                m.p = 0.0
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


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swin_padded",)))
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


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swinv2",)))
def test_maps_on_request_equal_timms_softmax_with_the_shift_mask(name):
    teacher, _, x = _pair(name)
    oracle = oracle_maps(teacher, x)
    maps = attention_maps(copy.deepcopy(teacher), x)
    assert len(maps) == len(oracle) == 4
    # fp32 maps vs float64: cosine attention's logits reach ±(τ + 16) with τ = 100, which fp32 rounds at ~1e-5
    tol = dict(rtol=1e-5, atol=1e-6) if name in ("swin", "swin_padded") else dict(rtol=1e-3, atol=1e-4)
    for i, ref in enumerate(oracle):
        torch.testing.assert_close(maps[i], ref.float(), **tol)
    # the shifted blocks' masks reach the maps: pairs from different regions get (almost) no weight
    assert (oracle[1] < 1e-30).any()


@pytest.mark.parametrize(
    "mode", ["copy", *(pytest.param(m, marks=pytest.mark.slow) for m in ("copy_q", "copy_k", "copy_v"))]
)
@pytest.mark.parametrize("name", fast_cells(NAMES, ("swin",)))
def test_copy_with_the_teachers_own_weights_reproduces_its_logits(name, mode):
    teacher, _, x = _pair(name)
    expected = logits_of(teacher, x)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(teacher), mode=mode).train()
    torch.testing.assert_close(dual(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swinv2_cr",)))
def test_copy_uses_the_teachers_windows_not_the_students(name):
    teacher, student, x = _pair(name)
    dual = DualViT(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    out = dual(x)
    own = logits_of(student, x)
    assert (out.logits - own).abs().max() > 1e-2 * own.abs().max()
    out.logits.square().mean().backward()
    for _, attn in attention_layers(dual.student):  # borrowed q, k: frozen, no gradient
        assert not any(p.requires_grad for n, p in attn.qkv.named_parameters() if n[0] in "qk")


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swinv2_cr",)))
def test_distill_ce_and_gradients_equal_the_materialised_maps(name):
    """Per window attention, the chunked biased CE = -Σ P_t log P_s of timm's own maps (relative-position
    bias, continuous position bias, τ, the shift mask, padded windows), and the student's gradients (its
    tables, cpb_mlp, logit scales included) = those of that materialised loss."""
    teacher, student, x = _pair(name)
    # fp32 vs the float64 oracle, relative to the largest gradient; τ = 100 amplifies fp32 rounding 3x more
    rel = 1e-5 if name in ("swin", "swin_padded") else 3e-5
    layers, compared = assert_distill_matches_oracle(
        teacher, student, x, oracle_maps, ce=map_ce, rel=rel, float64_reference=True
    )
    assert layers == 4
    position_and_scale = {  # the logits' own parameters take gradients too
        "swinv2": ("attn.logit_scale", "attn.cpb_mlp.0.weight"),
        "swinv2_cr": ("attn.logit_scale", "attn.meta_mlp.fc1.weight"),
    }.get(name, ("attn.relative_position_bias_table",))
    assert all(any(n.endswith(p) for n in compared) for p in position_and_scale), compared


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


@pytest.mark.slow
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


@pytest.mark.parametrize("name", fast_cells(["swin", "swinv2", "swinv2_cr"], ("swin",)))
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


@pytest.fixture(scope="module")
def swin_teacher_dir(tmp_path_factory):
    """A tiny Swin teacher exported through timm's save (loaded by ``teacher.spec=local-dir:...``)."""
    out = tmp_path_factory.mktemp("swin_teacher") / "teacher"
    export_student(build("swin"), out, card=ModelCardInfo(model_name="tiny-swin", license="apache-2.0"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distill", "copy"])
def test_train_checkpoint_resume_and_export_with_a_swin_teacher(mode, swin_teacher_dir, tmp_path, capsys):
    """`train` in-process with a Swin teacher and its mirrored Swin student: 2 steps, checkpoints at 1 and 2;
    with step 2 deleted the same command resumes from step 1 and ends with bit-identical weights; a distilled
    student exports (copy students need their teacher at inference and are refused) and loads back."""
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{swin_teacher_dir}",
            f"transfer.mode={mode}",
            "data.dataset=synthetic",
            "data.batch_size=4",
            "data.synthetic_length=16",
            "log.progress=false",
            "log.tensorboard=false",
            "checkpoint.every_epoch=false",
            "transfer.ce_path=rows",  # no path measurement before the first step: seconds saved
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=5",
            "schedule.max_steps=2",
            "device=cpu",
            "deterministic=true",
        ],
    )
    result = train(cfg)
    assert result.steps == 2
    step2 = Path(cfg.run_dir) / "checkpoints" / "step-00000002"
    first = load_file(str(step2 / "model.safetensors"))
    assert any(k.startswith("layers.1.blocks.1.attn.relative_position_bias_table") for k in first)
    shutil.rmtree(step2)
    capsys.readouterr()
    train(cfg)
    assert "(step 1, epoch 0" in capsys.readouterr().out
    again = load_file(str(step2 / "model.safetensors"))
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], t) for k, t in first.items())
    if mode == "copy":
        with pytest.raises(ValueError, match="copy"):
            export_run(cfg.run_dir, tmp_path / "export", weights="raw", checkpoint="latest")
        return
    out = export_run(cfg.run_dir, tmp_path / "export", weights="raw", checkpoint="latest")
    student = load_student(str(out)).eval()
    assert type(attention_layers(student)[0][1]).__name__ == "TransferSwinAttention"
    x = images("swin")
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(logits_of(student, x), logits_of(plain, x), rtol=0, atol=0)


def test_the_teacher_stops_after_its_last_transferred_stage():
    """``layers=[0, 1]`` (stage 1 only): the teacher's second stage never runs, and the two terms equal those
    of the full plan (which runs it)."""
    teacher, student, x = _pair("swin")
    calls = []
    teacher.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    part = DualViT(teacher, copy.deepcopy(student), build_plan(teacher, student, "distill", layers=[0, 1]))
    terms = part.train()(x).terms
    assert set(terms) == {"attn_ce/0", "attn_ce/1"} and not calls
    full = DualViT(teacher, copy.deepcopy(student), mode="distill").train()(x).terms
    assert calls
    for k, v in terms.items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)


def test_attention_blocks_are_the_stages_blocks_in_order():
    """What a run compiles (``model.compile``) and shares drop path between: every block that holds an
    attention, stage by stage (a Swin model has no top-level ``blocks``)."""
    model = build("swin")
    assert attention_blocks(model) == [blk for stage in model.layers for blk in stage.blocks]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    assert attention_blocks(vit) == list(vit.blocks)
