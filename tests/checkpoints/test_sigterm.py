"""SIGTERM (``kill``, ``scancel``, preemption without USR2) stops ``attnxfer train`` at a step boundary.

The run saves the step it stopped at, says so, exits 143 (128 + SIGTERM), and the same command resumes
it to the very weights of an uninterrupted run. Each run is a forked child running the CLI's own `main`
(`helpers.fork_cli`, as in tests/checkpoints/test_crash_resume.py); the signal comes from outside, by process id.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import fork_cli, tiny_convert_report, tiny_run
from safetensors.torch import load_file

from attnxfer.checkpoints.resume_point import ResumePoint

STEPS = 40
ARGS = [
    *tiny_run(512, 8),  # 64 steps an epoch: one evaluation, at the end
    "transfer.mode=none",
    "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
    "log.every_steps=1",
    "deterministic=true",
    f"schedule.max_steps={STEPS}",
    "checkpoint.every_steps=1000",  # no periodic save: a checkpoint mid-run can only come from the stop
]


@pytest.fixture
def cli_run():
    """Starts the CLI in forked children (`fork_cli`: argv, log); any child still running when the test
    ends (a failed assertion) is killed, not left behind."""
    procs = []

    def start(argv: list[str], log: Path):
        procs.append(fork_cli(argv, log))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()


def stop_with_sigterm(
    proc, log: Path, started: Callable[[], bool], command: str, rerun: str = "", signum: int = signal.SIGTERM
) -> tuple[int, Path, str]:
    """Waits until ``started()``, sends ``proc`` ``signum`` (SIGTERM, or Ctrl-C's SIGINT) from outside and reads
    how it stopped: exit 128 + signum and the one line naming the step it saved, where, and how to resume (the
    same command, ``rerun`` added). Returns (step, checkpoint, the log)."""
    deadline = time.monotonic() + 120
    while not started():
        assert proc.is_alive() and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signum)
    proc.join(120)
    text = log.read_text()
    name = signal.Signals(signum).name
    assert proc.exitcode == 128 + signum, text[-3000:]
    m = re.search(
        rf"attnxfer {command}: stopped by {name} at step (\d+) of \d+; checkpoint saved \((.+?)\); "
        rf"re-run the same command{re.escape(rerun)} to resume",
        text,
    )
    assert m, text[-3000:]
    assert text.count(f"stopped by {name}") == 1, text[-3000:]  # said once, by the CLI, with what to do
    return int(m.group(1)), Path(m.group(2)), text


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def _train(run_dir: Path) -> list[str]:
    return ["train", f"run_dir={run_dir}", *ARGS]


def _train_records(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"train"' in line)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"))


@pytest.mark.slow
def test_sigterm_saves_the_step_says_so_and_the_same_command_resumes_bit_identically(tmp_path, cli_run):
    ref = cli_run(_train(tmp_path / "ref"), tmp_path / "ref.log")
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = cli_run(_train(run_dir), log)
    step, saved_at, text = stop_with_sigterm(proc, log, lambda: _train_records(run_dir) >= 3, "train")
    assert 3 <= step < STEPS
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved == [f"step-{step:08d}"] and saved_at.name == saved[0]
    state = json.loads((run_dir / "checkpoints" / saved[0] / "state.json").read_text())
    assert state["step"] == step
    assert "Traceback" not in text

    again = cli_run(_train(run_dir), log)  # the same command
    again.join(180)
    ref.join(180)
    assert again.exitcode == 0 and ref.exitcode == 0, log.read_text()[-3000:]
    assert f"resumed from checkpoint step {step}" in log.read_text()
    assert_same_tensors(_final(run_dir), _final(tmp_path / "ref"))


@pytest.mark.slow
def test_a_run_that_started_over_is_told_to_resume_with_auto(tmp_path, cli_run):
    """Run again as it was, checkpoint.resume=none would start over once more and keep the saved step aside."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = cli_run([*_train(run_dir), "checkpoint.resume=none"], log)
    rerun = " with checkpoint.resume=auto (checkpoint.resume=none would start over again)"
    step, saved_at, _ = stop_with_sigterm(proc, log, lambda: _train_records(run_dir) >= 2, "train", rerun)
    assert saved_at.name == f"step-{step:08d}"


@pytest.mark.slow
def test_sigusr2_of_an_sbatch_signal_saves_the_step_and_says_to_run_again(tmp_path, cli_run):
    """``#SBATCH --signal=USR2@120`` (or submitit's USR_SIG) around a plain ``attnxfer train``: SIGUSR2's
    default action ended the run unsaved; it stops as SIGTERM does, exit 140, the step saved."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = cli_run(_train(run_dir), log)
    stop = stop_with_sigterm(proc, log, lambda: _train_records(run_dir) >= 3, "train", signum=signal.SIGUSR2)
    step, saved_at, text = stop
    assert 3 <= step < STEPS and "Traceback" not in text
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [saved_at.name]
    assert ResumePoint.find(run_dir).step == step


def test_sigusr2_is_caught_only_where_no_handler_takes_it():
    """A plain run catches SIGUSR2 (its default ends the process); a submitted job's handler (submitit's
    requeue) keeps it, as before."""
    from attnxfer.train.stop import StopRequested, stop_on_signals, stop_signal

    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with pytest.raises(StopRequested), stop_on_signals():
            assert signal.getsignal(signal.SIGUSR2) != signal.SIG_DFL  # else the kill would end pytest
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop_signal() == signal.SIGUSR2
            raise StopRequested(signal.SIGUSR2, 1, None)  # as a loop stops on it
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
        taken = []
        signal.signal(signal.SIGUSR2, lambda signum, frame: taken.append(signum))
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop_signal() is None and taken == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_submitted_jobs_usr2_requeue_waits_for_the_loop_to_save_its_step(capsys):
    """A submitted job's USR2 handler (submitit's requeue, which saves nothing) is marked to wait for a step:
    inside a loop the signal stops it as SIGTERM does (the step saved, then the job requeues), and the handler
    does not run mid-step; one that came during the last step runs as the block ends; outside a loop it runs
    at once."""
    from attnxfer.train.stop import WAITS_FOR_A_STEP, StopRequested, stop_on_signals, stop_signal

    taken = []

    def requeue(signum, frame):
        taken.append(signum)

    setattr(requeue, WAITS_FOR_A_STEP, True)
    before = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(StopRequested), stop_on_signals():
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop_signal() == signal.SIGUSR2 and taken == []
            raise StopRequested(signal.SIGUSR2, 1, None)  # as the loop stops on it, its step saved
        assert taken == [] and signal.getsignal(signal.SIGUSR2) is requeue
        with stop_on_signals():  # the loop's last step: no step left to stop at
            os.kill(os.getpid(), signal.SIGUSR2)
            assert taken == []
        assert taken == [signal.SIGUSR2]
        assert (
            "SIGUSR2 came as the loop ended, its work saved: its job requeues now" in capsys.readouterr().out
        )
        os.kill(os.getpid(), signal.SIGUSR2)  # no loop: submitit's requeue at once
        assert taken == [signal.SIGUSR2] * 2
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_signal_the_loop_did_not_stop_on_acts_as_it_ends_not_lost(capsys):
    """Ctrl-C (or a preemption's SIGTERM) during a loop's last step or its final evaluation: the loop had no
    step left to stop at, and the signal was dropped as the block ended, the process going on for minutes
    (a conversion's speed report). It acts once the block ends, after one line saying so."""
    from attnxfer.train.stop import stop_on_signals

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop_on_signals():
                os.kill(os.getpid(), signal.SIGINT)  # caught: only a flag, which no step reads again
            time.sleep(1)
        assert "SIGINT came as the loop ended" in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_sigterm_during_the_last_step_ends_the_process_with_its_code_and_releases_the_runs_lock(tmp_path):
    """SIGTERM during a run's last step or final evaluation was sent again as the loop ended, and its default
    action ended the process inside the run's lock: the lock stayed, and the next run said it took over the
    lock of a process that is gone. It ends the process through the blocks around the loop: exit code 143."""
    from attnxfer.checkpoints.run_lock import run_lock
    from attnxfer.run_layout import LOCK_NAME
    from attnxfer.train.stop import stop_on_signals

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as ended, run_lock(tmp_path, "train"), stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)  # caught: only a flag, which no step reads again
        assert ended.value.code == 143
        assert not (tmp_path / LOCK_NAME).exists()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_outside_a_training_loop_keeps_the_default_action(tmp_path):
    """Only a loop that checks the flag catches SIGTERM: before and after it, the process ends as usual."""
    from attnxfer.train.stop import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_loop_inside_another_leaves_the_outer_one_the_signal():
    """A fit inside auto's selection: SIGTERM during the inner loop is the outer one's too (its flag is not
    cleared when the inner loop ends), and the outer loop's handler stays until it ends."""
    from attnxfer.train.stop import stop_on_signals, stop_signal

    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # not pytest's end, whatever happens
    try:
        with stop_on_signals():
            outer = signal.getsignal(signal.SIGTERM)
            with stop_on_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                assert stop_signal() == signal.SIGTERM
            assert stop_signal() == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is outer
        assert stop_signal() is None
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ctrl_c_in_a_training_loop_sets_the_stop_flag_and_a_second_one_interrupts_at_once():
    """Ctrl-C (SIGINT) stops a loop as SIGTERM does, at a step boundary with that step saved (timm's and
    submitit's convention); a second Ctrl-C is KeyboardInterrupt at once, and an ignored SIGINT (``cmd &``)
    stays ignored."""
    from attnxfer.train.stop import stop_on_signals, stop_signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a foreground command's Ctrl-C
    try:
        with stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                caught = stop_signal()
            except KeyboardInterrupt:  # the first Ctrl-C must not interrupt (nor end pytest's session)
                caught = None
            assert caught == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------- convert's stage 1
S1_STEPS = 40


def _convert(run_dir: Path, teacher: Path) -> list[str]:
    return [
        "convert",
        f"run_dir={run_dir}",
        f"teacher.spec=local-dir:{teacher}",
        *tiny_run(64, 8),  # 8 stage-1 batches an epoch: the stop lands mid-epoch or later
        "convert.attention=hedgehog",
        f"convert.stage1_steps={S1_STEPS}",
        "schedule.max_steps=1",
        "transfer.mode=none",
        "log.every_steps=1",
        "deterministic=true",
        *tiny_convert_report(1, 2),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_in_convert_stage1_saves_its_step_and_the_same_command_continues_there(
    tmp_path, tiny_teacher_dir, cli_run, signum
):
    teacher = tiny_teacher_dir
    ref = cli_run(_convert(tmp_path / "ref", teacher), tmp_path / "ref.log")
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = cli_run(_convert(run_dir, teacher), log)
    step, saved_at, text = stop_with_sigterm(
        proc, log, lambda: log.exists() and "stage 1 step 3/" in log.read_text(), "convert", signum=signum
    )
    assert 3 <= step < S1_STEPS and "Traceback" not in text
    # saved through the checkpoint store, as any run: the step, its optimiser, not marked complete
    saved = ResumePoint.find(run_dir / "stage1")
    assert saved_at == saved.path and saved.step == step and not saved.record("complete")
    assert {"model", "optimizer"} <= set(saved.checkpoint.groups)
    assert not (run_dir / "stage2").exists()

    again = cli_run(_convert(run_dir, teacher), log)  # the same command
    again.join(180)
    ref.join(180)
    text = log.read_text()
    assert again.exitcode == 0 and ref.exitcode == 0, text[-3000:]
    assert f"stage 1: resumed from {saved.path} (step {step} of {S1_STEPS})" in text
    assert f"stage 1 step {step + 1}/{S1_STEPS}" in text.split("resumed from")[-1]
    assert f"stage 1 step {step}/{S1_STEPS}" not in text.split("resumed from")[-1]  # no step redone
    # continuing from the saved step gives the very stage-1 weights of an uninterrupted conversion
    done = [ResumePoint.find(r / "stage1") for r in (tmp_path / "ref", run_dir)]
    assert all(p.record("complete") and p.step == S1_STEPS for p in done)
    assert not saved.path.exists()  # the complete checkpoint replaced the partial one (keep_last=1)
    expected, got = (p.load_tensors()["model"] for p in done)
    assert_same_tensors(got, expected)
    a, b = (p.state for p in done)
    assert [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]]
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


def test_a_preemption_signal_while_a_job_loads_its_task_is_held_for_submitits_handler(monkeypatch):
    """submitit's job process installs its USR2 handler only after unpickling the task (seconds of imports):
    a USR2 before it would end the job unsaved. The package holds it from its first import there, and the task
    passes it on to the handler submitit installed; a command that submits leaves USR2 as it is."""
    from attnxfer.launch.slurm.held_signal import hold_usr2_while_loading, pass_on_held_usr2

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setattr(sys, "argv", ["/venv/lib/site-packages/submitit/core/_submit.py", "/jobs"])
    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        hold_usr2_while_loading()
        os.kill(os.getpid(), signal.SIGUSR2)  # at its default action, this would end pytest
        taken = []
        signal.signal(signal.SIGUSR2, lambda signum, frame: taken.append(signum))  # submitit's, once loaded
        pass_on_held_usr2()
        assert taken == [signal.SIGUSR2]
        pass_on_held_usr2()
        assert taken == [signal.SIGUSR2]  # passed on once
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        monkeypatch.setattr(sys, "argv", ["/venv/bin/attnxfer", "submit"])
        hold_usr2_while_loading()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before)
