"""Changing the number of processes, through the CLI: a run resumed on another number of processes keeps its global
batch, epoch length and lr schedule (1 process -> 2 gloo ranks -> 1 process, against an uninterrupted run),
and distributed evaluation scores every val image exactly once (61 images on 2 ranks); ranks that accumulate
micro-batches with an EMA train, log and score as one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUIET, run_cli, torchrun_attnxfer
from safetensors.torch import load_file

from attnxfer.apps.run.world_size import fit_world_size, split_for_world
from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.config import ConfigError, load_config
from attnxfer.launch import cli

# the runs of one process are in this one (no interpreter start-up), on one intra-op thread as the torchrun
# ranks are
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

VAL_SIZE = 61  # odd: 2 ranks cannot split it evenly (a padding sampler scores 62)
# 3 steps an epoch at a global batch of 16 (61 // 16); the lr is constant (blr x 16 / 256 = min_lr), so the
# attempts' different max_steps leave the schedule alone; no drop-path: nothing random in a step.
S = [
    "data.dataset=synthetic",
    "data.batch_size=16",
    f"data.kwargs.length={VAL_SIZE}",
    "transfer.mode=none",
    "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
    "model.drop_path_rate=0.0",
    "optim.blr=0.016",
    "optim.min_lr=0.001",
    "schedule.warmup_epochs=0",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=20",
    *QUIET,
    "log.every_steps=1",
    "deterministic=true",
    "device=cpu",
]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _close_to(run: Path, ref: Path, step: int) -> None:
    a, b = _weights(run, step), _weights(ref, step)
    assert a.keys() == b.keys()
    for k in a:  # the same samples per step; only the order of the float sums differs across ranks
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, uninterrupted, 8 steps (over three epochs)."""
    run = tmp_path_factory.mktemp("ws") / "ref"
    assert cli.main(["train", *S, "schedule.max_steps=8", f"run_dir={run}"]) == 0
    return run


@pytest.mark.slow  # three runs, one of them on 2 torchrun ranks
def test_resume_on_another_world_size_keeps_the_global_batch_epoch_and_schedule(reference, tmp_path, capsys):
    run = tmp_path / "moved"
    code, _, err = run_cli(capsys, "train", *S, "schedule.max_steps=2", f"run_dir={run}")
    assert code == 0, err[-3000:]

    # 1 process -> 2 ranks, same command: the per-rank batch halves, the global batch stays 16.
    two = torchrun_attnxfer("train", *S, "schedule.max_steps=5", f"run_dir={run}", timeout=400)
    assert "trained by 1 process" in two.stdout and "this run has 2" in two.stdout
    assert "the global batch stays 16" in two.stdout and "data.batch_size=8 optim.accum_steps=1" in two.stdout
    facts, ref_facts = (json.loads((r / "run.json").read_text()) for r in (run, reference))
    assert facts["world_size"] == 2 and ref_facts["world_size"] == 1
    for key in ("steps_per_epoch", "base_lr"):
        assert facts[key] == pytest.approx(ref_facts[key]), key
    assert load_config(str(run / "config.yaml")).data.batch_size == 8  # what this attempt ran with
    _close_to(run, reference, 5)

    # 2 ranks -> 1 process with the run's own config (8 per rank): two accumulation steps of 8.
    code, out, err = run_cli(capsys, "train", "-c", str(run / "config.yaml"), "schedule.max_steps=8")
    assert code == 0, err[-3000:]
    assert "trained by 2 processes" in out and "data.batch_size=8 optim.accum_steps=2" in out
    assert json.loads((run / "run.json").read_text())["steps_per_epoch"] == ref_facts["steps_per_epoch"]
    _close_to(run, reference, 8)
    # the logged lr and epoch fractions of every step are the uninterrupted run's
    records = lambda r: {
        x["step"]: (x["lr"], x["epoch"])
        for x in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
        if x["split"] == "train"
    }
    got, want = records(run), records(reference)
    assert got.keys() == want.keys() == set(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step]), step

    # An explicit split that changes the global batch is refused, naming the one that keeps it.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code = cli.main(["train", "-c", str(run / "config.yaml"), "data.batch_size=16", "optim.accum_steps=2"])
    assert code == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_world_size_that_cannot_share_the_global_batch_is_refused(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    assert cli.main(["train", *S, "schedule.max_steps=1", f"run_dir={run}"]) == 0
    source = ResumePoint.find(run)
    cfg = load_config(str(run / "config.yaml"))
    with pytest.raises(ConfigError) as e:
        fit_world_size(cfg, 3, source)
    msg = str(e.value)
    assert "trained by 1 process" in msg and "this run has 3" in msg and "global batch of 16" in msg
    assert "(1, 2, 4, 8, 16)" in msg and "run_dir=" in msg and "nothing was written" in msg
    cfg4 = fit_world_size(cfg, 4, source)
    assert (cfg4.data.batch_size, cfg4.optim.accum_steps) == (4, 1)
    out = capsys.readouterr().out  # mixup is seeded by each batch's place in the data: it does not restart
    assert "the global batch stays 16" in out and "(dropout, drop-path) restart" in out
    # a study's student keeps the split its study said once for all: unsaid, and refused alike
    assert fit_world_size(cfg, 4, source, said=False) == cfg4 and "stays" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="this run has 3"):
        fit_world_size(cfg, 3, source, said=False)
    code = cli.main(["train", "-c", str(run / "config.yaml"), "data.batch_size=8"])  # same world: as before
    err = capsys.readouterr().err  # the split that keeps the global batch is named beside the recorded value
    assert code == 2 and "keep its global batch with data.batch_size=8 optim.accum_steps=2" in err
    monkeypatch.chdir(tmp_path)  # the run's folder spelled another way is the same run_dir, not a change
    assert cli.main(["train", *S, "run_dir=q", "schedule.max_steps=1"]) == 0
    assert cli.main(["train", *S, "run_dir=./q", "schedule.max_steps=2"]) == 0
    assert "resume: changed since step-00000001: schedule.max_steps (1 -> 2)\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    "global_batch,world,max_per_rank,want",
    [
        (32, 2, 32, (16, 2, 1)),  # more ranks: a smaller per-rank batch
        (32, 1, 16, (16, 1, 2)),  # fewer ranks: accumulate rather than grow the per-rank batch
        (48, 2, 16, (12, 2, 2)),  # 3 ranks of 16 -> 2 ranks: 2 x 12, no rank above 16
        (16, 3, 16, None),  # 3 does not divide 16
    ],
)
def test_a_global_batch_splits_into_rank_batches_and_accumulation_and_a_world_that_cannot_share_it_is_refused(
    global_batch, world, max_per_rank, want
):
    split = split_for_world(global_batch, world, max_per_rank)
    if want is None:
        assert split is None
    else:
        assert (split.per_rank, split.world, split.accum) == want
        assert split.global_batch == global_batch


@pytest.mark.slow  # an eval on 2 torchrun ranks
def test_distributed_eval_scores_every_val_image_once(reference, capsys):
    """Top-1, top-5 and n on 2 gloo ranks (61 images: 31 + 30) equal the single-process evaluation."""
    results = {}
    code, _, err = run_cli(capsys, "eval", *S, f"run_dir={reference}")
    assert code == 0 and "random streams" not in err, err[-3000:]
    results[1] = json.loads((reference / "eval-00000008.json").read_text())["metrics"]
    res = torchrun_attnxfer("eval", *S, f"run_dir={reference}", timeout=400)
    assert "random streams" not in res.stderr  # a run trained on 1 rank, scored on 2: nothing random drawn
    results[2] = json.loads((reference / "eval-00000008.json").read_text())["metrics"]
    one, two = results[1], results[2]
    assert one["val_count"] == two["val_count"] == VAL_SIZE
    assert one["val_top1"] == two["val_top1"] and one["val_top5"] == two["val_top5"]
    # k-NN: each rank scores its shard against the whole bank, the counts summed
    assert one["knn_count"] == two["knn_count"] == VAL_SIZE and one["knn_top1"] == two["knn_top1"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    # the evaluations during training were exact too: the last val record is the single process's
    val = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in val if x["split"] == "val"][-1]
    assert last["val_count"] == VAL_SIZE and last["val_top1"] == one["val_top1"]


@pytest.mark.slow  # a run on 2 torchrun ranks and its one-process twin
def test_two_ranks_accumulating_with_an_ema_train_log_and_score_as_one_process(tmp_path, capsys):
    """2 gloo ranks x 2 micro-batches of 4 against 1 process x 4 micro-batches of 4 (one global batch of 16),
    with an EMA and a warm-up (the lr moves every step): the weights and the EMA's, each step's logged loss
    and lr (the schedule counts optimiser steps, not micro-batches) and the evaluations of both (every val
    image once, 61 on 2 ranks) are the one process's."""
    keys = [*S, "ema.decay=0.5", "schedule.warmup_epochs=1", "schedule.max_steps=3", "optim.clip_grad=1.0"]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun_attnxfer(
        "train", *keys, "data.batch_size=4", "optim.accum_steps=2", f"run_dir={two}", timeout=400
    )
    code, _, err = run_cli(
        capsys, "train", *keys, "data.batch_size=4", "optim.accum_steps=4", f"run_dir={one}"
    )
    assert code == 0, err[-3000:]
    ckpt = lambda run: run / "checkpoints" / "step-00000003"
    for group in ("model", "ema"):
        a, b = (load_file(str(ckpt(r) / f"{group}.safetensors")) for r in (two, one))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{group} {k}")
    records = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = lambda run: [(r["step"], r["total"], r["lr"]) for r in records(run) if r["split"] == "train"]
    got, want = train(two), train(one)
    assert [s for s, *_ in got] == [1, 2, 3] and len({lr for *_, lr in want}) == 3  # the lr moved
    assert got == [(s, pytest.approx(t, rel=1e-5), pytest.approx(lr)) for s, t, lr in want]
    (val_two,), (val_one,) = ([r for r in records(run) if r["split"] == "val"] for run in (two, one))
    assert val_two["val_count"] == val_two["ema_val_count"] == val_one["ema_val_count"] == VAL_SIZE
    for k in ("val_top1", "val_top5", "ema_val_top1", "ema_val_top5"):
        assert val_two[k] == val_one[k], k
    for k in ("val_loss", "ema_val_loss"):
        assert val_two[k] == pytest.approx(val_one[k], rel=1e-5), k
