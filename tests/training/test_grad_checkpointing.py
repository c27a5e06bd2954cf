"""Gradient checkpointing (``model.grad_checkpointing``, timm's ``--grad-checkpointing``): the student's blocks
recompute their activations in the backward pass, and a run trains exactly as one that keeps them.
(Every family's gradients: tests/families/test_adapters.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_run, tiny_vit, torchrun_commands

from attnxfer.apps.run.pretrain import build_pretrain_engine
from attnxfer.apps.run.training import build_engine
from attnxfer.config import load_config
from attnxfer.errors import InputError
from attnxfer.models.mae import MaskedAutoencoder
from attnxfer.train.compile import checkpoint_gradients
from attnxfer.transfer import TeacherStudent, build_plan


def _step_grads(pair: TeacherStudent, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # the drop-path draws
    with pair.kept_for_backward():
        out = pair(x)
        (out.loss + out.logits.pow(2).mean()).backward()
    return [p.grad for p in pair.student.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", ("copy", "distill"))
def test_the_shared_drop_path_masks_reach_the_recomputed_blocks(mode):
    """With share_drop_path the teacher and the student drop the same branches; the recomputed blocks must
    drop them again (masks that were put back after the forward would be timm's fresh draws)."""
    teacher = tiny_vit(depth=3, seed=0, plain_timm=True)
    student = tiny_vit(depth=3, seed=1, plain_timm=True, drop_path_rate=0.3)
    x, grads = torch.randn(4, 3, 32, 32), []
    for checkpointing in (False, True):
        s = copy.deepcopy(student)
        s.set_grad_checkpointing(checkpointing)
        plan = build_plan(teacher, s, mode, share_drop_path=True, feature_weight=1.0)
        grads.append(_step_grads(TeacherStudent(teacher, s, plan).train(), x, seed=3))
    assert len(grads[0]) == len(grads[1])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_checkpointing_student_outside_kept_for_backward_is_refused_and_the_layers_are_freed_after_it():
    """Outside the block the recomputed blocks would attend with their own q/k: refused, not trained wrongly.
    Inside it, one forward; after it the layers hold nothing, so a plain forward (an evaluation) runs."""
    teacher, student = tiny_vit(depth=2, seed=0), tiny_vit(depth=2, seed=1)
    student.set_grad_checkpointing(True)
    pair = TeacherStudent(teacher, student, mode="copy").train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match="inside `with pair.kept_for_backward\\(\\):`"):
        pair(x)
    with pair.kept_for_backward():
        out = pair(x)
        with pytest.raises(InputError, match="one forward of the pair inside each kept_for_backward block"):
            pair(x)
        out.logits.sum().backward()
    assert all(getattr(m, "io", None) is None for m in student.modules())
    with torch.no_grad():
        assert pair.eval()(x).logits.shape == (2, 10)
    with pytest.raises(InputError, match="does not nest"), pair.kept_for_backward(), pair.kept_for_backward():
        pass
    # a pair that lends the layers nothing (logit distillation alone) needs no block
    plan = build_plan(teacher, student, "none", logit_weight=1.0)
    TeacherStudent(teacher, student, plan).train()(x).loss.backward()


def test_a_checkpointing_mae_gets_the_gradients_of_one_that_keeps_its_activations():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(
        tiny_vit(depth=2, num_classes=0), decoder_dim=32, decoder_heads=2, decoder_depth=2
    )
    images = torch.randn(3, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        m = copy.deepcopy(mae)
        checkpoint_gradients(m) if checkpointing else None
        m(images, generator=torch.Generator().manual_seed(1)).loss.backward()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _train_rows(engine) -> list[dict]:
    engine.run()
    rows = [json.loads(line) for line in (engine.checkpointing.manager.dir.parent / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("command", ("copy", "distill", "pretrain"))
def test_a_run_with_grad_checkpointing_logs_the_losses_of_one_without(command, tiny_teacher_dir, tmp_path):
    """The whole path: the key reaches the student (the MAE), the engine steps inside the pair's
    kept_for_backward, and the losses are the same to the last digit (deterministic CPU)."""
    logged = []
    for checkpointing in (False, True):
        args = [*tiny_run(8, 4), f"run_dir={tmp_path / str(checkpointing)}", "schedule.epochs=1"]
        args += ["log.every_steps=1", "deterministic=true", f"model.grad_checkpointing={checkpointing}"]
        if command == "pretrain":
            engine = build_pretrain_engine(load_config(None, args, command="pretrain"))
        else:
            args += [f"teacher.spec=local-dir:{tiny_teacher_dir}", f"transfer.mode={command}"]
            engine = build_engine(load_config(None, args))
        assert any(getattr(m, "grad_checkpointing", False) for m in engine.objective.trained.modules()) is (
            checkpointing
        )
        logged.append(_train_rows(engine))
    assert logged[0] and logged[0] == logged[1]


@pytest.mark.slow
def test_a_two_process_run_with_grad_checkpointing_logs_the_losses_of_one_without(tiny_teacher_dir, tmp_path):
    """DDP (gloo) reduces the gradients of the recomputed blocks as of kept ones: copy with shared drop-path
    masks, the same losses on both ranks' global batch to the last digit."""
    args = [*tiny_run(16, 4), f"teacher.spec=local-dir:{tiny_teacher_dir}", "transfer.mode=copy"]
    args += ["model.drop_path_rate=0.2", "transfer.share_drop_path=true", "schedule.epochs=1"]
    args += ["log.every_steps=1", "deterministic=true"]
    runs = {flag: tmp_path / flag for flag in ("false", "true")}
    torchrun_commands(
        *(
            ["train", *args, f"run_dir={run}", f"model.grad_checkpointing={flag}"]
            for flag, run in runs.items()
        ),
        out=tmp_path / "logs",
    )
    logged = []
    for run in runs.values():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged.append([{k: v for k, v in r.items() if k != "time"} for r in rows if r["split"] == "train"])
    assert len(logged[0]) == 2 and logged[0] == logged[1]
