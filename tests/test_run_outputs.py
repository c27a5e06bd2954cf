"""What a training run leaves beside its checkpoints for other tools: ``summary.csv`` (timm's train.py
convention, one row per epoch) that survives resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attnxfer.apps.training import build_engine, train
from attnxfer.config import load_config
from attnxfer.train.metrics import read_summary

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# 2 blocks, 48 wide, 32-px synthetic images: 4 steps an epoch, milliseconds a step.
TINY = [
    "data.dataset=synthetic",
    "data.batch_size=16",
    "data.synthetic_length=64",
    "model.kwargs={depth: 2, embed_dim: 48}",
    "transfer.mode=none",
    "log.progress=false",
    "log.tensorboard=false",
    "log.every_steps=1",
    "log.attention_images=0",
    "checkpoint.every_epoch=false",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=20",
    "schedule.epochs=3",
    "device=cpu",
    "deterministic=true",
]


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Three epochs straight through: the reference for every summary check."""
    run = tmp_path_factory.mktemp("summary") / "ref"
    train(load_config(None, [f"run_dir={run}", *TINY]))
    return run


def test_summary_csv_has_one_row_per_epoch_in_timms_columns(finished_run):
    header = (finished_run / "summary.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"
    rows = read_summary(finished_run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    train_recs, val_recs = _records(finished_run, "train"), _records(finished_run, "val")
    steps_per_epoch = len(train_recs) // 3
    for e, row in enumerate(rows):
        # every step is logged (log.every_steps=1): train_loss is the mean of the epoch's step losses
        epoch_recs = train_recs[e * steps_per_epoch : (e + 1) * steps_per_epoch]
        assert row["train_loss"] == pytest.approx(
            sum(r["total"] for r in epoch_recs) / steps_per_epoch, rel=1e-6
        )
        assert row["lr"] == epoch_recs[-1]["lr"]  # the lr of the epoch's last step, as timm writes it
        val = val_recs[e]
        assert val["step"] == (e + 1) * steps_per_epoch
        assert (row["eval_top1"], row["eval_top5"], row["eval_loss"]) == (
            val["val_top1"],
            val["val_top5"],
            val["val_loss"],
        )


def test_summary_csv_survives_a_stop_mid_epoch_and_an_older_checkpoint(finished_run, tmp_path):
    """Stop in epoch 2 (after epoch 1's row), lose the checkpoints after step 6 (mid epoch 1), resume: the
    redone epoch replaces its row (no duplicate) and train_loss still covers the whole epoch."""
    run = tmp_path / "stopped"
    cfg = load_config(None, [f"run_dir={run}", *TINY])
    for step in build_engine(cfg).steps():
        if step == 10:
            break  # the generator is dropped here, as a killed process would stop
    assert [r["epoch"] for r in read_summary(run)] == [0, 1]
    for ckpt in (run / "checkpoints").glob("step-*"):
        if int(ckpt.name.removeprefix("step-")) > 6:
            shutil.rmtree(ckpt)
    train(load_config(None, [f"run_dir={run}", *TINY]))
    assert read_summary(run) == read_summary(finished_run)
    text = (run / "summary.csv").read_text()
    assert text == (finished_run / "summary.csv").read_text()
