"""What docs/architecture.md says of one training step is what `scripts/step_files.py` measures."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a 1-step tiny distillation run under a profiler hook
def test_the_step_files_and_loss_carriers_docs_state_are_measured():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "step_files.py")], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    chain = out.split("call chain at the optimiser step (CLI first):\n")[1].split("files the step ran")[0]
    assert chain.split() == [
        "attnxfer/launch/cli.py",
        "attnxfer/launch/commands/train.py",
        "attnxfer/apps/run/training.py",
        "attnxfer/train/engine.py",
    ]
    assert "types carrying the loss: 1 (Loss)" in out  # one type from the CE kernels to backward
    files = int(re.search(r"files from the CLI to optimizer.step, the model's forward apart: (\d+)", out)[1])
    docs = (ROOT / "docs" / "architecture.md").read_text()
    assert f"runs {files} attnxfer files from the CLI to `optimizer.step`" in " ".join(docs.split())
    # conversion's stage 1 steps through the same function (no optimiser step of its own)
    stage1 = out.split("conversion's stage 1: the call chain at its optimiser step (CLI first):\n")[1].split()
    assert stage1[0] == "attnxfer/launch/cli.py:main", stage1
    assert stage1[-2:] == ["attnxfer/train/stage1.py:step", "attnxfer/train/engine.py:train_step"], stage1
