"""The Swin families (Swin, Swin V2, Swin V2-CR: hierarchical, windowed) as teachers and students, against
first principles: layer names and stages, the shift mask in the maps, copy in the teacher's windows, pairing
within stages, one message for a mismatched layout, a Swin V2 student of a Swin teacher, `train` end to end.

Tiny random timm models (`cases.SWINS`): 16x16 patches in 4x4 windows, two stages of two blocks (the second
block of each stage shifted, with timm's shifted-window mask), and a padded variant. The oracle is timm's own
modules, unfused, with a hook on ``attn_drop`` (the softmax after bias and mask) — never attnxfer's code. The
suites every family runs (forward, maps, copy, distill, export) are ``test_adapters.py``'s.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from helpers import fast_cells, tiny_run
from safetensors.torch import load_file

from attnxfer import load_student
from attnxfer.apps.run.training import train
from attnxfer.checkpoints import export_student
from attnxfer.checkpoints.export import ModelCardInfo, export_run
from attnxfer.config import load_config
from attnxfer.models import student_like
from attnxfer.models.attention import attention_blocks, attention_layers, attention_stages
from attnxfer.transfer import PlanError, TeacherStudent, build_plan

from .cases import SWINS, build_swin, swin_images
from .oracles import assert_shared_drop_path_copy_is_timms, logits_of, masked_map_ce, swin_oracle_maps

NAMES = sorted(SWINS)


def _timm_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(".attn")]


def _pair(name: str):
    return build_swin(name, seed=0), build_swin(name, seed=1), swin_images(name)


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swin_padded",)))
def test_layer_names_and_stages_are_timms(name):
    """The walk finds each stage's window attentions where timm keeps them and groups them by stage."""
    model = build_swin(name)
    layers = attention_layers(model)
    names = [f"{{}}.{i}.blocks.{j}.attn" for i in range(2) for j in range(2)]
    assert all(type(a).__name__.startswith("TransferSwin") for _, a in layers)
    prefix = "stages" if name == "swinv2_cr" else "layers"
    assert [n for n, _ in layers] == [n.format(prefix) for n in names]
    assert attention_stages(model) == [(f"{prefix}.0", [0, 1]), (f"{prefix}.1", [2, 3])]


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swinv2",)))
def test_the_shift_mask_reaches_the_maps(name):
    """The shifted blocks' masks are in timm's maps, which the adapters' maps equal (`test_adapters.py`):
    pairs from different regions of a shifted window get (almost) no weight."""
    teacher, _, x = _pair(name)
    oracle = swin_oracle_maps(teacher, x)
    assert len(oracle) == 4
    assert (oracle[1] < 1e-30).any()


@pytest.mark.parametrize("name", fast_cells(NAMES, ("swinv2_cr",)))
def test_copy_uses_the_teachers_windows_not_the_students(name):
    teacher, student, x = _pair(name)
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").train()
    out = pair(x)
    own = logits_of(student, x)
    assert (out.logits - own).abs().max() > 1e-2 * own.abs().max()
    out.logits.square().mean().backward()
    for _, attn in attention_layers(pair.student):  # borrowed q, k: frozen, no gradient
        assert not any(p.requires_grad for n, p in attn.qkv.named_parameters() if n[0] in "qk")


def test_shared_drop_path_masks_fit_the_stages_nhwc_blocks():
    """Copy from a teacher with the student's own weights under shared drop path (rate 0.5): each block
    applies the student's per-sample draw on both sides, so the result is timm's own train-mode forward of
    the student with the same random stream (its DropPath draws (B, 1, 1, 1) masks in the same order)."""
    teacher = build_swin("swin", drop_path_rate=0.5)
    x = swin_images("swin", batch=4)
    assert_shared_drop_path_copy_is_timms(teacher, x)


def test_a_deeper_teacher_pairs_within_stages_with_the_same_shift():
    """Teacher depths (2, 6), student (2, 3): stage 2 maps uniformly (0, 2, 5 of 6), then each student block
    takes the nearest teacher block with its own shift (odd blocks are shifted)."""
    teacher = build_swin("swin", depths=(2, 6))
    student = build_swin("swin", depths=(2, 3))
    plan = build_plan(teacher, student, "distill")
    assert plan.pairs == ((0, 0), (1, 1), (2, 2), (3, 3), (4, 6))
    x = swin_images("swin")
    assert set(TeacherStudent(teacher, student, plan).train()(x).terms) == {f"attn_ce/{i}" for i in range(5)}


def test_a_vit_student_of_a_swin_teacher_is_told_its_tokens_are_not_all_it_needs():
    """Its tokens fixed as the first refusal said, a plain ViT meets a second one (Swin's windows): the first
    says so, and what takes every layer's maps."""
    vit = timm.create_model("vit_micro_patch4_28", img_size=32, depth=2, embed_dim=48)
    with pytest.raises(PlanError, match="token grids differ") as err:
        build_plan(build_swin("swin"), vit, "distill")
    assert "not within windows); a student of the teacher's architecture takes every layer's" in str(
        err.value
    )


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
    teacher = build_swin("swin")
    student = build_swin("swin", **overrides)
    for mode in ("copy", "distill"):
        with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_plan(teacher, student, mode)


@pytest.mark.slow
def test_swin_v2_student_of_a_swin_teacher_distils_and_copies():
    """Across Swin versions (same stages and windows): the V1 teacher's maps into a V2 student. Distill = the
    CE of the two versions' own maps; copy = the V2 student run by timm with its softmax maps replaced by the
    V1 teacher's (a hook on its ``attn_drop``): the teacher's scale d^-0.5 travels with its q, k, not the
    student's 1."""
    teacher, student, x = build_swin("swin"), build_swin("swinv2", seed=1), swin_images("swin")
    out = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="distill").train()(x)
    t_maps, s_maps = swin_oracle_maps(teacher, x), swin_oracle_maps(student, x)
    for i, (t, s) in enumerate(zip(t_maps, s_maps)):
        torch.testing.assert_close(
            out.terms[f"attn_ce/{i}"].double(), masked_map_ce(t, s), rtol=1e-5, atol=1e-6
        )

    oracle = copy.deepcopy(student)
    hooks = [
        m.attn_drop.register_forward_hook(lambda mod, a, o, p=p: p.float())
        for m, p in zip(_timm_attentions(oracle), t_maps)
    ]
    expected = logits_of(oracle, x)
    for h in hooks:
        h.remove()
    pair = TeacherStudent(copy.deepcopy(teacher), copy.deepcopy(student), mode="copy").eval()
    torch.testing.assert_close(pair(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def swin_teacher_dir(tmp_path_factory):
    """A tiny Swin teacher exported through timm's save (loaded by ``teacher.spec=local-dir:...``)."""
    out = tmp_path_factory.mktemp("swin_teacher") / "teacher"
    export_student(build_swin("swin"), out, card=ModelCardInfo(model_name="tiny-swin", license="apache-2.0"))
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
            *tiny_run(16, 4),
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
    x = swin_images("swin")
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(logits_of(student, x), logits_of(plain, x), rtol=0, atol=0)


def test_the_teacher_stops_after_its_last_transferred_stage():
    """``layers=[0, 1]`` (stage 1 only): the teacher's second stage never runs, and the two terms equal those
    of the full plan (which runs it)."""
    teacher, student, x = _pair("swin")
    calls = []
    teacher.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    part = TeacherStudent(
        teacher, copy.deepcopy(student), build_plan(teacher, student, "distill", layers=[0, 1])
    )
    terms = part.train()(x).terms
    assert set(terms) == {"attn_ce/0", "attn_ce/1"} and not calls
    full = TeacherStudent(teacher, copy.deepcopy(student), mode="distill").train()(x).terms
    assert calls
    for k, v in terms.items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)


def test_attention_blocks_are_the_stages_blocks_in_order():
    """What a run compiles (``model.compile``) and shares drop path between: every block that holds an
    attention, stage by stage (a Swin model has no top-level ``blocks``)."""
    model = build_swin("swin")
    assert attention_blocks(model) == [blk for stage in model.layers for blk in stage.blocks]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    assert attention_blocks(vit) == list(vit.blocks)


def test_a_mirrored_student_takes_per_stage_heads_and_refuses_a_zero_among_them():
    """A hierarchical family's ``num_heads`` is one count per stage (model.kwargs.num_heads: [1, 1]): checked
    count by count, not compared with 0 as a whole (a TypeError from inside the check)."""
    teacher = build_swin("swin")
    student = student_like(teacher, num_heads=[1, 2])
    assert [a.num_heads for _, a in attention_layers(student)] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"sizes must be positive.*\{'num_heads': \[0, 1\]\}"):
        student_like(teacher, num_heads=[0, 1])
