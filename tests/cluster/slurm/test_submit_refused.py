"""`attnxfer submit` when sbatch refuses the job: one ``attnxfer submit: error:`` line carrying sbatch's own
words, exit code 2, and nothing of the attempt left behind, so the corrected command submits as if the first
had never run. Real sbatch: without a controller (no SLURM_CONF: "Could not establish a configuration
source") and on the loopback cluster with a partition it does not have."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import attnxfer_process, tiny_run
from loopback_cluster import ClusterUnavailable, ensure_installed

from attnxfer.launch.cli import main

pytestmark = pytest.mark.slurm

TINY = [
    *tiny_run(16, 8),
    "model.kwargs={depth: 2, embed_dim: 48}",
    "transfer.mode=none",
    "schedule.max_steps=2",
    "checkpoint.every_epoch=false",
]


@pytest.fixture(scope="module")
def sbatch():
    """SLURM's client commands (installed from Debian if missing), no cluster."""
    if os.environ.get("ATTNXFER_SKIP_SLURM") == "1":
        pytest.skip("ATTNXFER_SKIP_SLURM=1: SLURM tests skipped on request")
    try:
        ensure_installed()
    except (ClusterUnavailable, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"cannot install SLURM's commands: {e}", pytrace=False)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("attnxfer submit: error: sbatch refused the job: sbatch: "), lines[0]
    return lines[0]


def test_no_controller_is_one_line_with_sbatchs_words_and_leaves_no_run_dir(
    sbatch, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("SLURM_CONF", raising=False)  # sbatch then looks for a controller in DNS: none here
    run = tmp_path / "run"
    assert main(["submit", f"run_dir={run}", *TINY, "--nodes", "1", "--time", "5"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "Could not establish a configuration source" in line and "--cluster local" in line
    assert not run.exists()  # the pickled task and the sbatch script submitit wrote are gone, and the folders
    assert main(["submit", f"run_dir={run}", *TINY, "--nodes", "1", "--sweep", "seed=0,1"]) == 2
    _one_line(capsys.readouterr().err)
    assert not run.exists()  # and a sweep's record, written before its jobs are queued


def test_a_job_dir_that_held_files_keeps_them_and_loses_only_the_attempts(
    sbatch, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / "12_0_log.out").write_text("an earlier job's log\n")
    flags = ["--nodes", "1", "--job-dir", str(job_dir)]
    assert main(["submit", f"run_dir={tmp_path / 'run'}", *TINY, *flags]) == 2
    _one_line(capsys.readouterr().err)
    assert [p.name for p in job_dir.iterdir()] == ["12_0_log.out"]


@pytest.mark.slow
def test_an_invalid_partition_is_one_line_and_the_corrected_submit_trains(slurm, tmp_path):
    run = tmp_path / "run"
    common = ["submit", f"run_dir={run}", *TINY, "--nodes", "1", "--cpus-per-task", "1", "--time", "5"]
    refused = attnxfer_process(*common, "--partition", "nope")
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    line = _one_line(refused.stderr)
    assert "Invalid partition name specified" in line and "sinfo -s" in line
    assert not run.exists()

    done = attnxfer_process(*common, "--partition", slurm.partition, "--wait")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["total_steps"] == 2
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000002"]


def test_a_second_job_into_a_run_dir_whose_job_is_still_queued_is_refused(slurm, tmp_path, capsys):
    # both would train the one run; the second to start would stop on its node at the run's lock
    run = tmp_path / "run"
    common = ["submit", f"run_dir={run}", *TINY, "--nodes", "1", "--cpus-per-task", "1", "--time", "5"]
    assert main([*common, "--partition", slurm.partition, "--slurm", "hold=true"]) == 0
    (held,) = {p.name.split("_")[0] for p in (run / "submitit").glob("*_submitted.pkl")}
    capsys.readouterr()
    assert main([*common, "--partition", slurm.partition]) == 2
    err = capsys.readouterr().err
    assert f"job {held} of its job dir {run / 'submitit'} is PENDING" in err and f"scancel {held}" in err
    assert len(list((run / "submitit").glob("*_submitted.pkl"))) == 1  # nothing queued
    assert main([*common, "--partition", slurm.partition, "--sweep", "seed=0,1"]) == 2  # a sweep, too
    subprocess.run(["scancel", held], check=True)
    assert main([*common, "--partition", slurm.partition, "--slurm", "hold=true"]) == 0  # ended: taken


def test_more_nodes_than_the_partition_has_is_refused_not_queued_to_wait_for_ever(slurm, tmp_path, capsys):
    # sbatch takes it, and the job pends with reason PartitionConfig as long as it is left there
    run = tmp_path / "run"
    argv = ["submit", f"run_dir={run}", *TINY, "--partition", slurm.partition, "--time", "5"]
    assert main([*argv, "--nodes", "3"]) == 2
    err = capsys.readouterr().err
    assert f"--nodes 3: partition {slurm.partition} has 2 node(s), so the job would wait for ever" in err, err
    assert not run.exists()
