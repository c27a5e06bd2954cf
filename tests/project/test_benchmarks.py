"""The benchmarks as a contributor meets them on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_scripts

ROOT = Path(__file__).resolve().parents[2]

#: the benchmark runs the tests below read, each ``python benchmarks/NAME.py ARGS`` as a contributor types it
_CUDA = ["transfer_step", "ce_loss", "attention_zoo", "hybrid_speed", "study_step"]
_MISTYPED = {
    "attention_zoo": ["--tokens", "17", "--batch", "1", "--dim", "32", "--heads", "2"],
    "model_throughput": ["--model", "vit_tiny_patch16_224", "--resolutions", "32", "--batch", "1"],
}
_TRITON = {
    "ce_loss": ["--tokens", "17", "--batch", "1", "--warmup", "0", "--repeats", "1"],
    "transfer_step": ["--quick", "--tokens", "17", "--depth", "1", "--warmup", "0", "--repeats", "1"],
}
_RUNS = {
    **{("cuda", name): [name, "--device", "cuda"] for name in _CUDA},
    **{("mistyped", name): [name, *args, "--attentions", "linear"] for name, args in _MISTYPED.items()},
    ("grid", "attention_zoo"): ["attention_zoo", "--tokens", "18", "--attentions", "relu_linear"],
    ("cuda", "model_throughput"): ["model_throughput", "--device", "cuda"],
    ("memory", "stage1_throughput"): ["stage1_throughput", "--steps-per-round", "1", "--warmup", "0"]
    + ["--repeats", "1"],
    **{
        ("triton", name): [name, *args, "--device", "cpu", "--ce-paths", "triton"]
        for name, args in _TRITON.items()
    },
}


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str], tuple[int, str, str]]:
    """Every run above, (exit code, stdout, stderr), from one interpreter (torch imported once, not 12 times),
    without TRITON_INTERPRET (the triton refusal is for a CPU run that would otherwise interpret kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argvs = [[f"benchmarks/{name}.py", *args] for name, *args in _RUNS.values()]
    return dict(zip(_RUNS, run_scripts(*argvs, env=env), strict=True))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_benchmark_asked_for_cuda_without_a_gpu_says_to_use_the_cpu(runs):
    """``--device cuda`` (as docs/benchmarks.md's GPU commands pass) where there is no GPU: one line saying
    what to pass instead, not torch's driver traceback."""
    errs = {name: runs["cuda", name][2] for name in _CUDA}
    assert all(runs["cuda", name][0] == 1 for name in _CUDA), errs
    assert all(
        e.strip().endswith("needs a CUDA GPU and this machine has none: use --device cpu")
        for e in errs.values()
    ), errs


@pytest.mark.slow
def test_a_mistyped_attention_name_is_refused_with_the_registrys_message_not_a_traceback(runs):
    """``--attentions linear`` (no such attention) to the zoo and whole-model benchmarks: one line naming the
    flag and suggesting the attentions of that name, where both met a KeyError / InputError traceback."""
    for name in _MISTYPED:
        code, _, err = runs["mistyped", name]
        assert code in (1, 2) and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert (
            "--attentions" in last
            and "unknown attention 'linear'; did you mean one of 'elu_linear', 'focused_linear'," in last
        ), err


@pytest.mark.slow
def test_the_zoo_benchmark_refuses_a_token_count_without_a_square_grid_in_one_line(runs):
    """``attention_zoo.py --tokens 18``: the flag and what it takes, as hybrid_speed.py and transfer_step.py
    answer, where it met an AssertionError traceback."""
    code, _, err = runs["grid", "attention_zoo"]
    assert code == 2 and "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("--tokens 18: a class token + a square grid, e.g. 197, 785 or 3137")
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_model_throughput_refusing_cuda_names_the_device_flag_it_was_given_not_the_gpu_preset(runs):
    """``model_throughput.py --device cuda`` (the cpu preset): the refusal names ``--device cuda``, where it
    said ``--preset gpu needs CUDA`` to a user who never passed --preset."""
    code, _, err = runs["cuda", "model_throughput"]
    assert code == 1, err
    assert err.strip() == "--device cuda needs a CUDA GPU and this machine has none: use --device cpu"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's memory figure")
def test_stage1_throughput_on_cpu_says_peak_memory_is_not_measured_instead_of_stage1s_rss_growth(runs):
    """Stage 1's own memory line is the process's RSS growth on CPU, which read ``peak 0 MiB`` from the second
    round on (the rounds reuse pages the process holds): one round of one step shows it is left out."""
    code, out, err = runs["memory", "stage1_throughput"]
    assert code == 0, err
    assert "stage 1 memory:" not in out and "peak memory: n/a on CPU" in out, out


@pytest.mark.slow
def test_a_benchmark_asked_for_the_triton_ce_path_on_the_cpu_says_it_needs_cuda_before_any_work(runs):
    """``--ce-paths triton`` (as the GPU commands of docs/benchmarks.md pass) on a CPU run: one line naming
    the flag, where both scripts met the loss's ``CEPathUnavailable`` traceback in their first timed call."""
    for name in _TRITON:
        code, _, err = runs["triton", name]
        assert code == 1 and "Traceback" not in err, err
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith("--ce-paths triton needs a CUDA GPU and this run is on cpu")
        ), err


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_gpu_suite_without_a_gpu_stops_in_one_line_before_any_part_runs(tmp_path):
    """Every part of gpu_suite.sh times ``--device cuda``: without a GPU it stops at once (exit 3, as for a
    checkout that does not import), not with nvidia-smi missing and each benchmark's refusal in turn."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().startswith("gpu_suite.sh measures a CUDA GPU and torch sees none here"), r.stderr
    assert "== tests" not in r.stdout and not (tmp_path / "device.txt").exists()
