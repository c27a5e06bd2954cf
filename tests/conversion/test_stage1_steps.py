"""The step contracts in stage 1 of conversion: no host reads on unlogged steps, logged means equal to
per-step values read the old way, a non-finite loss that still raises (naming block, attention, objective
and step) and leaves the student at its weights before the bad step, and the fused AdamW of `build_adamw`."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import SyncCounter, peaked_teacher, torchrun_launch

import attnxfer.train.stage1 as stage1_module
from attnxfer.models.efficient import build_efficient_student
from attnxfer.train.optim import optimizer_implementation
from attnxfer.train.stage1 import stage1_transfer, teacher_signals
from attnxfer.train.terms import NonFiniteLossError
from attnxfer.transfer.conversion import build_conversion_plan

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FIELDS = ("input", "q", "k")


def _teacher():
    return peaked_teacher(depth=2, qkv_bias=True).eval().requires_grad_(False)


def _student_and_plan(teacher, steps: int, **kw):
    """A Hedgehog student fitted on its new feature maps and its q/k rows (both param groups: plain and
    row-masked), with the output MSE: every per-step piece of stage 1 runs."""
    torch.manual_seed(0)
    student = build_efficient_student(teacher, "hedgehog")
    plan = build_conversion_plan(
        teacher,
        student,
        stage1_steps=steps,
        stage1_lr=kw.pop("stage1_lr", 1e-2),
        stage1_batch_size=4,
        stage1_train="new+qk",
        output_mse=0.5,
        **kw,
    )
    return student, plan


def _images(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(n)]


def _signals(teacher, n: int = 3):
    return [teacher_signals(teacher, x, [0, 1], (*FIELDS, "output")) for x in _images(n)]


def test_unlogged_stage1_steps_never_read_a_tensor_on_the_host(monkeypatch):
    teacher = _teacher()
    student, plan = _student_and_plan(teacher, steps=7)
    built = []
    real_build = stage1_module.build_adamw
    monkeypatch.setattr(
        stage1_module, "build_adamw", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    )
    marks: list[int] = []  # how many reads the counter had seen when each step drew its batch

    def batches(counter):
        for x in itertools.cycle(_images()):
            marks.append(len(counter.calls))
            yield x

    with SyncCounter() as counter:
        result = stage1_transfer(
            teacher, student, plan, batches(counter), weight_decay=0.05, clip_grad=1.0, log_every=3
        )
    marks.append(len(counter.calls))
    per_step = {s: counter.calls[marks[s] : marks[s + 1]] for s in range(7)}
    assert [r["step"] for r in result.history] == [1, 3, 6, 7]
    unlogged = {s: per_step[s] for s in (1, 3, 4)}
    assert all(not calls for calls in unlogged.values()), unlogged
    # the counter sees the real reads: the log steps read the guard and the window's sums
    for s in (0, 2, 5, 6):
        assert any("Tensor.tolist" in what for what, _ in per_step[s]), per_step[s]
    # the one optimiser decision: torch's fused AdamW (CUDA's kernel choice is also the CPU's)
    assert len(built) == 1 and optimizer_implementation(built[0]) == "fused"
    assert [g["weight_decay"] for g in built[0].param_groups] == [0.05, 0.0]  # q/k rows: no decay


def test_logged_means_equal_the_per_step_values_read_on_the_host(monkeypatch):
    """The reference reads every layer's loss and metric with float() as the old loop did (a spy around the
    real `layer_fit_loss`); each record is the mean over the steps since the previous one."""
    teacher = _teacher()
    student, plan = _student_and_plan(teacher, steps=7)
    seen: list[tuple[int, float, float]] = []
    real = stage1_module.layer_fit_loss

    def spy(attn, layer, signals, output_weight):
        loss, metric = real(attn, layer, signals, output_weight)
        seen.append((layer.layer, float(loss.detach()), float(metric)))
        return loss, metric

    monkeypatch.setattr(stage1_module, "layer_fit_loss", spy)
    result = stage1_transfer(teacher, student, plan, itertools.cycle(_signals(teacher)), log_every=3)
    assert len(seen) == 7 * 2
    per_step = [seen[2 * s : 2 * s + 2] for s in range(7)]
    windows = [range(0, 1), range(1, 3), range(3, 6), range(6, 7)]
    assert [r["step"] for r in result.history] == [w.stop for w in windows]
    for rec, window in zip(result.history, windows, strict=True):
        n = len(window)
        assert rec["loss"] == pytest.approx(
            sum(loss for s in window for _, loss, _ in per_step[s]) / n, rel=1e-6
        )
        for i in (0, 1):
            want = sum(per_step[s][i][2] for s in window) / n
            assert per_step[0][i][0] == i and rec[f"metric/{i}"] == pytest.approx(want, rel=1e-6)
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # it trains


def test_stage1_leaves_no_gradients_for_the_next_stage():
    """Stage 1 steps through the engine's `train_step`, which clears the gradients after each step: stage 2's
    first step (an engine that accumulates into ``.grad``) sees only its own batch's gradients, as a
    conversion resumed between the stages does, never the last stage-1 batch's."""
    teacher = _teacher()
    student, plan = _student_and_plan(teacher, steps=2)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    stage1_transfer(teacher, student, plan, itertools.cycle(_signals(teacher, 1)))
    assert any(not torch.equal(p, before[name]) for name, p in student.named_parameters())  # it stepped
    assert [name for name, p in student.named_parameters() if p.grad is not None] == []


class _Halt(Exception):
    """Stops the reference run when it draws the batch of the bad step."""


@pytest.mark.parametrize("log_every,drawn", [(2, 4), (100, 8)])
def test_non_finite_loss_raises_with_block_attention_step_and_leaves_the_weights_before_it(log_every, drawn):
    """Block 1's input is NaN at step index 3 (of 8). The error names it as step 4, as stage 1's log lines
    number steps, at the first log step from step 3 on (step 3 itself with log_every=2, the last step with 100); the student holds
    exactly the weights of a reference run stopped before step 3 (same schedule), none NaN."""
    teacher = _teacher()
    good = _signals(teacher, 4)
    poisoned = {0: good[3][0], 1: {**good[3][1], "input": torch.full_like(good[3][1]["input"], float("nan"))}}
    items = [*good[:3], poisoned, *good[:4]]

    def batches(halt_at: int | None = None):
        for step, item in enumerate(items):
            if step == halt_at:
                raise _Halt
            draws.append(step)
            yield item

    draws: list[int] = []
    student, plan = _student_and_plan(teacher, steps=8)
    with pytest.raises(NonFiniteLossError) as err:
        stage1_transfer(teacher, student, plan, batches(), clip_grad=1.0, log_every=log_every)
    assert str(err.value) == (
        "stage 1: non-finite ce loss in block 1 (hedgehog) at step 4; lower convert.stage1_lr or set "
        "convert.stage1_clip_grad"
    )
    assert len(draws) == drawn
    assert all(p.requires_grad for p in student.parameters())  # restored for stage 2, as on success
    reference, _ = _student_and_plan(teacher, steps=8)
    with pytest.raises(_Halt):
        stage1_transfer(teacher, reference, plan, batches(halt_at=3), clip_grad=1.0, log_every=log_every)
    got, want = student.state_dict(), reference.state_dict()
    assert all(torch.isfinite(v).all() for v in got.values())
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert not changed, changed
    assert any(not torch.equal(want[k], v) for k, v in _student_and_plan(teacher, 8)[0].state_dict().items())


@pytest.mark.slow  # two torchrun processes: ~10 s
def test_two_ranks_skip_and_raise_together_when_one_rank_goes_non_finite(tmp_path):
    """Rank 1's block-1 input is NaN at step 3. Its guard's flag rides in the gradients' all-reduce, so both
    ranks skip from step 3 on (weights finite and equal) and both raise the same error at the log step;
    without a NaN the ranks log the same means (averaged over ranks)."""
    root = Path(__file__).resolve().parents[2]
    launch, env = torchrun_launch(ranks=2)
    res = subprocess.run(
        [*launch, str(root / "tests" / "dist_stage1.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=root,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["clean"]["history"] == r1["clean"]["history"] and len(r0["clean"]["history"]) == 3
    message = (
        "stage 1: non-finite ce loss in block 1 (hedgehog) at step 4; lower convert.stage1_lr or set "
        "convert.stage1_clip_grad"
    )
    assert r0["nan"].get("error") == r1["nan"].get("error") == message
    for case in ("clean", "nan"):
        assert r0[case]["finite"] and r1[case]["finite"]
        assert r0[case]["weights"] == r1[case]["weights"]
    assert r0["nan"]["weights"] != r0["clean"]["weights"]


def test_a_stage1_resumed_between_two_log_steps_logs_the_records_of_an_uninterrupted_one():
    """A save between log steps (every checkpoint.every_steps, a SIGTERM) keeps the terms summed since the last
    record, so the resumed stage 1's next record is the mean over the same steps as an uninterrupted run's."""
    teacher = _teacher()
    student, plan = _student_and_plan(teacher, steps=6)
    saves = []

    def on_save(step, optimizer_state, result):
        saves.append(copy.deepcopy((step, student.state_dict(), optimizer_state, result)))
        return None

    images = _images(6)
    whole = stage1_transfer(teacher, student, plan, iter(images), log_every=4, on_save=on_save, save_every=3)
    ((step, weights, optimizer_state, result),) = saves
    resumed, _ = _student_and_plan(teacher, steps=6)
    resumed.load_state_dict(weights)
    again = stage1_transfer(
        teacher,
        resumed,
        plan,
        iter(images[step:]),
        log_every=4,
        start_step=step,
        optimizer_state=optimizer_state,
        history=result.history,
        log_window=result.window,
    )
    assert [r["step"] for r in again.history] == [1, 4, 6]
    assert again.history == whole.history
