"""The student's EMA (timm's `ModelEmaV3` underneath): the recurrence it computes, on a copy-mode student
whose fused qkv is a `PartialQKV`, and a resumed run whose EMA is bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import peaked_teacher, rewrite_checkpoint_state, tiny_run, tiny_vit
from safetensors.torch import load_file

from attnxfer.apps.run.training import train
from attnxfer.checkpoints.export import ModelCardInfo, export_student
from attnxfer.checkpoints.verify import MANIFEST_NAME
from attnxfer.config import load_config
from attnxfer.models import PartialQKV
from attnxfer.run_layout import STATE_NAME
from attnxfer.train.ema import StudentEMA
from attnxfer.train.metrics import read_metrics
from attnxfer.transfer import TeacherStudent, build_plan


def test_ema_is_the_recurrence_on_parameters_and_copies_buffers_of_a_copy_mode_student():
    """ema_k = d·ema_(k−1) + (1−d)·w_k on every parameter (float64 reference), buffers copied; the copied
    layer's ``qkv.weight`` in the EMA's state_dict (a concatenation made on read) holds the averaged v rows
    and the copied q/k rows: averaging state_dict() values would have left them at their first value."""
    teacher, student = tiny_vit(depth=2, seed=1), tiny_vit(depth=2, seed=2)
    TeacherStudent(teacher, student, build_plan(teacher, student, "copy"))
    qkv = student.blocks[0].attn.qkv
    assert isinstance(qkv, PartialQKV) and set(qkv.frozen) == {"q", "k"}
    decay = 0.8
    ema = StudentEMA(student, decay)
    ref_p = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            for b in student.buffers():
                if b.is_floating_point():
                    b.add_(torch.randn(b.shape, generator=g))
        ema.update(student)
        for n, p in student.named_parameters():
            ref_p[n] = decay * ref_p[n] + (1 - decay) * p.detach().double()
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p.double(), ref_p[n], rtol=0, atol=1e-5)
        assert not p.requires_grad
    for (n, b), (_, sb) in zip(ema.module.named_buffers(), student.named_buffers(), strict=True):
        assert torch.equal(b, sb), n
    rows = qkv.out_features // 3
    averaged = ema.state_dict()["blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(
        averaged[2 * rows :].double(), ref_p["blocks.0.attn.qkv.v_weight"], rtol=0, atol=1e-5
    )
    assert torch.equal(averaged[:rows], qkv.q_weight)  # copied (a buffer), not averaged


@pytest.mark.slow  # two 4-step runs with a teacher: about 20 s here
def test_resumed_copy_run_ends_with_a_bit_identical_ema(tmp_path, capsys):
    """A copy-mode run with EMA, checkpointed at steps 2 and 4, ranks its checkpoints by the EMA's top-1; delete
    step 4, run the same command again (it resumes from step 2) and the new step-4 EMA and weights equal the
    first run's bit for bit."""
    teacher_dir = tmp_path / "teacher"
    teacher = peaked_teacher(depth=2)
    export_student(teacher, teacher_dir, card=ModelCardInfo(model_name="tiny", license="apache-2.0"))
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"teacher.spec=local-dir:{teacher_dir}",
            "transfer.mode=copy",
            "ema.decay=0.9",
            *tiny_run(64, 8),
            "checkpoint.every_epoch=false",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=5",
            "schedule.max_steps=4",
            "device=cpu",
            "deterministic=true",
        ],
    )
    result = train(cfg)
    run = Path(cfg.run_dir)
    step4 = run / "checkpoints" / "step-00000004"
    first = {g: load_file(str(step4 / f"{g}.safetensors")) for g in ("model", "ema")}
    assert any(k.endswith("qkv.weight") for k in first["ema"])
    # checkpoints are ranked by the EMA's top-1: the weights `load_student` and export take by default
    (scored,) = read_metrics(run, "val")
    assert result.metric == json.loads((run / "run.json").read_text())["best_metric"] == "ema_val_top1"
    assert json.loads((step4 / MANIFEST_NAME).read_text())["metric"] == scored["ema_val_top1"] == result.best
    assert "EMA val top1" in capsys.readouterr().out
    # a run whose checkpoints were ranked by the raw weights' top-1 (before EMA ranking) resumes ranked so
    step2 = run / "checkpoints" / "step-00000002"
    rewrite_checkpoint_state(step2 / STATE_NAME, lambda state: state.update(best_metric="val_top1"))
    shutil.rmtree(step4)
    assert train(cfg).metric == "val_top1"
    assert "(step 2, epoch 0" in capsys.readouterr().out
    (scored,) = read_metrics(run, "val")
    assert json.loads((step4 / MANIFEST_NAME).read_text())["metric"] == scored["val_top1"]
    for group, tensors in first.items():
        again = load_file(str(step4 / f"{group}.safetensors"))
        assert again.keys() == tensors.keys()
        for k, t in tensors.items():
            assert torch.equal(again[k], t), (group, k)
    # the EMA moved away from the weights it started from (it is an average, not a copy)
    assert not all(torch.equal(first["ema"][k], first["model"][k]) for k in first["model"])
