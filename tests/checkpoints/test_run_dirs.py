"""Run directories, through the CLI: one process owns a run dir, a run's own
config.yaml resumes it from anywhere, teachers are compared by content, full and read-only run dirs end
in one line, an empty run_dir is refused and killed exports leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import ONE_BLOCK_RUN as S, fork_cli, once_each, run_cli, start_fork_server, tiny_convert_report
from safetensors.torch import load_file, save_file

from attnxfer.checkpoints.run_lock import (
    LOCK_NAME,
    RunDirInUseError,
    _start_time,
    refuse_other_work,
    run_lock,
)
from attnxfer.checkpoints.store import CheckpointManager
from attnxfer.errors import PathExistsError
from attnxfer.launch import cli

REPO = Path(__file__).resolve().parents[2]


def _error_line(err: str) -> str:
    """The one line a refusal prints (no traceback before it)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def _write_lock(run: Path, **content) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_NAME
    base = {"host": socket.gethostname(), "command": "train", "started": "2026-01-01T00:00:00+00:00"}
    path.write_text(json.dumps({**base, **content}))
    return path


@contextlib.contextmanager
def _live_process():
    """A process of this host that lives while the block runs."""
    proc = subprocess.Popen(["sleep", "120"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run, started from its parent folder with a relative run_dir (as users do)."""
    home = tmp_path_factory.mktemp("home")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        assert (
            cli.main(["train", *S, "schedule.max_steps=2", "checkpoint.every_steps=1", "run_dir=runs/x"]) == 0
        )
    finally:
        os.chdir(cwd)
    return home / "runs" / "x"


# ---------------------------------------------------------------------------------------- 1: the lock


@pytest.mark.slow
def test_two_trains_started_together_one_trains_and_the_other_refuses_naming_it(tmp_path):
    """Both start at once; the second to reach the run dir exits 2 while the first trains on (a long run,
    stopped with Ctrl-C once it has logged a step and the refusal is seen), and metrics.jsonl holds every step
    once. Each is a process of its own, forked with the CLI imported (`fork_cli`): no interpreter start-up
    apart, so they race for the run dir within milliseconds of each other."""
    run = tmp_path / "R"
    argv = ["train", *S, "schedule.epochs=100000", "checkpoint.every_steps=50", f"run_dir={run}"]
    start_fork_server()  # started before either child: neither waits for it
    outs = {i: (tmp_path / f"{i}.out", tmp_path / f"{i}.err") for i in range(2)}
    procs = [fork_cli(argv, *outs[i]) for i in range(2)]
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while all(p.is_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        loser = next(i for i, p in enumerate(procs) if not p.is_alive())
        winner = procs[1 - loser]
        while winner.is_alive() and '"train"' not in (metrics.read_text() if metrics.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert winner.is_alive()  # still training
        os.kill(winner.pid, signal.SIGINT)
        winner.join(120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    said = {i: (out.read_text(), err.read_text()) for i, (out, err) in outs.items()}
    assert procs[loser].exitcode == 2, said[loser]
    assert winner.exitcode == 130, said[1 - loser]  # Ctrl-C
    line = _error_line(said[loser][1])
    assert f"pid {winner.pid}" in line and socket.gethostname() in line and "in use" in line
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    train_steps = Counter(r["step"] for r in records if r["split"] == "train")
    assert len(train_steps) > 0 and max(train_steps.values()) == 1  # every step once
    assert sorted(train_steps) == list(range(1, len(train_steps) + 1))
    assert not (run / LOCK_NAME).exists()  # released on Ctrl-C
    assert not list((run / "checkpoints").glob("*.replaced-*"))


def test_a_lock_left_by_a_killed_process_is_taken_over_and_released(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _write_lock(run, pid=_dead_pid(), slurm_job=None)
    code, out, err = run_cli(capsys, "train", *S, "schedule.max_steps=3", f"run_dir={run}")
    assert code == 0, err
    assert "taking over the lock" in out and "is gone" in out and "starts from step 0" not in out
    assert (run / "checkpoints" / "step-00000003").is_dir()
    assert not (run / LOCK_NAME).exists()
    # killed before its first save: that the run starts over is said (it had said only the takeover)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _write_lock(fresh, pid=_dead_pid(), slurm_job=None)
    code, out, err = run_cli(capsys, "train", *S, "schedule.max_steps=1", f"run_dir={fresh}")
    assert code == 0 and "it saved no checkpoint there, so this run starts from step 0" in out, err


def test_locks_one_dead_process_left_are_taken_over_with_one_line(tmp_path, capsys):
    """A killed study leaves its folder's lock and each student's: the takeover is said once, not once a folder."""
    dead = {"pid": _dead_pid(), "pid_started": "12345", "command": "study"}
    study, students = tmp_path / "study", [tmp_path / "study" / "copy", tmp_path / "study" / "distill"]
    for folder in (study, *students):
        _write_lock(folder, **dead)
    capsys.readouterr()
    with contextlib.ExitStack() as stack:
        for folder in (study, *students):
            stack.enter_context(run_lock(folder, "study", writes="training run" if folder != study else None))
    said = [line for line in capsys.readouterr().out.splitlines() if "taking over the lock" in line]
    assert len(said) == 1 and said[0].startswith(f"{study}: ") and "is gone" in said[0]
    assert not any((folder / LOCK_NAME).exists() for folder in (study, *students))


@pytest.mark.parametrize("command", ["train", "convert", "search", "pretrain"])
def test_every_command_that_writes_a_run_dir_refuses_a_live_holder(command, tmp_path, capsys):
    run = tmp_path / "held"
    extra = ["teacher.spec=vit_micro_patch4_28"] if command in ("convert", "search") else []
    extra += ["transfer.mode=none"] if command == "train" else []  # else it is told to name a teacher first
    with _live_process() as pid:
        _write_lock(run, pid=pid, pid_started=_start_time(pid), slurm_job="4242", command="convert")
        before = sorted(p.name for p in run.iterdir())
        code, _, err = run_cli(
            capsys,
            command,
            *(a for a in S if a.startswith("data.")),
            *extra,
            "log.progress=false",
            f"run_dir={run}",
        )
    assert code == 2
    line = _error_line(err)
    assert f"pid {pid}" in line and "SLURM job 4242" in line and "scancel 4242" in line
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    "command, folder, extra",
    [
        ("train", "", ["transfer.mode=none"]),
        ("convert", "stage2", ["teacher.spec=vit_micro_patch4_28"]),  # locked once stage 2 starts
        ("study", "lr=2e-3", ["transfer.mode=none", "--vary", "optim.lr=1e-3,2e-3"]),  # a student's
    ],
)
def test_submit_refuses_a_folder_its_job_would_lock_while_a_live_process_holds_it(
    command, folder, extra, tmp_path, capsys
):
    """The job would stop at its start, after the queue's wait: submit says it at once, in the job's words.
    The same lock once its holder is gone is let be (the job takes it over)."""
    data = (a for a in S if a.startswith("data."))
    argv = ["submit", "--command", command, *data, f"run_dir={tmp_path / 'run'}", *extra, "--dry-run"]
    held = tmp_path / "run" / folder
    with _live_process() as pid:
        _write_lock(held, pid=pid, pid_started=_start_time(pid), slurm_job="4242")
        code, _, err = run_cli(capsys, *argv)
    assert code == 2
    line = _error_line(err)
    assert line.startswith(f"attnxfer submit: error: {held} is in use by `attnxfer train` on host "), line
    assert f"pid {pid}" in line and "scancel 4242" in line
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err


def test_submit_refuses_a_key_the_runs_checkpoint_fixes_before_submitting(trained, capsys):
    """A resubmitted run with a key it cannot resume with (the seed) would stop at its start, after the queue's
    wait: submit says it at once, in train's words, and writes nothing; the run's own values pass."""
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    argv = ["submit", *S, "schedule.max_steps=2", "checkpoint.every_steps=1", f"run_dir={trained}"]
    code, _, err = run_cli(capsys, *argv, "seed=7", "--dry-run")
    assert code == 2, err
    refusal = (
        f"error: {trained} already holds a run (checkpoint step-00000002) trained with different values "
    )
    assert refusal + "for: seed (0 -> 7)" in _error_line(err)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    code, _, err = run_cli(capsys, *argv, "schedule.max_steps=3", "--dry-run")  # to train on: submitted
    assert code == 0, err
    # at its end, with its schedule: a job that would wait in the queue to say "nothing to do", said here
    code, _, err = run_cli(capsys, *argv, "--dry-run")
    assert code == 2 and f"nothing to do: {trained} is at step 2 of the 2 its schedule trains" in err, err
    assert "To train longer, raise schedule.max_steps or schedule.epochs" in err  # max_steps ends it
    # a sweep writes one run a point under run_dir: inside this run's folder, export and resume would mix them
    code, _, err = run_cli(capsys, *argv, "--sweep", "optim.lr=1e-3,2e-3", "--dry-run")
    sweep = "holds a training run (run.json), which attnxfer train --sweep does not write into"
    assert code == 2 and sweep in _error_line(err), err
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before


@pytest.mark.slow  # a study of two students, one step each
def test_submit_refuses_a_study_its_job_would_not_resume_before_submitting(tmp_path, capsys):
    """A resubmitted study with a key its checkpoint fixes (the seed), with other students, or on a number of
    processes its students cannot resume on, would stop at its start, after the queue's wait: submit says it at
    once, in study's words, and writes nothing."""
    run = tmp_path / "study"
    argv = [*S, "schedule.max_steps=1", "checkpoint.every_steps=1", f"run_dir={run}"]
    assert cli.main(["study", *argv, "--vary", "optim.lr=1e-3,2e-3"]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    submit = ["submit", "--command", "study", *argv, "--dry-run"]
    code, _, err = run_cli(capsys, *submit, "seed=7", "--vary", "optim.lr=1e-3,2e-3")
    assert code == 2, err
    refusal = f"error: {run} already holds a study (checkpoint step-00000001) trained with different values "
    assert refusal + "for: seed (0 -> 7)" in _error_line(err)
    code, _, err = run_cli(capsys, *submit, "--vary", "optim.lr=1e-3,3e-3")
    assert code == 2 and f"error: {run} holds a study (study.json) of other students" in _error_line(err)
    # its global batch of 16 on 3 processes: refused as train refuses it, naming the counts that share it; on 2
    # it is re-split (8 each) as the job re-splits it
    code, _, err = run_cli(capsys, *submit, "--vary", "optim.lr=1e-3,2e-3", "--tasks-per-node", "3")
    assert code == 2 and "which cannot share a global batch of 16" in _error_line(err), err
    assert "(1, 2, 4, 8, 16)" in err
    code, _, err = run_cli(capsys, *submit, "--vary", "optim.lr=1e-3,2e-3", "--tasks-per-node", "2")
    assert code == 0, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    code, _, err = run_cli(capsys, *submit, "--vary", "optim.lr=1e-3,2e-3")
    assert code == 0, err


@pytest.mark.slow  # a whole conversion (1 stage-1 step, 1 stage-2 step)
def test_submit_refuses_a_conversion_its_job_would_not_resume_before_submitting(
    tiny_teacher_dir, tmp_path, capsys
):
    """A resubmitted conversion with a key its stage 1 checkpoint fixes (the seed) would stop at its start,
    after the queue's wait: submit says it at once, in convert's words, and writes nothing."""
    run = tmp_path / "conv"
    argv = [
        *(a for a in S if a.startswith("data.")),
        "log.progress=false",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "convert.attention=hedgehog",
        "convert.stage1_steps=1",
        "schedule.max_steps=1",
        "checkpoint.every_steps=1",
        *tiny_convert_report(1, 2),
        f"run_dir={run}",
    ]
    assert cli.main(["convert", *argv]) == 0
    capsys.readouterr()  # the conversion's own lines (its untrained teacher is warned about)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    submit = ["submit", "--command", "convert", *argv, "--dry-run"]
    code, _, err = run_cli(capsys, *submit, "seed=7")
    assert code == 2, err
    refusal = (
        f"error: {run / 'stage1'} already holds a stage 1 (checkpoint step-00000001) trained with different "
    )
    assert refusal + "values for: seed (0 -> 7)" in _error_line(err)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    code, _, err = run_cli(capsys, *submit)  # at both stages' ends: its job would only say nothing to do
    assert code == 2 and f"nothing to do: {run} has run both stages to their ends" in _error_line(err)
    code, _, err = run_cli(capsys, *submit, "schedule.max_steps=2")  # its own values, and a stage 2 to go on
    assert code == 0, err


@pytest.mark.parametrize("command", ["convert", "search"])
def test_a_run_dir_holding_another_commands_work_is_refused_untouched(command, trained, capsys):
    """A conversion's stage folders or a search's files beside a run's run.json would hide that run from
    export, inspect and resume: refused before anything is written."""
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    data = (a for a in S if a.startswith("data."))
    argv = [command, *data, "teacher.spec=vit_micro_patch4_28", "log.progress=false", f"run_dir={trained}"]
    refusal = f"holds a training run (run.json), which attnxfer {command} does not write into"
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and refusal in _error_line(err)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    if command == "search":  # a study writes a study's folder, not a run's (its students' are runs)
        code, _, err = run_cli(capsys, "study", *argv[1:], "--vary", "optim.lr=1e-3,2e-3")
        assert code == 2 and "holds a training run (run.json), which attnxfer study" in _error_line(err)
        assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    if command == "convert":  # submit says it before it submits a job that would fail at once
        code, _, err = run_cli(capsys, "submit", "--command", "convert", *argv[1:], "--cluster", "local")
        assert code == 2 and refusal in _error_line(err)
        assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before


def test_a_training_run_and_an_mae_pre_training_run_are_no_folder_for_each_other(trained, tmp_path, capsys):
    """Both write a run.json: a resume of the one by the other would refuse config values that never agree
    and say to drop them. Refused, naming the command that continues the folder's run."""
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    data = (a for a in S if a.startswith("data."))
    code, _, err = run_cli(capsys, "pretrain", *data, "log.progress=false", f"run_dir={trained}")
    refusal = (
        "holds a training run (run.json), which attnxfer pretrain does not write into: continue it with "
        f"attnxfer train -c {trained / 'config.yaml'}"
    )
    assert code == 2 and refusal in _error_line(err)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before
    (tmp_path / "run.json").write_text(json.dumps({"objective": "mae", "mode": "mae-pretrain"}))
    with pytest.raises(
        PathExistsError, match=r"MAE pre-training run .*continue it with attnxfer pretrain -c"
    ):
        refuse_other_work(tmp_path, "train")
    refuse_other_work(tmp_path, "pretrain")  # its own command goes on with it
    # its run.json gone: the sections of its config.yaml (mae: pretrain's alone) still say whose it is
    (tmp_path / "run.json").unlink()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("run_dir: x\nmae: {mask_ratio: 0.75}\n")
    with pytest.raises(PathExistsError, match=r"holds an MAE pre-training run \(config.yaml\)"):
        refuse_other_work(tmp_path, "train")
    refuse_other_work(tmp_path, "pretrain")
    (tmp_path / "config.yaml").write_text("run_dir: x\ntransfer: {mode: distill}\n")
    with pytest.raises(PathExistsError, match=r"holds a training run \(config.yaml\).*attnxfer train -c"):
        refuse_other_work(tmp_path, "pretrain")


def test_a_conversions_stage_1_is_no_run_dir_for_any_command(tmp_path):
    """Stage 1 holds its checkpoints alone (no run.json): a conversion or a run written there would pass for
    it. Its stage 2, a training run, is run_lock'ed as one; a folder of the user's named stage1 is no stage."""
    conv = tmp_path / "conv"
    (conv / "stage1" / "checkpoints").mkdir(parents=True)
    (conv / "stage2").mkdir()
    (conv / "config.yaml").write_text("run_dir: conv\n")
    for command in ("convert", "train", "search"):
        with pytest.raises(
            PathExistsError, match=f"stage 1 of the conversion {conv}, which attnxfer {command}"
        ):
            refuse_other_work(conv / "stage1", command)
    refuse_other_work(conv / "stage2", "train")
    (tmp_path / "exp" / "stage1").mkdir(parents=True)
    refuse_other_work(tmp_path / "exp" / "stage1", "convert")


def test_a_run_dir_inside_a_folder_a_run_writes_into_is_refused_before_anything_is_written(trained, capsys):
    """A run written into another run's checkpoint (or its checkpoints/, tb/) trained and reported done, and
    went with that checkpoint the next time its run pruned; a folder of that name outside any run is the user's."""
    step = sorted((trained / "checkpoints").glob("step-*"))[-1]
    before = sorted(p.name for p in step.iterdir())
    for inside in (step, trained / "checkpoints", trained / "tb" / "mine"):
        code, _, err = run_cli(capsys, "train", *S, "schedule.max_steps=1", f"run_dir={inside}")
        assert (
            code == 2 and f"is in {trained}'s {inside.relative_to(trained).parts[0]}/, which its run" in err
        )
    assert sorted(p.name for p in step.iterdir()) == before and not (trained / "tb" / "mine").exists()
    refuse_other_work(trained.parent / "elsewhere" / "checkpoints" / "mine", "train")
    # runs kept under a folder named checkpoints/ (as $SCRATCH/checkpoints/EXP): one there marks no run above it
    scratch = trained.parent / "scratch" / "checkpoints"
    code, _, err = run_cli(capsys, "train", *S, "schedule.max_steps=1", f"run_dir={scratch / 'first'}")
    assert code == 0, err
    refuse_other_work(scratch / "first", "train")  # it resumes
    refuse_other_work(scratch / "second", "train")  # and another starts beside it
    refuse_other_work(trained.parent / "scratch" / "pictures" / "mae", "pretrain")


def test_a_refused_run_leaves_neither_its_folder_nor_the_folders_made_above_it(tmp_path, capsys):
    """Bad input keeps nothing: an empty runs/demo left by a demo recipe run before the demo would be told
    apart from the user's own folders by no one."""
    run = tmp_path / "runs" / "demo" / "copy"
    code, _, err = run_cli(capsys, *once_each(["train", *S, "transfer.mode=copy", f"run_dir={run}"]))
    assert code == 2 and "needs a teacher" in _error_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "pretrain", "search", "study"])
def test_a_conversion_stopped_in_stage_1_is_no_folder_for_another_command(tmp_path, command):
    """Before stage 2 starts, a conversion's folder holds only stage1/: another command's run.json or
    candidates.jsonl beside it would hide it from its own resume (its config.yaml overwritten too)."""
    (tmp_path / "stage1" / "checkpoints" / "step-00000004").mkdir(parents=True)
    with pytest.raises(PathExistsError, match=r"holds a conversion \(stage1\), which attnxfer " + command):
        refuse_other_work(tmp_path, command)
    refuse_other_work(tmp_path, "convert")  # its own command goes on with it


@pytest.mark.parametrize("command", ["train", "pretrain", "convert", "study"])
def test_a_sweeps_folder_is_no_run_dir_for_a_command_without_sweep(tmp_path, command):
    """A sweep has no file of its own at its top, only its points' folders (RUN_DIR/000_KEY=VALUE): the same
    submit without --sweep would put a run's files beside them, and the sweep's own resubmission is then refused."""
    (tmp_path / "000_optim.lr=1e-3" / "checkpoints").mkdir(parents=True)
    (tmp_path / "000_optim.lr=1e-3" / "run.json").write_text("{}")
    with pytest.raises(
        PathExistsError, match=r"holds a sweep \(000_optim.lr=1e-3/\), which attnxfer " + command
    ):
        refuse_other_work(tmp_path, command)
    refuse_other_work(tmp_path, f"{command} --sweep", writes="sweep")  # the sweep goes on with it
    refuse_other_work(tmp_path / "000_optim.lr=1e-3", "train")  # and each point is a run of its own


def test_holders_on_other_hosts_are_judged_by_heartbeat_and_slurm_job(tmp_path, monkeypatch, capsys):
    run = tmp_path / "shared"
    lock = _write_lock(run, host="node-elsewhere", pid=1, slurm_job="77")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunDirInUseError, match="node-elsewhere"), run_lock(run, "train"):
        pass  # a fresh heartbeat on another host: alive
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto this host
    capsys.readouterr()
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "requeued" in capsys.readouterr().out
    monkeypatch.delenv("SLURM_JOB_ID")
    _write_lock(run, host="node-elsewhere", pid=1, slurm_job="78")
    old = time.time() - 3600
    os.utime(lock, (old, old))  # its heartbeat stopped an hour ago
    with run_lock(run, "train", heartbeat_s=0.05):
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5  # the owner's heartbeat refreshes it
    assert "heartbeat stopped" in capsys.readouterr().out and not lock.exists()


def _slurm_env(monkeypatch, job="77", restart=None, step="0", task="0", cluster=None):
    """This process as a task of a SLURM job, as srun describes it (restart None: a first attempt; cluster:
    SLURM_CLUSTER_NAME). No cluster answers for it: asked which steps run, squeue fails at once (a SLURM_CONF
    that names no cluster), where a machine's own config would have it wait seconds for a controller."""
    monkeypatch.setenv("SLURM_CONF", os.devnull)
    for var, value in (
        ("SLURM_JOB_ID", job),
        ("SLURM_RESTART_COUNT", restart),
        ("SLURM_STEP_ID", step),
        ("SLURM_PROCID", task),
        ("SLURM_CLUSTER_NAME", cluster),
    ):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


def _lock_of_this_job_elsewhere(run: Path, pid: int) -> Path:
    """The lock this process writes as a task of SLURM job 77, as if written by ``pid`` on another node (a
    pid of its own per test: a takeover of one dead holder is said once per process)."""
    with run_lock(run, "train"):
        content = json.loads((run / LOCK_NAME).read_text())
    return _write_lock(run, **{**content, "host": "node-elsewhere", "pid": pid})


@pytest.mark.parametrize(
    "other", [dict(step="1"), dict(task="1")], ids=["another-srun-step", "another-task-of-the-step"]
)
def test_a_live_step_or_task_of_the_same_slurm_job_keeps_its_lock(tmp_path, monkeypatch, other):
    """Two srun steps of one job (or two tasks of one step) share SLURM_JOB_ID but run at once: the second
    must be refused while the first's heartbeat goes on, not take the lock as if the first were a requeued
    attempt, or both would write the run dir."""
    run = tmp_path / "shared"
    _slurm_env(monkeypatch)
    lock = _lock_of_this_job_elsewhere(run, pid=2)
    _slurm_env(monkeypatch, **other)
    with (
        pytest.raises(RunDirInUseError, match=r"node-elsewhere.*SLURM job 77\.0 task 0") as refused,
        run_lock(run, "train"),
    ):
        pass
    # the step to stop is named: scancel 77 would end this command's own job with it; its pid is another host's,
    # where this host's `kill 2` would reach some other process
    assert "(scancel 77.0)" in str(refused.value) and "kill 2" not in str(refused.value)
    old = time.time() - 3600  # its heartbeat stopped an hour ago: gone, as any other holder
    os.utime(lock, (old, old))
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def _squeue_answering(folder: Path, lines: str) -> None:
    """PATH holds only an ``squeue`` that prints ``lines`` (squeue --steps -o %i's format) and exits 0."""
    folder.mkdir()
    squeue = folder / "squeue"
    squeue.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    squeue.chmod(0o755)


def test_a_sibling_step_slurm_says_has_ended_is_taken_over_at_once(tmp_path, monkeypatch, capsys):
    """A step SIGKILLed on another node leaves a fresh heartbeat; the job script's next srun must not wait five
    minutes for it: squeue listing this step but not the holder's says the holder's step has ended."""
    run = tmp_path / "shared"
    _slurm_env(monkeypatch)
    lock = _lock_of_this_job_elsewhere(run, pid=5)
    _slurm_env(monkeypatch, step="1")
    _squeue_answering(tmp_path / "bin", "77.1\\n77.batch\\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    capsys.readouterr()
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_step"] == "1"
    assert "step 77.0 has ended (squeue), run on host node-elsewhere" in capsys.readouterr().out


@pytest.mark.parametrize(
    "squeue",
    [None, "", "77.0\\n77.1\\n"],
    ids=["squeue-not-installed", "squeue-does-not-know-the-job", "squeue-lists-the-step"],
)
def test_a_sibling_step_is_judged_by_its_heartbeat_unless_squeue_says_it_ended(tmp_path, monkeypatch, squeue):
    """Only SLURM's word that the step ended takes a fresh lock: without squeue, with an answer that does not
    list this very step (squeue lists nothing for a job it does not know, as under another cluster's
    SLURM_CONF), or while the step runs, the holder is alive until its heartbeat stops."""
    run = tmp_path / "shared"
    _slurm_env(monkeypatch)
    lock = _lock_of_this_job_elsewhere(run, pid=6)
    _slurm_env(monkeypatch, step="1")
    if squeue is None:
        (tmp_path / "bin").mkdir()  # a real PATH lookup that finds no squeue
    else:
        _squeue_answering(tmp_path / "bin", squeue)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RunDirInUseError, match=r"SLURM job 77\.0 task 0"), run_lock(run, "train"):
        pass
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_step"] == "1"


def _lock_of_job_78_elsewhere(run: Path, pid: int, cluster: str = "loopback") -> Path:
    """A fresh lock of SLURM job 78 of ``cluster``, written by this user on another node (a pid of its own per
    test: a takeover of one dead holder is said once per process); this process is job 79 of ``loopback``."""
    (run / LOCK_NAME).unlink(missing_ok=True)
    return _write_lock(run, host="node-elsewhere", pid=pid, slurm_job="78", slurm_cluster=cluster)


def _refused_to(run: Path, pid: int) -> None:
    """``run``'s lock is refused, naming its holder: job 78's process ``pid`` on the other node."""
    with (
        pytest.raises(RunDirInUseError, match=rf"node-elsewhere, pid {pid}, SLURM job 78,"),
        run_lock(run, "train"),
    ):
        pass


def _squeue_on(monkeypatch, folder: Path, lines: str) -> None:
    """PATH holds only an ``squeue`` answering ``lines`` (squeue -O 'JobID:|,State:|,Cluster:|''s format)."""
    _squeue_answering(folder, lines)
    monkeypatch.setenv("PATH", str(folder))


@pytest.mark.parametrize(
    ("pid", "answer", "said"),
    [
        (21, "79|RUNNING|loopback|\\n78|NODE_FAIL|loopback|\\n", "squeue: NODE_FAIL"),
        (22, "79|RUNNING|loopback|\\n", "squeue lists it no more"),
    ],
    ids=["job-in-a-final-state", "job-no-longer-listed"],
)
def test_a_holder_of_another_slurm_job_that_squeue_says_has_ended_is_taken_over_at_once(
    tmp_path, monkeypatch, capsys, pid, answer, said
):
    """A job resubmitted after the old one died with its node must not wait five minutes for the dead job's
    fresh heartbeat: squeue listing this job but the holder's as ended (or no more) says it is gone."""
    run = tmp_path / "shared"
    lock = _lock_of_job_78_elsewhere(run, pid)
    _slurm_env(monkeypatch, job="79", cluster="loopback")
    _squeue_on(monkeypatch, tmp_path / "bin", answer)
    capsys.readouterr()
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_job"] == "79"
        assert json.loads(lock.read_text())["slurm_cluster"] == "loopback"
    out = capsys.readouterr().out
    assert f"taking over the lock of `attnxfer train` on host node-elsewhere, pid {pid}, SLURM job 78," in out
    assert f"SLURM job 78 has ended ({said}), run on host node-elsewhere" in out


@pytest.mark.parametrize(
    "answer",
    [
        None,
        "hangs",
        "",
        "79|RUNNING|other|\\n78|COMPLETED|other|\\n",
        *(
            f"79|RUNNING|loopback|\\n78|{state}|loopback|\\n"
            for state in ("PENDING", "RUNNING", "SUSPENDED", "REQUEUED", "COMPLETING")
        ),
    ],
    ids=[
        "squeue-not-installed",
        "squeue-does-not-answer-in-time",
        "squeue-lists-neither-job",
        "squeue-answers-for-another-cluster",
        *("job-" + state for state in ("pending", "running", "suspended", "requeued", "completing")),
    ],
)
def test_another_slurm_jobs_holder_keeps_its_lock_until_squeue_says_the_job_has_ended(
    tmp_path, monkeypatch, answer
):
    """Only SLURM's word that the job ended takes a fresh lock: without squeue, with no answer in time, with
    an answer that lists neither job or speaks for another cluster (another SLURM_CONF: job 78 there is another
    job), or while the job may still run (COMPLETING: a step saving after its SIGTERM), it is refused; SLURM's
    word then takes it at once."""
    run = tmp_path / "shared"
    lock = _lock_of_job_78_elsewhere(run, pid=23)
    _slurm_env(monkeypatch, job="79", cluster="loopback")
    (tmp_path / "bin").mkdir()  # a real PATH lookup: no squeue, or this one
    if answer == "hangs":
        monkeypatch.setattr("attnxfer.checkpoints.run_lock.SQUEUE_TIMEOUT_S", 0.5)
        (tmp_path / "bin" / "squeue").write_text("#!/bin/sh\nexec sleep 30\n")
        (tmp_path / "bin" / "squeue").chmod(0o755)
    elif answer is not None:
        (tmp_path / "bin").rmdir()
        _squeue_answering(tmp_path / "bin", answer)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    _refused_to(run, pid=23)
    _squeue_on(monkeypatch, tmp_path / "ended", "79|RUNNING|loopback|\\n78|COMPLETED|loopback|\\n")
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_job"] == "79"


def test_outside_any_job_only_squeue_listing_the_holders_job_as_ended_takes_its_lock(tmp_path, monkeypatch):
    """Outside a job (`attnxfer submit` checking the folder before it submits the job again), squeue's word on
    the holder's job, listed with its cluster, decides; a job it does not list may be one of another cluster."""
    run = tmp_path / "shared"
    lock = _lock_of_job_78_elsewhere(run, pid=25)
    _slurm_env(monkeypatch, job=None, step=None, task=None)
    _squeue_on(monkeypatch, tmp_path / "bin", "")
    _refused_to(run, pid=25)
    _squeue_on(monkeypatch, tmp_path / "ended", "78|NODE_FAIL|loopback|\\n")
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(
    "whose",
    [
        "another-cluster",
        "an-older-lock-without-its-cluster",
        pytest.param(
            "another-user",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="giving the lock to another user takes root"),
        ),
    ],
)
def test_squeue_speaks_only_for_the_jobs_it_can_see(tmp_path, monkeypatch, whose):
    """A job id means a job of its own cluster: a holder of another cluster sharing the folder (or one whose
    cluster was not recorded) is judged by its heartbeat whatever this cluster's squeue says of that id; and
    SLURM may hide another user's jobs (PrivateData=jobs), so squeue not listing one says nothing. The same
    answer takes this user's lock of this cluster's job at once."""
    run = tmp_path / "shared"
    lock = _lock_of_job_78_elsewhere(run, pid=24)
    if whose == "another-cluster":
        _lock_of_job_78_elsewhere(run, pid=24, cluster="other")
    elif whose == "an-older-lock-without-its-cluster":
        content = json.loads(lock.read_text())
        del content["slurm_cluster"]
        lock.write_text(json.dumps(content))
    else:
        os.chown(lock, 65534, 65534)
    _slurm_env(monkeypatch, job="79", cluster="loopback")
    _squeue_on(monkeypatch, tmp_path / "bin", "79|RUNNING|loopback|\\n")
    _refused_to(run, pid=24)
    _lock_of_job_78_elsewhere(run, pid=24)  # this user's, of this cluster
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_job"] == "79"


def test_a_requeued_attempt_of_the_same_slurm_job_takes_over_an_earlier_attempts_fresh_lock(
    tmp_path, monkeypatch, capsys
):
    """A requeue keeps SLURM_JOB_ID and raises SLURM_RESTART_COUNT; the killed attempt's heartbeat is still
    fresh when the requeued one starts, which must not wait ten beats for it."""
    run = tmp_path / "shared"
    _slurm_env(monkeypatch)
    lock = _lock_of_this_job_elsewhere(run, pid=3)
    assert json.loads(lock.read_text())["slurm_restart"] == 0
    _slurm_env(monkeypatch, restart="1")
    capsys.readouterr()
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_restart"] == 1
        later = json.loads(lock.read_text())
    assert (
        "earlier attempt of this same SLURM job 77 (restart 0; this is restart 1)" in capsys.readouterr().out
    )
    _write_lock(run, **{**later, "host": "node-elsewhere", "pid": 3})
    _slurm_env(monkeypatch, restart="1", step="1")  # a later step of that attempt, not a later attempt
    with pytest.raises(RunDirInUseError, match="node-elsewhere"), run_lock(run, "train"):
        pass


def test_a_first_attempt_that_inherited_a_restart_count_is_still_an_earlier_attempt(tmp_path, monkeypatch):
    """SLURM sets SLURM_RESTART_COUNT only once a job is requeued: a first attempt submitted from inside a
    requeued job carries that job's count (sbatch exports the environment), here 2, above its own first
    requeue's 1. Only one attempt of a job runs at a time, so a holder of another attempt is gone."""
    run = tmp_path / "shared"
    _slurm_env(monkeypatch, restart="2")
    lock = _lock_of_this_job_elsewhere(run, pid=4)
    _slurm_env(monkeypatch, restart="1")
    with run_lock(run, "train"):
        assert json.loads(lock.read_text())["slurm_restart"] == 1


def test_a_lock_that_names_no_process_is_not_answered_with_a_kill_of_none(tmp_path):
    """An empty lock file a minute old (its writer may still be filling it in) is refused; the advice has no
    process to kill, so it says to wait or delete the file, not ``kill None``."""
    run = tmp_path / "r"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.touch()
    a_minute_ago = time.time() - 60
    os.utime(lock, (a_minute_ago, a_minute_ago))
    with pytest.raises(RunDirInUseError) as refused, run_lock(run, "train"):
        pass
    assert "None" not in str(refused.value) and "kill" not in str(refused.value)
    assert f"If no such process exists any more, delete {lock}" in str(refused.value)


def test_a_nested_acquire_in_one_thread_is_fine_another_thread_is_refused(tmp_path):
    run = tmp_path / "r"
    errors = []

    def other():
        try:
            with run_lock(run, "train"):
                pass
        except RunDirInUseError as e:
            errors.append(str(e))

    with run_lock(run, "convert"), run_lock(run, "train"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert (run / LOCK_NAME).exists()
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and "`attnxfer convert`" in errors[0]
    assert not (run / LOCK_NAME).exists()


def test_ctrl_c_in_eval_or_export_says_nothing_was_changed_not_that_a_rerun_resumes_training(
    trained, tmp_path, capsys, monkeypatch
):
    """Neither command trains: a re-run repeats it, and the advice says so, not "continues from step 2"."""
    import attnxfer.apps.run.evaluation
    import attnxfer.checkpoints.export

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread, here at the command's work

    monkeypatch.setattr(attnxfer.apps.run.evaluation, "evaluate_run", ctrl_c)
    monkeypatch.setattr(attnxfer.checkpoints.export, "export_run", ctrl_c)
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"))
    assert code == 130 and "it changed no checkpoint: run the same command again" in err
    assert "continues from step" not in err
    code, _, err = run_cli(capsys, "export", str(trained), str(tmp_path / "out"))
    assert code == 130 and f"nothing was written to {tmp_path / 'out'}: run the same command again" in err


# ------------------------------------------------------------------------ 2: a run's own config.yaml


def test_a_runs_own_config_resumes_and_scores_that_run_from_any_directory(
    trained, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "somewhere" / "run"
    shutil.copytree(trained, run)
    assert "runs/x" in (run / "config.yaml").read_text()  # the relative run_dir it was started with
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "train", "-c", str(run / "config.yaml"), "schedule.max_steps=3")
    assert code == 0, err
    assert "resumed from checkpoint step 2" in out
    assert (run / "checkpoints" / "step-00000003").is_dir() and not (elsewhere / "runs").exists()
    # a copy of the run, evaluated from the original's parent (where runs/x names the original)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    monkeypatch.chdir(trained.parent.parent)  # where the recorded runs/x names the original
    code, out, err = run_cli(capsys, "eval", "-c", str(copy / "config.yaml"))
    assert code == 0, err
    assert (copy / "eval-00000003.json").is_file()
    assert not list(trained.glob("eval-*.json")) and not list(run.glob("eval-*.json"))


def test_export_and_inspect_refuse_a_config_yaml_edited_after_training_as_eval_does(
    trained, tmp_path, capsys
):
    """The model card and inspect's default images name the run's data: an edited data.dataset would name
    data it never saw. Put back, both go ahead. Eval of the edited file says the same."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = run / "config.yaml"
    as_trained = config.read_text()
    as_trained = as_trained.replace(str(trained), str(run))  # the copy's own run_dir, for eval -c
    config.write_text(as_trained.replace("dataset: synthetic", "dataset: animal_mnist"))
    out = str(tmp_path / "out")
    # eval -c of the edited file itself: "score it with its own config" would name the same file
    for command in (
        ["export", str(run), out],
        ["inspect", str(run), str(run), "--out", out],
        ["eval", "-c", str(config)],
    ):
        code, _, err = run_cli(capsys, *command)
        line = _error_line(err)
        assert code == 2 and "data.dataset ('synthetic' -> 'animal_mnist')" in line
        assert f"{command[0]} reads it as it was trained: put those values back in {config}" in line
    assert not (tmp_path / "out").exists()
    config.write_text(as_trained)
    assert run_cli(capsys, "export", str(run), str(tmp_path / "out"))[0] == 0


def test_an_empty_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        capsys, "train", *S, "run_dir=''"
    )  # a YAML file's run_dir: '' (`run_dir=` has no value)
    assert code == 2 and "run_dir is empty" in _error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_under_home_holds_the_whole_run(tmp_path, capsys, monkeypatch):
    """``run_dir=~/run`` (the shell leaves a quoted ``~`` alone) is the home folder's ``run`` for every file of
    the run, not its checkpoints in a folder named ``~`` under the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train", *S, "schedule.max_steps=2", "run_dir=~/run")
    assert code == 0 and not (tmp_path / "~").exists(), err[-2000:]
    assert {p.name for p in (tmp_path / "home" / "run").iterdir()} >= {"checkpoints", "run.json"}


# ------------------------------------------------------------------------- 5: teachers by content


@pytest.mark.slow
def test_a_teacher_under_another_path_resumes_and_other_weights_are_refused(
    trained, tmp_path, capsys, monkeypatch
):
    teacher = tmp_path / "teacher"
    assert cli.main(["export", str(trained), str(teacher)]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    args = ["train", *[a for a in S if a != "transfer.mode=none"], "transfer.mode=distill", "run_dir=d"]
    code, _, err = run_cli(capsys, *args, "teacher.spec=local-dir:teacher", "schedule.max_steps=1")
    assert code == 0, err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # its relative teacher is found from where the run started
    code, _, err = run_cli(capsys, "eval", "-c", str(tmp_path / "d" / "config.yaml"))
    assert code == 0, err
    assert (
        json.loads((tmp_path / "d" / "eval-00000001.json").read_text())["metrics"]["val_feat_cos_patch"] > 0
    )
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "moved" / "teacher"
    shutil.move(teacher, moved)
    code, out, err = run_cli(capsys, *args, f"teacher.spec=local-dir:{moved}", "schedule.max_steps=2")
    assert code == 0, err
    assert "resumed from checkpoint step 1" in out and (tmp_path / "d/checkpoints/step-00000002").is_dir()
    weights = load_file(str(moved / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    save_file(weights, str(other / "model.safetensors"))
    recorded = json.loads((tmp_path / "d/run.json").read_text())["teacher"]["sha256"]
    code, _, err = run_cli(capsys, *args, f"teacher.spec=local-dir:{other}", "schedule.max_steps=3")
    assert code == 2
    line = _error_line(err)
    assert recorded in line and "another teacher" in line
    assert not (tmp_path / "d/checkpoints/step-00000003").exists()


@pytest.mark.parametrize(
    "command", ["train", *(pytest.param(c, marks=pytest.mark.slow) for c in ("convert", "study"))]
)
def test_a_moved_run_whose_demo_teacher_is_not_found_is_told_to_name_that_teacher_not_to_rerun_the_demo(
    command, trained, tmp_path, capsys, monkeypatch
):
    """A new `attnxfer demo` would write another teacher, which the resume refuses by its weights' hash: a
    conversion whose stage 1 saved and a study are told so as a training run is."""
    assert cli.main(["export", str(trained), str(tmp_path / "runs/demo/mae/export")]) == 0
    monkeypatch.chdir(tmp_path)
    args = [a for a in S if a != "transfer.mode=none"]
    if command == "convert":
        args = [
            *(a for a in S if a.startswith("data.")),
            "convert.stage1_steps=1",
            *tiny_convert_report(1, 2),
        ]
    if command == "study":
        args += ["--vary", "optim.lr=1e-3,2e-3"]
    distill = ["transfer.mode=distill", "teacher.spec=local-dir:runs/demo/mae/export", "run_dir=runs/demo/d"]
    assert run_cli(capsys, command, *args, *distill, "schedule.max_steps=1")[0] == 0
    shutil.move(tmp_path / "runs/demo/d", tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    config = tmp_path / "moved" / ("study.yaml" if command == "study" else "config.yaml")
    code, _, err = run_cli(capsys, command, "-c", str(config), "schedule.max_steps=2")
    line = _error_line(err)
    assert code == 2 and "runs/demo/mae/export does not exist" in line and "run `attnxfer demo`" not in line
    assert "moved resumes a run that learned from that teacher" in line and "teacher.spec=local-dir:/" in line


# ---------------------------------------------------------------------- 7: full and read-only disks


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_eval_refusing_a_changed_key_says_to_score_the_run_as_trained_not_to_start_a_new_run(trained, capsys):
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), "data.kwargs.length=40")
    line = _error_line(err)
    assert code == 2 and "data.kwargs" in line and "eval scores it as it was trained: drop them" in line
    assert "start a new run elsewhere" not in line


def test_a_read_only_run_dir_stops_train_and_eval_in_one_line(trained, tmp_path, capsys):
    with _tmpfs(tmp_path / "mnt", "16m") as mnt:
        run = mnt / "run"
        shutil.copytree(trained, run)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for command, more in (("train", ["schedule.max_steps=4"]), ("eval", [])):
            code, out, err = run_cli(capsys, command, "-c", str(run / "config.yaml"), *more)
            assert code == 2
            line = _error_line(err)
            assert str(run) in line and "Read-only file system" in line
            assert "last intact checkpoint: step 2" in line
            assert "val_top1" not in out  # eval refused before scoring anything


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_naming_the_last_intact_checkpoint(trained, tmp_path, capsys):
    size = sum(f.stat().st_size for f in (trained / "checkpoints" / "step-00000002").iterdir())
    with _tmpfs(tmp_path / "mnt", f"{int(size * 2.5) // 1024}k") as mnt:
        run = mnt / "run"
        argv = ["train", *S, "schedule.max_steps=12", "checkpoint.every_steps=1", "checkpoint.keep_last=20"]
        code, _, err = run_cli(capsys, *argv, f"run_dir={run}")
        assert code == 2
        line = _error_line(err)
        assert "No space left on device" in line
        latest = CheckpointManager(run).latest(verify_hash=True)
        assert latest is not None and f"last intact checkpoint: step {latest.step}" in line
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no half saves
        assert not (run / LOCK_NAME).exists()
        # fill what is left: eval refuses before it scores anything
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        code, out, err = run_cli(capsys, "eval", "-c", str(run / "config.yaml"))
        assert code == 2 and "No space left on device" in _error_line(err) and "val_top1" not in out


# --------------------------------------------------------------------------- 11: killed exports


def test_an_export_removes_the_staging_folders_killed_exports_left(trained, tmp_path, capsys):
    out = tmp_path / "export"
    dead = tmp_path / f".export.export-0badf00d.{_dead_pid()}@{socket.gethostname()}"
    legacy = tmp_path / ".export.ab12cd_9"  # tempfile.mkdtemp's name, before staging folders were marked
    inside = out / dead.name  # an export into an existing folder stages inside it
    for folder in (dead, legacy, inside):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    keep = tmp_path / ".export.notes"  # not an export's staging folder
    keep.mkdir()
    code, _, err = run_cli(capsys, "export", str(trained), str(out))
    assert code == 0, err
    assert not dead.exists() and not legacy.exists() and not inside.exists() and keep.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".export.notes"]
    assert (out / "model.safetensors").is_file()


def test_exporting_a_conversion_still_in_stage_1_says_it_is_at_work_not_to_finish_it(tmp_path, capsys):
    """Told "finish the conversion (attnxfer convert -c ...)" while its process was converting, a user would
    start a second one into the same folder; the live holder is named and the export is to wait for it."""
    run = tmp_path / "conv"
    (run / "stage1" / "checkpoints").mkdir(parents=True)
    with _live_process() as pid:
        _write_lock(run, pid=pid, command="convert")
        assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
    assert f"{run} is a conversion still at work (`attnxfer convert` on host" in err, err
    assert f"pid {pid}" in err and "export it once it has ended" in err and "finish the conversion" not in err
    (run / LOCK_NAME).unlink()  # ended (killed): the folder's stage 1 is to be finished, as before
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    assert "finish the conversion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_conversion_in_stage_1_before_its_first_save_is_said_to_be_at_work(tmp_path, capsys):
    """Until stage 1's first save the folder holds config.yaml and the lock alone: eval and export said "not a
    training run's dir", inspect "never got past its start", of a conversion that was converting."""
    run = tmp_path / "conv"
    run.mkdir()
    (run / "config.yaml").write_text(f"run_dir: {run}\n")
    with _live_process() as pid:
        _write_lock(run, pid=pid, command="convert")
        assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{run} has no run.json yet: its command is still at work (`attnxfer convert`" in err, err
        assert f"pid {pid}" in err and "run this again once it has ended" in err
        assert cli.main(["inspect", f"local-dir:{run}", str(run)]) == 2
        assert "its command is still at work (or was killed before its first save)" in capsys.readouterr().err
    (run / LOCK_NAME).unlink()
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    assert "not a training run's dir (or its run never got past the start)" in capsys.readouterr().err


def test_a_second_ctrl_c_while_the_first_is_answered_ends_with_130_not_a_traceback(
    trained, monkeypatch, capsys
):
    """The first Ctrl-C's advice may import a module; a second one lands there, outside main's own handler."""
    import attnxfer.apps.run.evaluation
    from attnxfer.launch import cli

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnxfer.apps.run.evaluation, "evaluate_run", ctrl_c)
    monkeypatch.setattr(cli, "_where_to_resume", ctrl_c)  # the second, during the first's answer
    with pytest.raises(SystemExit) as ended:
        cli.run(["eval", "-c", str(trained / "config.yaml")])
    err = capsys.readouterr().err
    assert ended.value.code == 130 and err.endswith("attnxfer: interrupted\n") and "Traceback" not in err
