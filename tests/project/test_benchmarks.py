"""The benchmarks as a contributor meets them on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_benchmark_asked_for_cuda_without_a_gpu_says_to_use_the_cpu():
    """``--device cuda`` (as docs/benchmarks.md's GPU commands pass) where there is no GPU: one line saying
    what to pass instead, not torch's driver traceback."""
    names = ["transfer_step", "ce_loss", "attention_zoo", "hybrid_speed", "study_step"]
    runs = [
        subprocess.Popen(
            [sys.executable, f"benchmarks/{name}.py", "--device", "cuda"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    errs = {name: r.communicate()[1] for name, r in zip(names, runs)}
    assert all(r.returncode == 1 for r in runs), errs
    assert all(
        e.strip().endswith("needs a CUDA GPU and this machine has none: use --device cpu")
        for e in errs.values()
    ), errs
