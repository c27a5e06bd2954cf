"""A *fresh* efficient-attention student in `attnxfer train` (``model.attention``), distilled from
a softmax teacher like any student, exported and loaded back with its attention."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from helpers import peaked_teacher, tiny_run, tiny_vit
from safetensors.torch import load_file
from timm.models import save_for_hf
from timm.models.cait import ClassAttn

import attnxfer
from attnxfer.apps.run.parts import student_attention
from attnxfer.checkpoints.export import export_run
from attnxfer.launch.cli import main
from attnxfer.models.attention import TransferAttention
from attnxfer.models.efficient import HedgehogAttention, PerformerAttention
from attnxfer.sources import load_student


def test_model_attention_names_one_attention_or_one_per_block_and_bad_input_says_what_to_change():
    student = student_attention(tiny_vit(depth=2), "performer", {"num_features": 8})
    assert all(type(b.attn) is PerformerAttention for b in student.blocks)
    assert student.blocks[0].attn.num_features == 8
    mixed = student_attention(tiny_vit(depth=2), ["hedgehog", "softmax"], {})
    assert type(mixed.blocks[0].attn) is HedgehogAttention and isinstance(
        mixed.blocks[1].attn, TransferAttention
    )
    assert type(student_attention(tiny_vit(depth=2), None, {}).blocks[0].attn) is TransferAttention
    with pytest.raises(
        ValueError, match=r"model.attention: unknown attention 'perfromer'; did you mean 'performer'\?"
    ):
        student_attention(tiny_vit(depth=2), "perfromer", {})
    with pytest.raises(ValueError, match=r"unknown attention 'PERFORMER'; did you mean 'performer'\?"):
        student_attention(tiny_vit(depth=2), "PERFORMER", {})  # the wrong case: suggested, not taken
    with pytest.raises(  # said under the key, not under with_attention's argument name (attn)
        ValueError, match="^model.attention: 3 attention names for 2 blocks: give one name for all blocks or"
    ):
        student_attention(tiny_vit(depth=2), ["hedgehog"] * 3, {})
    with pytest.raises(ValueError, match=r"model.attention_kwargs: .*\['num_featurs'\]"):
        student_attention(tiny_vit(depth=2), "performer", {"num_featurs": 8})
    with pytest.raises(ValueError, match="model.attention_kwargs: num_features must be >= 1, got 0"):
        student_attention(tiny_vit(depth=2), "performer", {"num_features": 0})
    with pytest.raises(ValueError, match="model.attention_kwargs: bits must be >= 1, got 0"):
        student_attention(tiny_vit(depth=2), "hashing", {"bits": 0})  # not read as the default (head_dim)
    with pytest.raises(ValueError, match="model.attention_kwargs is set but model.attention is not"):
        student_attention(tiny_vit(depth=2), None, {"num_features": 8})


def test_model_attention_says_which_attention_layers_outside_the_blocks_keep_softmax(capsys):
    # CaiT's class-attention blocks sit beside model.blocks, which the swap walks: they stay softmax, said
    cait = timm.create_model("cait_xxs24_224", img_size=28, patch_size=4, depth=2, depth_token_only=1)
    student = student_attention(cait, "relu_linear", {})
    assert all(type(b.attn).attention_name == "relu_linear" for b in student.blocks)
    assert isinstance(student.blocks_token_only[0].attn, ClassAttn)  # softmax, its family adapter
    assert (
        "model.attention: the 2 blocks of the student's block sequence take relu_linear; "
        "blocks_token_only.0.attn (timm.models.cait.ClassAttn) outside it keeps softmax"
    ) in capsys.readouterr().out
    student_attention(tiny_vit(depth=2), "relu_linear", {})  # a ViT: every attention layer swapped, no line
    assert "keeps softmax" not in capsys.readouterr().out


def test_convert_refuses_model_attention_and_its_options_and_names_the_convert_keys(tmp_path, capsys):
    assert main(["convert", "model.attention=performer", "teacher.spec=vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "model.attention='performer' is for a fresh student" in err
    assert "with convert.attention: set that instead" in err
    # options under model.* were ignored by convert without a word
    args = ["convert", "convert.attention=performer", "model.attention_kwargs.num_features=8"]
    assert main([*args, "teacher.spec=vit_tiny_patch16_224"]) == 2
    assert "with convert.attention_kwargs: set that instead" in capsys.readouterr().err

    # a train recipe's student keys: convert's student is the teacher's, so they are said to be unused
    args = [
        "convert",
        "model.name=vit_small_patch16_224",
        "model.kwargs={depth: 2}",
        "convert.attention=performer",
    ]
    assert main([*args, f"teacher.spec=local-dir:{tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert (
        "warning: model.name=vit_small_patch16_224, model.kwargs={'depth': 2} unused: convert's student"
        in err
    )


@pytest.mark.slow  # a 10-step distillation run, then an export
def test_fresh_hedgehog_student_distils_through_the_cli_and_round_trips_through_export(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    teacher = peaked_teacher(depth=2, plain_timm=True)
    save_for_hf(teacher, teacher_dir, safe_serialization=True)
    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher_dir}",
        "transfer.mode=distill",
        "model.attention=hedgehog",
        *tiny_run(16, 16),  # one batch, the same images every step: the loss is a function of weights
        "schedule.max_steps=10",
        "schedule.warmup_epochs=0",
        "optim.lr=1e-2",
        "transfer.atd_weight=10",
        "model.drop_path_rate=0",
        "log.every_steps=1",
        "checkpoint.every_epoch=false",
        "deterministic=true",
    ]
    assert main(["train", *args]) == 0
    assert "mode=distill" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    attn = [r["transfer"] for r in rows if r.get("split") == "train"]
    assert len(attn) == 10 and attn[-1] < 0.95 * attn[0], attn  # the distillation loss decreases
    assert {k for k in rows[0] if k.startswith("attn_ce/")} == {"attn_ce/0", "attn_ce/1"}
    record = json.loads((run / "run.json").read_text())
    spec = record["student"]
    assert spec["attention"] in ("hedgehog", ["hedgehog", "hedgehog"])
    # what made the run, for a table that cites it: the versions of this process and the command it ran
    software = record["software"]
    assert (software["torch"], software["timm"]) == (torch.__version__, timm.__version__)
    assert software["command"][1:] == sys.argv[1:] and software["attnxfer"] == attnxfer.__version__

    out = export_run(run, tmp_path / "export", weights="raw", checkpoint="latest")
    loaded = load_student(f"local-dir:{out}")
    assert all(type(b.attn) is HedgehogAttention for b in loaded.blocks)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    state = loaded.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    # a fresh student: its attention weights are its own, not the teacher's
    assert not torch.equal(
        state["blocks.0.attn.qkv.weight"], teacher.state_dict()["blocks.0.attn.qkv.weight"]
    )
