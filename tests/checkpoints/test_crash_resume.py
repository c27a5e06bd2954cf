"""SIGKILL at random points of a save-heavy run: the next run always continues and ends bit-identical.

Every step is checkpointed (and every epoch evaluated and checkpointed), so most random instants fall
inside a save: while tensors are written, before or after MANIFEST.json, around the rename, while
pruning. Each trial forks a child that runs ``attnxfer train`` in-process (the CLI's own `main`, no
interpreter start-up), kills it with SIGKILL at a random instant, then runs the same command to the end
and compares its final checkpoint with an uninterrupted run's, tensor by tensor.

The instant is drawn in two parts: a random step whose metrics record the victim must have written
(step k's record follows step k-1's save, so from k = 2 on a checkpoint exists to resume from), then a
random fraction of one step's time. Drawn from the wall clock alone, a loaded machine's slow start-up
would put most kills before the first save.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import fork_cli, tiny_run
from safetensors.torch import load_file

TRIALS = 8

ARGS = [
    *tiny_run(32, 8),  # 4 steps an epoch
    "transfer.mode=none",
    "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
    "log.every_steps=1",
    "deterministic=true",
    "schedule.max_steps=6",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=2",
]


def _start(run_dir: Path, log: Path) -> multiprocessing.Process:
    return fork_cli(["train", f"run_dir={run_dir}", *ARGS], log)


def _train_steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return text.count('"split": "train"')


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "step-00000006" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_at_random_points_across_saves_then_resume_is_bit_identical(tmp_path):
    ref_dir = tmp_path / "ref"
    ref = _start(ref_dir, tmp_path / "ref.log")
    ref.join(120)
    assert ref.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    expected = _final(ref_dir)
    logged = [json.loads(line)["time"] for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    step_seconds = (max(logged) - min(logged)) / 5  # a step and its save, as the uninterrupted run took them

    rng = random.Random(12)
    resumed_from_a_checkpoint = had_a_checkpoint = 0
    for trial in range(TRIALS):
        run_dir, log = tmp_path / f"t{trial}", tmp_path / f"t{trial}.log"
        after_step, fraction = rng.randint(0, 5), rng.random()
        victim = _start(run_dir, log)
        while victim.is_alive() and _train_steps_logged(run_dir) < after_step:
            time.sleep(0.005)
        victim.join(fraction * step_seconds)
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        had_a_checkpoint += after_step >= 2 and victim.exitcode == -signal.SIGKILL
        survivor = _start(run_dir, log)
        survivor.join(120)
        where = (
            f"trial {trial} ({fraction:.2f} of a {step_seconds:.3f}s step after step {after_step}'s record)"
        )
        assert survivor.exitcode == 0, f"{where}: {log.read_text()[-3000:]}"
        resumed_from_a_checkpoint += "resumed from checkpoint step" in log.read_text()
        got = _final(run_dir)
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), f"{where}: {k} differs"
        # every step is recorded once, whatever was redone
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        counts = Counter((r["split"], r["step"]) for r in records)
        assert max(counts.values()) == 1, f"{where}: duplicated records {counts}"
        assert sorted(s for split, s in counts if split == "train") == list(range(1, 7)), where
    # every run killed after a save really resumed from it, rather than starting over
    assert had_a_checkpoint >= 2
    assert resumed_from_a_checkpoint >= had_a_checkpoint
