"""Checkpoints and run dirs, through the CLI: periodic saves on an epoch's end and a finished run extended,
saves over existing steps (the same weights replaced, others set aside), a resume that checks what it
resumes, a checkpoints folder or run_dir that cannot hold a run, and Ctrl-C before the first checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import ONE_BLOCK_RUN as S, once_each, popen_interruptible, run_cli
from safetensors.torch import load_file


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def _one_record_per_step(run: Path) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    counts = Counter((r["split"], r["step"]) for r in records)
    assert max(counts.values()) == 1, counts


@pytest.mark.slow
def test_periodic_save_on_an_epoch_end_and_extending_a_finished_run(tmp_path, capsys):
    run = tmp_path / "every2"
    args = ["train", *S, "checkpoint.every_steps=2", f"run_dir={run}"]
    code, _, err = run_cli(capsys, *args, "schedule.max_steps=6")
    assert code == 0, err  # step 4 is both a periodic save and the epoch's save
    code, _, err = run_cli(capsys, *args, "schedule.max_steps=6")  # re-running a finished run
    assert code == 0, err
    code, out, err = run_cli(capsys, *args, "schedule.max_steps=10")  # extending it
    assert code == 0, err
    assert "resumed from checkpoint step 6" in out and "schedule.max_steps (6 -> 10)" in out
    assert _steps(run)[-1] == "step-00000010"
    _one_record_per_step(run)


@pytest.mark.parametrize(
    "change,keys",
    [
        (["transfer.mode=copy", "teacher.spec=vit_micro_patch4_28"], ["transfer.mode", "teacher.spec"]),
        (["model.kwargs={depth: 2, embed_dim: 24, num_heads: 2}"], ["model.kwargs"]),
        (["data.batch_size=8"], ["data.batch_size"]),
    ],
)
def test_resume_refuses_a_config_that_changes_what_the_checkpoint_means(trained, capsys, change, keys):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    args = once_each(["train", *S, "schedule.max_steps=6", f"run_dir={trained}", *change])
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()
    assert len(line) == 1 and all(k in line[0] for k in keys) and "run_dir=" in line[0]
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    assert _steps(trained) == ["step-00000004"]


def test_a_checkpoints_folder_that_is_a_broken_link_or_a_file_is_refused_before_work(tmp_path, capsys):
    """A link to scratch space not made yet (or a file) would be met at the first save, an epoch in."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(tmp_path / "scratch")
    code, _, err = run_cli(capsys, "train", *S, f"run_dir={run}")
    assert code == 2 and f"links to {tmp_path / 'scratch'}, which does not exist: make that folder" in err, (
        err
    )
    (run / "checkpoints").unlink()
    (run / "checkpoints").write_text("x")
    code, _, err = run_cli(capsys, "train", *S, f"run_dir={run}")
    assert code == 2 and "checkpoints is a file where the run keeps its checkpoints" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_a_run_dir_under_a_broken_link_is_refused_in_one_line(tmp_path, capsys):
    """runs/ linked to scratch space not mounted (or not made) on this node: mkdir would raise FileExistsError."""
    (tmp_path / "runs").symlink_to(tmp_path / "scratch")
    code, _, err = run_cli(capsys, "train", *S, f"run_dir={tmp_path / 'runs' / 'r'}")
    assert code == 2 and f"links to {tmp_path / 'scratch'}, which does not exist: make that folder" in err, (
        err
    )


def test_no_command_writes_its_run_into_an_exported_model(trained, tmp_path, capsys):
    """An export (maybe the teacher the run reads) is a model, not a run folder: nothing is mixed into it."""
    export = tmp_path / "exported"
    assert run_cli(capsys, "export", str(trained), str(export))[0] == 0
    before = sorted(p.name for p in export.iterdir())
    for command in ("train", "pretrain"):
        args = [a for a in S if command == "train" or not a.startswith("transfer.")]  # pretrain reads none
        code, _, err = run_cli(capsys, command, *args, "schedule.max_steps=1", f"run_dir={export}")
        assert code == 2 and f"run_dir={export} holds an exported model" in err, err
    assert sorted(p.name for p in export.iterdir()) == before


@pytest.mark.slow
def test_ctrl_c_before_any_periodic_checkpoint_saves_the_step_the_run_is_at(tmp_path):
    """Ctrl-C stops the loop at a step boundary and saves that step, as SIGTERM does: a run without periodic
    checkpoints loses nothing, and the message says where it stopped and how to go on."""
    run = tmp_path / "r"
    proc = popen_interruptible(
        [
            sys.executable,
            "-m",
            "attnxfer",
            "train",
            *S,
            "schedule.epochs=1000",
            "checkpoint.every_epoch=false",
            f"run_dir={run}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():  # training has started
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "stopped by SIGINT at step " in err and "re-run the same command to resume" in err, err
    assert "Traceback" not in err and _steps(run), err


@pytest.mark.slow
def test_saves_over_existing_steps_replace_same_weights_and_keep_other_weights(tmp_path, capsys):
    run = tmp_path / "r"
    args = ["train", *S, "schedule.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=5"]
    assert run_cli(capsys, *args, f"run_dir={run}")[0] == 0
    first = load_file(str(run / "checkpoints/step-00000003/model.safetensors"))
    step1 = str(run / "checkpoints/step-00000001")
    # the same history again from step 1: same weights, each save replaces its twin
    code, _, err = run_cli(capsys, *args, f"run_dir={run}", f"checkpoint.resume={step1}")
    assert code == 0, err
    assert _steps(run) == ["step-00000001", "step-00000002", "step-00000003"]
    again = load_file(str(run / "checkpoints/step-00000003/model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    # another history from step 1 (a changed lr): the old checkpoints are set aside, not lost
    code, _, err = run_cli(capsys, *args, f"run_dir={run}", f"checkpoint.resume={step1}", "optim.lr=0.01")
    assert code == 0, err
    aside = sorted(p.name.split(".")[0] for p in (run / "checkpoints").glob("step-*.replaced-*"))
    assert aside == ["step-00000002", "step-00000003"]
    [old3] = (run / "checkpoints").glob("step-00000003.replaced-*")
    kept = load_file(str(old3 / "model.safetensors"))
    assert all(torch.equal(first[k], kept[k]) for k in first)
    new = load_file(str(run / "checkpoints/step-00000003/model.safetensors"))
    assert not all(torch.equal(first[k], new[k]) for k in first)


def test_a_disk_error_names_its_path_as_text_whatever_type_the_writer_gave_it(tmp_path):
    """TensorBoard's writer raises its OSError with the file name as bytes: the line said b'...'."""
    from attnxfer.checkpoints.run_lock import disk_error

    events = tmp_path / "tb" / "events.out"
    error = disk_error(OSError(28, "No space left on device", os.fsencode(events)), tmp_path)
    assert f"cannot write {events}: No space left on device" in str(error)


def test_a_new_run_dir_that_cannot_be_made_names_the_folder_to_make_writable(tmp_path):
    """A new run under a read-only folder was told to make the run's folder writable: one that does not exist."""
    from attnxfer.checkpoints.run_lock import disk_error

    run = tmp_path / "runs" / "new"
    error = disk_error(PermissionError(13, "Permission denied", str(run)), run)
    assert f"cannot write {run}: Permission denied" in str(error)
    assert f"make {tmp_path} writable, then run the same command again" in str(error)
    run.mkdir(parents=True)  # once it exists, it is the one
    assert f"make {run} writable" in str(disk_error(PermissionError(13, "Permission denied", str(run)), run))
