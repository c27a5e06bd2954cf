"""What a training run leaves beside its checkpoints for other tools: ``summary.csv`` (timm's train.py
convention, one row per epoch) that survives resume, and experiment trackers (TensorBoard, W&B offline,
MLflow's file store) whose runs a resumed run continues."""

from __future__ import annotations

import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
from helpers import rewrite_checkpoint_state, tiny_run

from attnxfer.apps.run.training import build_engine, train
from attnxfer.config import load_config
from attnxfer.train.drive import Drive
from attnxfer.train.metrics import MetricsLogger, read_summary
from attnxfer.train.stop import StopRequested

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# 2 blocks, 48 wide, 32-px synthetic images: 4 steps an epoch, milliseconds a step.
TINY = [
    *tiny_run(64, 16),
    "model.kwargs={depth: 2, embed_dim: 48}",
    "transfer.mode=none",
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


def test_tensorboard_names_each_scalar_with_its_split_once(tmp_path):
    """TensorBoard's tags are ``split/name`` with the split said once: the evaluation's ``val_top1`` of
    metrics.jsonl is ``val/top1`` (not ``val/val_top1``), the EMA's ``ema_val_top1`` ``val/ema_top1``, a
    train term keeps its name (``train/total``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    keys = [*TINY, "schedule.epochs=1", "ema.decay=0.5", "log.trackers=[tensorboard]"]
    train(load_config(None, [f"run_dir={run}", *keys]))
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/top1", "val/loss", "val/ema_top1", "val/best_ema_top1", "train/total", "train/lr"} <= tags
    assert not [t for t in tags if "val_" in t]
    last = _records(run, "val")[-1]
    assert events.Scalars("val/top1")[-1].value == pytest.approx(last["val_top1"])


def test_summary_csv_of_a_run_with_ema_gives_the_emas_evaluation_as_timm_does(tmp_path):
    """timm's train.py writes its EMA's evaluation into summary.csv and keeps its best checkpoint by it;
    so does a run with ``ema.decay``: the best row is the best checkpoint's, the one export takes."""
    run = tmp_path / "ema"
    train(load_config(None, [f"run_dir={run}", *TINY, "schedule.epochs=2", "ema.decay=0.5"]))
    val = _records(run, "val")
    rows = read_summary(run)
    assert [(r["eval_top1"], r["eval_top5"], r["eval_loss"]) for r in rows] == [
        (v["ema_val_top1"], v["ema_val_top5"], v["ema_val_loss"]) for v in val
    ]


def test_the_evaluation_line_numbers_the_epoch_as_the_progress_bar_and_summary_csv_do(tmp_path, capsys):
    """An epoch's progress lines, its evaluation line and its summary.csv row give it one number (timm's
    0-based one): a run cut short by schedule.max_steps and a whole epoch alike."""
    run = tmp_path / "run"
    train(load_config(None, [f"run_dir={run}", *TINY, "schedule.epochs=2", "schedule.max_steps=6"]))
    said = [line.split(": step")[0] for line in capsys.readouterr().out.splitlines() if ": step " in line]
    assert said == [f"epoch {r['epoch']}" for r in read_summary(run)] == ["epoch 0", "epoch 1"]


def test_the_progress_of_a_run_capped_inside_its_epoch_counts_to_the_cap(tmp_path, capsys):
    """schedule.max_steps=3 of a 4-batch epoch: the bar ends at 3/3, where the run ends (it said 3/4 and stopped)."""
    run = tmp_path / "run"
    train(load_config(None, [f"run_dir={run}", *TINY, "schedule.max_steps=3", "log.progress=true"]))
    counts = [
        line.split("batch ")[1].split(" ")[0]
        for line in capsys.readouterr().err.splitlines()
        if "batch " in line
    ]
    assert counts and counts[-1] == "3/3", counts


@pytest.mark.parametrize("kept", [6, 8])
def test_summary_csv_survives_a_stop_mid_epoch_and_an_older_checkpoint(finished_run, tmp_path, kept):
    """Stop in epoch 2 (after epoch 1's row), lose the checkpoints after step ``kept`` (6: mid epoch 1; 8: a
    periodic save at epoch 1's last step), resume: the redone epoch replaces its row (no duplicate) and
    train_loss still covers the whole epoch; no evaluation is logged twice."""
    run = tmp_path / "stopped"
    cfg = load_config(None, [f"run_dir={run}", *TINY])
    for step in build_engine(cfg).steps():
        if step == 10:
            break  # the generator is dropped here, as a killed process would stop
    assert [r["epoch"] for r in read_summary(run)] == [0, 1]
    for ckpt in (run / "checkpoints").glob("step-*"):
        if int(ckpt.name.removeprefix("step-")) > kept:
            shutil.rmtree(ckpt)
    train(load_config(None, [f"run_dir={run}", *TINY]))
    assert [r["step"] for r in _records(run, "val")] == [r["step"] for r in _records(finished_run, "val")]
    assert read_summary(run) == read_summary(finished_run)
    text = (run / "summary.csv").read_text()
    assert text == (finished_run / "summary.csv").read_text()


def test_summary_csv_of_an_epoch_stopped_at_its_last_step_keeps_that_steps_lr(finished_run, tmp_path):
    """A SIGTERM during an epoch's last step saves that step before the epoch is scored; the resumed run
    scores it first, before any step of its own: its summary.csv row still gives the lr of the epoch's last
    step (it read nan)."""
    run = tmp_path / "stopped"
    asked = []

    def stop():
        asked.append(1)
        return signal.SIGTERM if len(asked) == 4 else None  # after step 4, epoch 0's last

    with pytest.raises(StopRequested):
        build_engine(load_config(None, [f"run_dir={run}", *TINY]), drive=Drive(stop=stop)).run()
    assert read_summary(run) == []  # stopped before the epoch was scored
    train(load_config(None, [f"run_dir={run}", *TINY]))
    assert read_summary(run) == read_summary(finished_run)


def test_an_evaluation_redone_after_a_stop_at_an_epochs_last_step_is_logged_once(finished_run, tmp_path):
    """A stop at epoch 0's last step saves it before its evaluation; the resumed run evaluates it, logs it and is
    killed before its next save: the next resume, from the same checkpoint, evaluates it again. metrics.jsonl
    and TensorBoard held that evaluation twice; they hold it once, and the step's training record still."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "stopped"
    # saves every 3 steps: none after epoch 0's evaluation at step 4, so the kill at step 5 resumes from 4
    cfg = load_config(
        None, [f"run_dir={run}", *TINY, "checkpoint.every_steps=3", "log.trackers=[tensorboard]"]
    )
    asked = []

    def stop():
        asked.append(1)
        return signal.SIGTERM if len(asked) == 4 else None  # after step 4, epoch 0's last

    with pytest.raises(StopRequested):
        build_engine(cfg, drive=Drive(stop=stop)).run()
    engine = build_engine(cfg)
    for step in engine.steps():
        if step == 5:
            break  # killed before its next save (the generator is dropped)
    engine.metrics.close()  # what the killed process had written reaches the disk
    assert [r["step"] for r in _records(run, "val")] == [4]
    train(cfg)
    assert [r["step"] for r in _records(run, "val")] == [r["step"] for r in _records(finished_run, "val")]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/top1")] == [4, 8, 12]
    assert [e.step for e in events.Scalars("train/total")] == list(range(1, 13))


def test_a_checkpoint_from_before_the_history_was_kept_keeps_its_evaluation_on_resume(tmp_path):
    """A run stopped mid-epoch by schedule.max_steps is scored, then saved; an older attnxfer wrote that
    checkpoint without its history. The resume trains on past that step and never scores it again, so its
    val record must stay in metrics.jsonl (it was dropped as if saved before its evaluation)."""
    run = tmp_path / "older"
    train(load_config(None, [f"run_dir={run}", *TINY, "schedule.max_steps=3"]))
    keys = ("history", "seconds", "last_lr", "log_window")  # what an older attnxfer did not write
    rewrite_checkpoint_state(
        run / "checkpoints" / "step-00000003" / "state.json", lambda s: [s.pop(k) for k in keys]
    )
    train(load_config(None, [f"run_dir={run}", *TINY, "schedule.max_steps=4"]))
    assert [r["step"] for r in _records(run, "val")] == [3, 4]


def _stopped_after_two_steps_and_resplit(keys: list[str]) -> None:
    """Train ``keys`` (4 steps), stopped by SIGTERM after step 2, then resumed with the same global batch cut in
    two micro-batches (data.batch_size=8, optim.accum_steps=2), as another number of processes re-splits it."""
    asked = []

    def stop():
        asked.append(1)
        return signal.SIGTERM if len(asked) == 2 else None

    with pytest.raises(StopRequested):
        build_engine(load_config(None, keys), drive=Drive(stop=stop)).run()
    train(load_config(None, [*keys, "data.batch_size=8", "optim.accum_steps=2"]))


def test_train_loss_of_an_epoch_resumed_with_other_accumulation_is_the_mean_of_its_steps(tmp_path):
    """A resume may re-split the global batch (data.batch_size with optim.accum_steps; another number of
    processes): summary.csv's train_loss is still the mean of the epoch's step losses, not of its micro-batches
    (which weighed the steps before the resume half as much as those after)."""
    run = tmp_path / "run"
    _stopped_after_two_steps_and_resplit([f"run_dir={run}", *TINY, "schedule.epochs=1"])
    steps = [r["total"] for r in _records(run, "train")]
    assert len(steps) == 4
    assert read_summary(run)[0]["train_loss"] == pytest.approx(sum(steps) / 4, rel=1e-6)


def test_a_record_across_a_resume_with_other_accumulation_is_the_mean_of_its_steps(tmp_path):
    """A record covers the steps since the last one, a stopped run's too; where the resume re-split the global
    batch (more accumulation steps), it is still the mean of those steps' losses and gradient norms, as the same
    run logging every step gives them, not of their micro-batches (which weighed the steps before the resume
    half as much, the norm's too: it is taken once a step)."""

    def stopped_and_resumed(run: Path, every: int) -> list[dict]:
        keys = [f"run_dir={run}", *TINY, "schedule.epochs=1", f"log.every_steps={every}", "optim.lr=1e-2"]
        _stopped_after_two_steps_and_resplit([*keys, "optim.clip_grad=1.0"])
        return _records(run, "train")

    each = stopped_and_resumed(tmp_path / "each", 1)
    (record,) = stopped_and_resumed(tmp_path / "window", 4)  # one record, steps 1-4
    assert len(each) == 4 and record["step"] == 4
    for term in ("total", "grad_norm"):
        assert record[term] == pytest.approx(sum(r[term] for r in each) / 4, rel=1e-6), term


def test_a_run_started_over_keeps_no_pictures_of_the_earlier_attempt(tmp_path):
    """``checkpoint.resume=none`` forgets the earlier attempt's records (metrics.jsonl, TensorBoard): its
    pictures go too, so ``pictures/`` holds only what this run drew."""
    run = tmp_path / "run"
    keys = [
        f"run_dir={run}",
        *TINY,
        "data.kwargs.length=32",
        "log.attention_images=1",
        "log.trackers=[tensorboard]",
    ]
    train(load_config(None, [*keys, "schedule.epochs=2"]))
    assert sorted(p.name for p in (run / "pictures").iterdir()) == [
        "attention-cls_maps_0-step00000002.png",
        "attention-cls_maps_0-step00000004.png",
    ]
    train(load_config(None, [*keys, "schedule.epochs=1", "checkpoint.resume=none", "seed=1"]))
    assert [p.name for p in (run / "pictures").iterdir()] == ["attention-cls_maps_0-step00000002.png"]


# -- experiment trackers ---------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    blocks of 32 KiB holding (crc32 u32, length u16, type u8, data) chunks; types 1 (full) and 4 (last)
    end a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, buf, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def _wandb_history(path: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline W&B run file."""
    run_id, config, rows = None, {}, []
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return run_id, config, rows


@pytest.mark.slow
def test_trackers_write_real_files_and_a_resumed_run_continues_the_same_tracker_runs(
    tmp_path, monkeypatch, request
):
    """W&B offline and MLflow's file store write here; a finished run extended by one epoch (a resume)
    logs into the same W&B run id and the same MLflow run. Without TensorBoard, both get the class-token
    pictures."""
    pytest.importorskip("wandb", reason="the wandb extra: pip install 'attnxfer[wandb]'")
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'attnxfer[mlflow]'")
    import mlflow

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a file store
    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    # forgotten after the test (before the environment is put back): later tests in this process read theirs
    request.addfinalizer(lambda: mlflow.set_tracking_uri(None))
    run = tmp_path / "tracked"
    common = [
        f"run_dir={run}",
        *TINY,
        "log.trackers=[wandb, mlflow]",
        "log.project=attnxfer-test",
        "log.attention_images=1",
    ]
    train(load_config(None, [*common, "schedule.epochs=2"]))
    ids = json.loads((run / "trackers.json").read_text())
    train(load_config(None, [*common, "schedule.epochs=3"]))  # resumes from step 8, trains epoch 3
    assert json.loads((run / "trackers.json").read_text()) == ids  # the same tracker runs, continued

    # W&B: two offline segments of one run id; the resume continues the history where it stopped
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{ids['wandb']['id']}.wandb" for f in files)
    (id_a, config, rows_a), (id_b, _, rows_b) = map(_wandb_history, files)
    assert id_a == id_b == ids["wandb"]["id"]
    steps = lambda rows: [r["_step"] for r in rows if "train/total" in r]
    assert steps(rows_a) == list(range(1, 9)) and steps(rows_b) == list(range(9, 13))
    assert config["transfer.mode"] == "none" and config["optim.weight_decay"] == 0.05
    assert "no attention transfer" in config["plan"]
    # each evaluation's picture (steps 4, 8; 12 after the resume) as a W&B image, its file in the run's media
    key = "attention/cls_maps_0/filenames"
    shown = lambda f, rows: [
        (r["_step"], (f.parent / "files" / n).is_file()) for r in rows for n in r.get(key, [])
    ]
    assert shown(files[0], rows_a) == [(4, True), (8, True)] and shown(files[1], rows_b) == [(12, True)]

    # MLflow: one run in the experiment, its metric file holds steps 1..12 once each
    exp = mlflow.get_experiment_by_name("attnxfer-test")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    history = mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "train/total")
    assert sorted(m.step for m in history) == list(range(1, 13))
    jsonl = {r["step"]: r["total"] for r in _records(run, "train")}
    assert all(m.value == pytest.approx(jsonl[m.step], rel=1e-6) for m in history)
    params = runs[0].data.params
    assert params["transfer.mode"] == "none" and "no attention transfer" in params["plan"]
    # ... and as MLflow artifacts, one image per evaluation
    listed = mlflow.tracking.MlflowClient().list_artifacts(runs[0].info.run_id, "attention")
    assert [a.path for a in listed] == [f"attention/cls_maps_0-step{s:08d}.png" for s in (4, 8, 12)]
    assert not (run / "tb").exists()  # not asked for


@pytest.mark.slow  # two short training runs
def test_starting_over_keeps_the_earlier_tensorboard_events_pictures_and_tracker_runs_aside(tmp_path, capsys):
    """checkpoint.resume=none over a run: its TensorBoard events mixed with the new run's in ``tb/``, its
    trackers.json made W&B / MLflow continue the earlier tracker run, and its pictures were deleted."""
    run = tmp_path / "run"
    keys = [f"run_dir={run}", *TINY, "schedule.epochs=1", "log.trackers=[tensorboard]"]
    train(load_config(None, keys))
    earlier_events = sorted(p.name for p in (run / "tb").iterdir())
    (run / "pictures").mkdir()
    (run / "pictures" / "attention-cls_maps_0-step00000004.png").write_bytes(b"the earlier picture")
    capsys.readouterr()
    train(load_config(None, [*keys, "checkpoint.resume=none", "schedule.max_steps=2"]))
    err = capsys.readouterr().err
    for name in ("tb", "pictures", "trackers.json"):
        assert f"checkpoint.resume=none: kept the earlier attempt's {name} as" in err, err
    [tb_kept] = run.glob("tb.replaced-*")
    assert sorted(p.name for p in tb_kept.iterdir()) == earlier_events
    assert not set(earlier_events) & {p.name for p in (run / "tb").iterdir()}
    [pictures_kept] = run.glob("pictures.replaced-*")
    assert [p.read_bytes() for p in pictures_kept.iterdir()] == [b"the earlier picture"]
    assert len(list(run.glob("trackers.json.replaced-*"))) == 1


def test_starting_over_keeps_the_earlier_eval_scores_aside(tmp_path, capsys):
    """`attnxfer eval`'s eval-<step>.json of the earlier attempt, left beside the new attempt's checkpoint of
    that step, read as its score."""
    for name in ("eval-00000004.json", "eval-00000004-2.json", "eval-notes.json", "run.json"):
        (tmp_path / name).write_text("{}")
    MetricsLogger(tmp_path, trackers=[]).set_aside_records()
    err = capsys.readouterr().err
    assert "checkpoint.resume=none: kept the earlier attempt's eval-00000004-2.json as" in err, err
    assert sorted(p.name.split(".replaced-")[0] for p in tmp_path.glob("*.replaced-*")) == [
        "eval-00000004-2.json",
        "eval-00000004.json",
    ]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["eval-notes.json", "run.json"]  # not scores


def test_a_tracker_whose_package_is_missing_names_the_pip_command():
    from attnxfer.train.trackers import (
        TRACKERS,
        TrackerKind,
        TrackerMissingError,
        check_trackers,
    )

    TRACKERS["absent"] = TrackerKind(
        "absent", "attnxfer_no_such_package", "absent", lambda c: None, lambda t: {}
    )
    try:
        with pytest.raises(TrackerMissingError, match=r"pip install 'attnxfer\[absent\]'"):
            check_trackers(["tensorboard", "absent"])
    finally:
        TRACKERS.pop("absent")
    check_trackers(["tensorboard"])  # installed: no error
    from attnxfer.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'wandb'"):
        load_config(None, ["log.trackers=[wandbb]"])
