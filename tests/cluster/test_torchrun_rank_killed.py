"""Under torchrun, a rank killed mid-run ends the job at once, and the same command resumes the run.

torchrun's elastic agent watches its workers: one that dies takes the others down (no collective waits for
it), and the run dir keeps the last checkpoint, written atomically, for the rerun to pick up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import image_folder, tiny_run, torchrun_launch

from attnxfer.checkpoints.store import CheckpointManager

STEPS = 100
ARGS = [
    "device=cpu",
    "transfer.mode=none",
    "model.kwargs={depth: 2, embed_dim: 48}",
    "model.drop_path_rate=0.0",
    *tiny_run(32, 8),
    "checkpoint.every_epoch=false",
    "checkpoint.every_steps=5",
    "schedule.epochs=1000",
    f"schedule.max_steps={STEPS}",
]


def _torchrun(run: Path, *overrides: str, monitor_interval: float = 0.1) -> subprocess.Popen:
    """``attnxfer train`` on 2 ranks under torchrun, whose agent looks at its workers every
    ``monitor_interval`` seconds (torchrun's default: 0.1) and ends the others once one has failed."""
    cmd, env = torchrun_launch(ranks=2)
    cmd += [f"--monitor-interval={monitor_interval}", "-m", "attnxfer", "train", f"run_dir={run}"]
    return subprocess.Popen(
        [*cmd, *ARGS, *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its workers can be ended as one group if the test fails
    )


def _worker(agent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the agent, found by its RANK)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {agent})")


@pytest.mark.slow
def test_a_killed_rank_ends_a_torchrun_job_and_the_same_command_resumes(tmp_path):
    run = tmp_path / "run"
    job = _torchrun(run)
    try:
        deadline = time.monotonic() + 300
        while not list((run / "checkpoints").glob("step-*")):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was saved"
            time.sleep(0.05)
        os.kill(_worker(job.pid, 1), signal.SIGKILL)
        _, err = job.communicate(timeout=120)  # a hang guard: the agent ends the job within a second
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]
    last = CheckpointManager(run).latest(verify_hash=True)
    assert last is not None and last.step < STEPS, "the rank died after the run's end"

    again = _torchrun(run)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from checkpoint step {last.step}" in out, out[-3000:]
    assert CheckpointManager(run).latest(verify_hash=True).step == STEPS


@pytest.mark.slow
def test_a_rank_that_fails_leaves_its_peer_one_line_not_a_gloo_traceback(tmp_path):
    """A val image only rank 1 reads cannot be opened: rank 1 says so in one line, and rank 0, whose collective
    then fails with gloo's "Connection closed by peer", says in one line that another rank ended instead of
    burying that error under its own traceback."""
    data = image_folder(tmp_path / "data", per_class={"train": 4, "val": 2})
    bad = data / "val" / "class0" / "1.png"  # val index 1: rank 1's share (each rank reads order[rank::2])
    bad.write_bytes(b"not an image")
    job = _torchrun(
        tmp_path / "run",
        "data.dataset=folder",
        "data.kwargs={}",
        f"data.root={data}",
        "data.img_size=32",
        "data.batch_size=2",
        "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2, patch_size: 8}",
        "schedule.max_steps=1",
        # rank 0 must reach the collective and find its peer gone before the agent ends it: at 0.1 s, a
        # loaded machine lets the agent's SIGTERM come first, while rank 0 still evaluates its own images
        monitor_interval=5,
    )
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0
    assert f"attnxfer train: error: image '{bad}' cannot be read as an image" in err, err[-3000:]
    (line,) = [
        x for x in err.splitlines() if "attnxfer train: rank 0 stopped: another rank's process ended" in x
    ]
    assert "running the same command again" in line, line  # and what a re-run goes on from
    assert "closed by peer" not in err and "[rank0]: Traceback" not in err, err[-3000:]
