"""Checkpoints: atomic safetensors+JSON store, pruning, corruption handling, optimizer and RNG state."""

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.checkpoints.rng import capture_rng_state, restore_rng_state
from attnxfer.checkpoints.store import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointManager,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    state_dict_from_tensors,
    state_dict_to_tensors,
    verify_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def small_tensors(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g)},
        "ema": {"w": torch.randn(4, 5, generator=g)},
    }


@pytest.mark.parametrize(
    "best_metric, value, says",
    [
        ("ema_val_top1", 70.0, "checkpoint step 3 (EMA val top-1 70.00) at "),
        ("val_loss", 2.27241, "checkpoint step 3 (val loss 2.272) at "),
        ("val_feat_cos_patch", 0.91234, "checkpoint step 3 (feat_cos_patch 0.9123) at "),
    ],
)
def test_a_checkpoint_names_the_metric_its_run_ranks_by(tmp_path, best_metric, value, says):
    """What eval and resume print of a checkpoint: its value with the metric's name (its state's
    best_metric), as export says "best val top-1 70.00", not a bare "metric=70"."""
    path = CheckpointManager(tmp_path).save(3, small_tensors(3), {"best_metric": best_metric}, metric=value)
    info = verify_checkpoint(path)
    assert str(info).startswith(says) and "metric=" not in str(info)


def step_dirs(mgr: CheckpointManager) -> list[str]:
    return sorted(p.name for p in mgr.dir.iterdir() if p.name.startswith("step-"))


def hidden_dirs(mgr: CheckpointManager) -> list[str]:
    return sorted(p.name for p in mgr.dir.iterdir() if p.name.startswith("."))


def assert_same_tree(a, b, where="root"):
    """Equal values AND equal types (tuple vs list, int vs float, tensor dtype), bit-exact tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def assert_same_groups(a: dict, b: dict) -> None:
    """Tensor groups equal bit for bit; safetensors files keep names, not their order."""
    assert sorted(a) == sorted(b)
    for group in a:
        assert sorted(a[group]) == sorted(b[group]), group
        for name in a[group]:
            assert_same_tree(a[group][name], b[group][name], f"{group}.{name}")


# --------------------------------------------------------------------------------------------
# round trip and layout
# --------------------------------------------------------------------------------------------


def test_round_trip_tensors_state_and_manifest(tmp_path):
    tensors = {
        "model": {
            "f32": torch.randn(3, 7),
            "bf16": torch.randn(2, 3).to(torch.bfloat16),
            "i64": torch.arange(5),
            "flag": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
            "noncontig": torch.randn(4, 3).t(),
        },
        "optimizer": {},
    }
    state = {
        "step": 12,
        "epoch": 1,
        "config": {"lr": 1e-3, "name": "vit"},
        "sampler": [3, 1, 2],
        "teacher": {"id": "timm/x", "sha256": "ab" * 32},
        "note": None,
    }
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(12, tensors, state, metric=0.5)
    assert path == tmp_path / "checkpoints" / "step-00000012"
    assert sorted(os.listdir(path)) == [
        "MANIFEST.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    modes = {(path / n).stat().st_mode & 0o777 for n in os.listdir(path)}
    umask = os.umask(0o022)
    os.umask(umask)
    assert modes == {0o666 & ~umask}  # safetensors' own 0600 is not left on the weights

    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["step"] == 12 and manifest["metric"] == 0.5
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    info = mgr.latest()
    assert (info.step, info.path, info.metric, sorted(info.groups)) == (12, path, 0.5, ["model", "optimizer"])
    loaded, loaded_state = mgr.load(info)
    assert loaded_state == state
    assert loaded["optimizer"] == {}
    assert_same_tree(
        {k: v.contiguous() for k, v in tensors["model"].items()},
        {k: loaded["model"][k] for k in tensors["model"]},
    )
    # a plain path works too, without a manager
    assert_same_groups(load_checkpoint(path)[0], loaded)


def test_tensors_sharing_storage_are_saved_as_values(tmp_path):
    base = torch.randn(6)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {"a": base, "tied": base, "view": base[2:4]}}, {})
    loaded, _ = mgr.load(mgr.latest())
    assert torch.equal(loaded["model"]["a"], base)
    assert torch.equal(loaded["model"]["tied"], base)
    assert torch.equal(loaded["model"]["view"], base[2:4])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(state={"t": torch.ones(1)}), TypeError, "JSON-serialisable"),
        (dict(state={"loss": float("nan")}), TypeError, "JSON-serialisable"),
        (dict(state={"per_rank": {0: 5}}), TypeError, r"non-str dict key at \['per_rank'\]\[0\]"),
        (dict(metric=float("nan")), ValueError, "metric must be finite"),
        (dict(tensors={"../model": {"w": torch.ones(1)}}), ValueError, "group name"),
        (dict(tensors={"model": {"w": [1.0]}}), TypeError, "entry 'w' is list"),
        (dict(tensors={"model": {"nested": {"w": torch.ones(1)}}}), TypeError, "state_dict_to_tensors"),
        (dict(step=-1), ValueError, "step must be an int"),
    ],
)
def test_bad_input_is_rejected_before_anything_is_written(tmp_path, kwargs, error, match):
    args = dict(step=3, tensors=small_tensors(3), state={"step": 3}, metric=None) | kwargs
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(error, match=match):
        mgr.save(**args)
    assert not mgr.dir.exists() or os.listdir(mgr.dir) == []


def test_constructor_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager(tmp_path, best_mode="highest")


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------


def test_prune_keeps_last_k_plus_best_even_if_old(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, best_mode="max")
    metrics = [0.1, 0.9, 0.3, 0.2, 0.4, 0.5]
    for step, metric in enumerate(metrics):
        mgr.save(step, small_tensors(step), {"step": step}, metric=metric)
    assert step_dirs(mgr) == ["step-00000001", "step-00000004", "step-00000005"]
    assert mgr.best().step == 1 and mgr.latest().step == 5
    assert [i.step for i in mgr.list()] == [1, 4, 5]
    assert hidden_dirs(mgr) == []


def test_prune_min_mode_and_ties_go_to_newer(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, best_mode="min")
    for step, loss in enumerate([2.0, 1.0, 3.0, 1.0, 4.0]):
        mgr.save(step, small_tensors(step), {}, metric=loss)
    assert step_dirs(mgr) == ["step-00000003", "step-00000004"]
    assert mgr.best().step == 3


def test_prune_without_best_and_without_metrics(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=False)
    for step in range(4):
        mgr.save(step, small_tensors(step), {}, metric=float(-step))
    assert step_dirs(mgr) == ["step-00000002", "step-00000003"]
    mgr = CheckpointManager(tmp_path / "nometric", keep_last=2)
    for step in range(4):
        mgr.save(step, small_tensors(step), {})
    assert step_dirs(mgr) == ["step-00000002", "step-00000003"]
    assert mgr.best() is None


def test_just_written_checkpoint_survives_even_when_older_than_the_rest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=False)
    for step in (10, 20, 30):
        mgr.save(step, small_tensors(step), {})
    mgr.save(5, small_tensors(5), {})  # e.g. a deliberate restart from an old checkpoint
    assert step_dirs(mgr) == ["step-00000005", "step-00000020", "step-00000030"]


# --------------------------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------------------------


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside tensor data: the header still parses
    path.write_bytes(bytes(data))


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the header's opening brace: its JSON no longer parses
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "flip_data_byte": (lambda d: flip_last_byte(d / "model.safetensors"), "sha256"),
    "flip_header_byte": (lambda d: flip_header_byte(d / "ema.safetensors"), "ema.safetensors"),
    "truncate_tensors": (lambda d: truncate(d / "model.safetensors"), "bytes, manifest says"),
    "truncate_state": (lambda d: truncate(d / "state.json"), "state.json"),
    "delete_manifest": (lambda d: (d / "MANIFEST.json").unlink(), "MANIFEST.json is missing"),
    "delete_group": (lambda d: (d / "ema.safetensors").unlink(), "ema.safetensors is missing"),
    "garbage_manifest": (lambda d: (d / "MANIFEST.json").write_text('{"files": '), "unreadable"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_is_reported_and_skipped(tmp_path, corruption):
    damage, problem = CORRUPTIONS[corruption]
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        mgr.save(step, small_tensors(step), {"step": step})
    newest = mgr.path_for(2)
    damage(newest)

    with pytest.warns(CorruptCheckpointWarning, match=re.escape(str(newest))) as record:
        info = mgr.latest()
    assert info.step == 1
    assert any(problem in str(w.message) for w in record), [str(w.message) for w in record]
    tensors, state = mgr.load(info)
    assert state == {"step": 1}
    assert_same_groups(tensors, small_tensors(1))

    with pytest.raises(CorruptCheckpointError, match=re.escape(str(newest))):
        mgr.load(newest)
    with pytest.warns(CorruptCheckpointWarning):
        assert [i.step for i in mgr.list()] == [1]


def test_every_bit_flipped_in_a_manifest_is_refused_or_changes_nothing_it_says(tmp_path):
    """The manifest is what the files are checked against, and its metric ranks the checkpoint for pruning and
    export: a flipped bit that still parses (71.25 read as 31.25, ``metric`` as ``metrif``: no metric) is
    refused as a flipped bit in a listed file is, by the manifest's own sha256. (The lowest bit of each byte
    before the file entries, which the files themselves check: 7 -> 6, 1 -> 0, m -> l.)"""
    path = CheckpointManager(tmp_path).save(12, small_tensors(12), {"step": 12}, metric=71.25)
    manifest = path / "MANIFEST.json"
    written, read = manifest.read_bytes(), verify_checkpoint(path)
    said = lambda info: (info.step, info.metric, info.created, dict(info.files))
    for at in range(written.index(b'"files"')):
        manifest.write_bytes(written[:at] + bytes([written[at] ^ 1]) + written[at + 1 :])
        with contextlib.suppress(CorruptCheckpointError):
            assert said(verify_checkpoint(path, verify_hash=False)) == said(read), written[: at + 1]
    manifest.write_bytes(written.replace(b"71.25", b"31.25"))
    with pytest.raises(CorruptCheckpointError, match="MANIFEST.json does not match its own sha256"):
        verify_checkpoint(path)


def test_a_checkpoint_pruned_between_listing_and_reading_is_passed_over_without_a_word(tmp_path):
    """A running job prunes old checkpoints (keep_last) while export or eval reads its folder: one listed and
    then removed is no corrupt checkpoint to report, nor a FileNotFoundError; the next intact one is taken."""
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        mgr.save(step, small_tensors(step), {"step": step})
    listed = mgr.step_dirs()
    shutil.rmtree(mgr.path_for(2))  # what the job's pruning does after the listing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [i.step for i in mgr._verified(listed, verify_hash=True)] == [1]


def test_resume_auto_refuses_when_every_checkpoint_is_broken(tmp_path):
    """A fresh start on top of broken checkpoints would drop the run's records and, once newer saves push them
    out, the checkpoints: ``auto`` falls back past a broken one, but not past all of them."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, small_tensors(1), {"step": 1})
    flip_last_byte(mgr.path_for(1) / "model.safetensors")
    with pytest.warns(CorruptCheckpointWarning), pytest.raises(CheckpointError, match="none usable") as e:
        ResumePoint.find(tmp_path, "auto")
    assert f"move them out of {mgr.dir}" in str(e.value) and mgr.path_for(1).is_dir()
    assert "and train the run again" in str(
        e.value
    )  # the advice of `attnxfer eval` too: it has nothing to score
    assert ResumePoint.find(tmp_path, "none") is None  # asked for: a fresh start
    assert ResumePoint.find(tmp_path / "new-run", "auto") is None  # a new run has nothing to resume


def test_without_hashing_flipped_tensor_bytes_go_unnoticed(tmp_path):
    """The documented trade-off of verify_hash=False: only size/header/JSON are checked."""
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, small_tensors(1), {})
    flip_last_byte(mgr.path_for(1) / "model.safetensors")
    assert mgr.latest(verify_hash=False).step == 1
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        verify_checkpoint(mgr.path_for(1), verify_hash=True)


def test_corrupt_best_falls_back_to_next_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step, metric in enumerate([0.2, 0.9, 0.5]):
        mgr.save(step, small_tensors(step), {}, metric=metric)
    flip_last_byte(mgr.path_for(1) / "ema.safetensors")
    with pytest.warns(CorruptCheckpointWarning, match=re.escape(str(mgr.path_for(1)))):
        assert mgr.best().step == 2


def test_pruning_keeps_the_best_that_best_reads_when_a_better_ranked_one_is_broken(tmp_path):
    """A flipped byte in the top-ranked checkpoint makes step 2 the best `best()` and export read: pruning
    keeps it (and the broken one, for a human), rather than the broken one alone."""
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step, metric in enumerate([0.2, 0.9, 0.5, 0.3]):
        mgr.save(step, small_tensors(step), {}, metric=metric)
    flip_last_byte(mgr.path_for(1) / "model.safetensors")
    CheckpointManager(tmp_path, keep_last=1).save(4, small_tensors(4), {}, metric=0.1)
    assert step_dirs(mgr) == ["step-00000001", "step-00000002", "step-00000004"]
    with pytest.warns(CorruptCheckpointWarning):
        assert mgr.best().step == 2


def test_broken_dirs_are_not_pruned_and_do_not_count(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=False)
    for step in (1, 2):
        mgr.save(step, small_tensors(step), {})
    (mgr.path_for(2) / "MANIFEST.json").unlink()
    mgr.save(3, small_tensors(3), {})
    # step 2 is broken: kept for inspection, and steps 1 and 3 are the two intact ones kept
    assert step_dirs(mgr) == ["step-00000001", "step-00000002", "step-00000003"]
    # a dir only its hashes show broken (a flipped byte) is kept too, where the cheap checks would prune it
    flip_last_byte(mgr.path_for(1) / "model.safetensors")
    mgr.save(4, small_tensors(4), {})
    assert step_dirs(mgr) == ["step-00000001", "step-00000002", "step-00000003", "step-00000004"]


# --------------------------------------------------------------------------------------------
# crashed saves and existing steps
# --------------------------------------------------------------------------------------------


def fake_crashed_save(mgr: CheckpointManager, step: int, pid: int, host: str) -> Path:
    """What a save killed after writing everything but before the rename leaves behind."""
    real = CheckpointManager(mgr.run_dir / "scratch").save(step, small_tensors(step), {"step": step})
    tmp = mgr.dir / f".tmp-step-{step:08d}.deadbeef.{pid}@{host}"
    mgr.dir.mkdir(parents=True, exist_ok=True)
    os.rename(real, tmp)
    return tmp


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, small_tensors(1), {"step": 1})
    host = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # can never be alive
    crashed = fake_crashed_save(mgr, 9, dead_pid, host)
    crashed_elsewhere = fake_crashed_save(mgr, 8, 4242, "othernode")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        in_flight = fake_crashed_save(mgr, 7, sleeper.pid, host)  # a live writer on this host
        assert mgr.latest().step == 1 and [i.step for i in mgr.list()] == [1]
        mgr.save(2, small_tensors(2), {"step": 2})
        assert not crashed.exists() and not crashed_elsewhere.exists()
        assert in_flight.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert mgr.clean_temp() == [in_flight]
    assert hidden_dirs(mgr) == [] and step_dirs(mgr) == ["step-00000001", "step-00000002"]


def test_existing_step_is_never_overwritten(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(5, small_tensors(5), {"step": 5}, metric=1.0)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(CheckpointExistsError, match="never overwritten"):
        mgr.save(5, small_tensors(6), {"step": "other"}, metric=2.0)
    assert mgr.save(5, small_tensors(6), {"step": "other"}, exist_ok=True) == path
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert hidden_dirs(mgr) == []


def test_broken_existing_step_is_moved_aside_and_replaced(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(5, small_tensors(5), {"step": 5})
    truncate(path / "model.safetensors")
    with pytest.warns(CorruptCheckpointWarning, match="moved it to"):
        mgr.save(5, small_tensors(6), {"step": "new"})
    assert mgr.load(mgr.latest())[1] == {"step": "new"}
    aside = [p for p in mgr.dir.iterdir() if p.name.startswith("step-00000005.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "MANIFEST.json").exists()


# --------------------------------------------------------------------------------------------
# kill -9 during saves
# --------------------------------------------------------------------------------------------

#: One interpreter (importing torch and attnxfer costs seconds a start) serves every round: for each
#: ``START`` line on stdin it forks a saver that says its pid, then saves steps START, START+1, ... until
#: the test SIGKILLs it; the script reaps it and says ``dead`` (its CPU time is counted as the test's).
KILL_SCRIPT = r"""
import os, sys, torch
from attnxfer.checkpoints.store import CheckpointManager
run_dir, numel = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        step = int(line)
        mgr = CheckpointManager(run_dir, keep_last=2)
        base = torch.arange(numel, dtype=torch.float32)
        print('ready', os.getpid(), flush=True)
        while True:
            tensors = {g: {'w': base + (step * 10 + i)} for i, g in enumerate(('model', 'ema', 'optimizer'))}
            mgr.save(step, tensors, {'step': step}, metric=float(step % 3))
            step += 1
    _, status = os.waitpid(pid, 0)
    print('dead', os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
"""


def expected_tensors(step: int, numel: int) -> dict:
    base = torch.arange(numel, dtype=torch.float32)
    return {g: {"w": base + (step * 10 + i)} for i, g in enumerate(("model", "ema", "optimizer"))}


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_wrong_checkpoint(tmp_path):
    """4 savers, each a fresh process SIGKILLed at a random instant of its stream of saves (forked from one
    interpreter that imported the store once)."""
    numel = 1 << 20  # 4 MiB per group, 12 MiB per checkpoint
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    rng = random.Random(1234)
    leftovers_seen = 0
    server = subprocess.Popen(
        [sys.executable, str(script), str(mgr.run_dir), str(numel)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    saver = None
    try:
        for _round in range(4):
            latest = mgr.latest()
            start = 0 if latest is None else latest.step + 1
            server.stdin.write(f"{start}\n")
            server.stdin.flush()
            said, saver = server.stdout.readline().split()
            assert said == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(int(saver), signal.SIGKILL)
            assert server.stdout.readline().split() == ["dead", str(int(signal.SIGKILL))]
            saver = None
            leftovers_seen += len(hidden_dirs(mgr)) if mgr.dir.exists() else 0

            # every step dir that exists is complete and holds exactly what was saved for its step
            for name in step_dirs(mgr) if mgr.dir.exists() else []:
                step = int(name.split("-")[1])
                tensors, state = load_checkpoint(mgr.dir / name)
                assert state == {"step": step}
                assert_same_groups(tensors, expected_tensors(step, numel))
            if mgr.dir.exists():
                assert [i.step for i in mgr.list()] == sorted(int(n.split("-")[1]) for n in step_dirs(mgr))
    finally:
        if saver is not None:  # a round that failed before its kill: no saver left saving
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(saver), signal.SIGKILL)
        server.stdin.close()
        code = server.wait(timeout=60)
        server.stdout.close()
    assert code == 0

    assert mgr.latest() is not None, "no save finished in 4 rounds; the machine is very slow"
    mgr.save(10**6, expected_tensors(0, 4), {"step": "final"})
    assert hidden_dirs(mgr) == []
    print(f"temp/trash dirs left by kills over 4 rounds: {leftovers_seen}")


# --------------------------------------------------------------------------------------------
# optimizer state without pickle
# --------------------------------------------------------------------------------------------


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if kind == "adamw":
        return torch.optim.AdamW(
            [
                {"params": first, "lr_scale": 0.5, "layer_id": 0},
                {"params": second, "weight_decay": 0.0, "betas": (0.8, 0.99), "lr_scale": 1.0},
            ],
            lr=3e-2,
            weight_decay=0.05,
            amsgrad=True,
        )
    if kind == "sgd":
        return torch.optim.SGD(
            [{"params": first}, {"params": second, "momentum": 0.0}], lr=0.1, momentum=0.9, nesterov=True
        )
    raise ValueError(kind)


def train_steps(model, opt, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * group.get("lr_scale", 1.0) * 0.9**step
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_round_trip_resumes_bit_identically(tmp_path, kind):
    def fresh():
        model = make_model()
        opt = make_optimizer(kind, model)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return model, opt

    ref_model, ref_opt = fresh()
    train_steps(ref_model, ref_opt, range(6))

    model, opt = fresh()
    train_steps(model, opt, range(3))
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, {"model": model.state_dict(), "optimizer": opt_tensors}, {"optimizer": opt_meta})
    original = opt.state_dict()
    del model, opt

    tensors, state = mgr.load(mgr.latest())
    restored = optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"])
    assert_same_tree(restored, original)
    model, opt = fresh()
    model.load_state_dict(tensors["model"])
    opt.load_state_dict(restored)
    train_steps(model, opt, range(3, 6))

    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, p_ref), name
    assert_same_tree(opt.state_dict(), ref_opt.state_dict())


def test_state_dict_encoding_is_exact_for_awkward_trees():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "buf": torch.ones(2, dtype=torch.float16)}, 7: {"step": 4}},
        "param_groups": [
            {
                "params": [0, 7],
                "betas": (0.9, 0.999),
                "lr": torch.tensor(0.01),
                "eps": 1e-8,
                "flags": [True, None, "x"],
                "inf": float("inf"),
                "nan": float("nan"),
                "nested": ((1, 2.0), [torch.zeros(1)]),
            }
        ],
        "__tensor__": "not a reference",
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},  # dotted names that collide
        "big": 2**70,
        "neg_zero": -0.0,
    }
    tensors, meta = state_dict_to_tensors(tree)
    meta = json.loads(json.dumps(meta, allow_nan=False))  # it is strict JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and len(tensors) == 6
    back = state_dict_from_tensors(tensors, meta)
    assert_same_tree(back, tree)
    assert math.copysign(1.0, back["neg_zero"]) == -1.0

    with pytest.raises(ValueError, match="missing"):
        state_dict_from_tensors({k: v for k, v in list(tensors.items())[1:]}, meta)
    with pytest.raises(ValueError, match="not referenced"):
        state_dict_from_tensors(tensors | {"extra": torch.ones(1)}, meta)
    with pytest.raises(TypeError, match=r"'state\.0\.fn' is a function"):
        state_dict_to_tensors({"state": {0: {"fn": lambda: 0}}})
    with pytest.raises(ValueError, match="optimizer state dict"):
        optimizer_state_to_tensors({"lr": 1.0})


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def draw_everything() -> list:
    return [
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),
        torch.rand(3).tolist(),
        torch.randn(3).tolist(),
        torch.randint(0, 10**6, (2,)).tolist(),
    ]


def test_rng_round_trip_through_json():
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a cached second Gaussian in `random`
    np.random.randn(1)  # and in numpy's legacy generator
    saved = json.loads(json.dumps(capture_rng_state(), allow_nan=False))
    first = draw_everything()
    draw_everything()  # move every generator on
    restore_rng_state(saved)
    assert draw_everything() == first


def test_rng_restore_rejects_foreign_state_and_warns_about_missing_gpus():
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"python": 1})
    state = capture_rng_state()
    if torch.cuda.is_available():
        state["torch_cuda"] = state["torch_cuda"] * (torch.cuda.device_count() + 1)
    else:
        state["torch_cuda"] = [state["torch_cpu"]]  # any payload: this machine cannot use it
    with pytest.warns(UserWarning, match="CUDA devices"):
        restore_rng_state(state)


# --------------------------------------------------------------------------------------------
# atomic single-file writes
# --------------------------------------------------------------------------------------------


class ExplodingBytes:
    def __bytes__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "card.md"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(target, ExplodingBytes())
    with pytest.raises(TypeError, match="JSON-serialisable"):
        atomic_write_json(target, {"loss": float("nan")})
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(target.parent) == ["card.md"]

    atomic_write_json(tmp_path / "m.json", {"acc": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"acc": 0.5}
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")
