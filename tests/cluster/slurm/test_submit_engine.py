"""`attnxfer submit` with the real training engine on the loopback SLURM cluster (see conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import QUIET, attnxfer_process, tiny_convert_report
from safetensors.torch import load_file

from attnxfer.apps.convert.report import conversion_summary
from attnxfer.checkpoints.resume_point import ResumePoint
from attnxfer.checkpoints.verify import verify_checkpoint
from attnxfer.launch import cli
from attnxfer.launch.slurm import slurm_job_info

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
# generous bounds on every wait (they count time in the queue on a machine busy with other tests): they cost
# time only when a test fails
WAIT_S = 300
TINY = [
    "transfer.mode=none",
    "model.kwargs={depth: 2, embed_dim: 48}",
    "model.drop_path_rate=0.0",
    *QUIET,
    "log.every_steps=1",
    "checkpoint.every_epoch=false",
    "deterministic=true",
]


def _in_process(*args: str) -> int:
    """A local reference run through the CLI's own entry point, in this process: no interpreter start-up,
    and one torch thread, as each rank of the jobs has (--cpus-per-task 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(list(args))
    finally:
        torch.set_num_threads(threads)


def _final(run_dir: Path):
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return (
        ckpt.name,
        load_file(str(ckpt / "model.safetensors")),
        json.loads((ckpt / "state.json").read_text()),
    )


def _job_id(sub: subprocess.CompletedProcess) -> str:
    """The id of the job ``attnxfer submit`` (without --wait) says it submitted."""
    assert sub.returncode == 0, sub.stderr[-2000:]
    return next(line.split()[1].rstrip(":") for line in sub.stdout.splitlines() if line.startswith("job "))


def _wait_until(ready, what: str) -> None:
    """Poll ``ready()`` until it holds (bounded by WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _ended(job_id: str) -> dict:
    """The job's record once it has ended (requeues included)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        info = slurm_job_info(job_id)
        if info and info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return info
        assert time.monotonic() < deadline, f"job still {info and info['JobState']}"
        time.sleep(0.5)


COMMON = [*TINY, "schedule.max_steps=4", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """What both layouts must reproduce: one process on the whole global batch of 32."""
    run = tmp_path_factory.mktemp("one-process") / "one"
    assert _in_process("train", f"run_dir={run}", *COMMON, "data.batch_size=32") == 0
    return run


@pytest.mark.parametrize("nodes,tasks", [(1, 2), (2, 1)])
def test_submit_trains_on_two_ranks_like_one_process(slurm, tmp_path, one_process_run, nodes, tasks):
    job = attnxfer_process(
        "submit",
        f"run_dir={tmp_path / 'job'}",
        *COMMON,
        "data.batch_size=16",
        "--nodes",
        str(nodes),
        "--tasks-per-node",
        str(tasks),
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--wait",
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    assert "scancel" in job.stdout and "tail -f" in job.stdout  # how to follow and cancel
    end = job.stdout.splitlines()[
        -1
    ]  # the job waited for ends as `attnxfer train` would, from rank 0's result
    assert end.startswith("done: 4 steps, best val top1 ") and end.endswith(f" -> {tmp_path / 'job'}"), end
    name_j, w_job, state = _final(tmp_path / "job")
    name_1, w_one, _ = _final(one_process_run)
    assert name_j == name_1 == "step-00000004"
    assert state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1  # both ranks identical
    for k in w_one:
        torch.testing.assert_close(w_job[k], w_one[k], rtol=1e-4, atol=1e-5)


def test_requeued_training_job_resumes_and_finishes(slurm, tmp_path):
    run = tmp_path / "job"
    # the requeue lands after step 10: 190 steps (~20 s) of margin; 50 (~5 s) were too few for this test's
    # own polling on a loaded 2-core machine, and the requeue found the job finished
    steps = 200
    sub = attnxfer_process(
        "submit",
        f"run_dir={run}",
        *TINY,
        f"schedule.max_steps={steps}",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=50",
        "checkpoint.resume=none",  # the first attempt's: the restart goes on from the job's own saves
        "data.batch_size=16",
        "--tasks-per-node",
        "1",
        "--time",
        "5",
    )
    job_id = _job_id(sub)
    _wait_until((run / "checkpoints" / "step-00000010").exists, "no checkpoint appeared")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = _ended(job_id)
    assert info["JobState"] == "COMPLETED", info
    assert int(info.get("Restarts", 0)) >= 1
    name, _, state = _final(run)
    assert name == f"step-{steps:08d}" and state["step"] == steps
    saved = {p.name for p in (run / "checkpoints").glob("step-*")}
    assert {"step-00000005", "step-00000010"} <= saved  # nothing written before the requeue was lost
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.*"))
    assert "restarted after saving" in logs and "resumed from checkpoint step" in logs
    # the step SLURM's SIGTERM stopped at is saved, and the log says the job is requeued (by scontrol)
    assert re.search(rf"stopped by SIGTERM at step \d+ of {steps}; .*job {job_id} requeued: it resumes", logs)


def test_submitted_conversion_on_two_ranks_matches_one_process(slurm, tmp_path, tiny_teacher_dir):
    """`submit --command convert`: data-parallel stage 1 (averaged gradients), DDP stage 2, rank 0 writes."""
    teacher = tiny_teacher_dir

    def args(run, batch):
        return [
            f"run_dir={run}",
            f"teacher.spec=local-dir:{teacher}",
            "data.dataset=synthetic",
            "data.kwargs.length=64",
            f"data.batch_size={batch}",
            f"convert.stage1_batch_size={batch}",
            "convert.attention=hedgehog",
            "convert.stage1_steps=4",
            "schedule.epochs=1",
            "schedule.max_steps=2",
            "transfer.mode=none",
            "transfer.logit_distill=1.0",
            *QUIET,
            "log.every_steps=1",
            *tiny_convert_report(2, 4),
            "deterministic=true",
        ]

    job = attnxfer_process(
        "submit",
        "--command",
        "convert",
        *args(tmp_path / "job", 8),
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--wait",
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    assert _in_process("convert", *args(tmp_path / "one", 16)) == 0
    r_job = json.loads((tmp_path / "job" / "report.json").read_text())
    r_one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert job.stdout.splitlines()[-1] == conversion_summary(r_job)  # as `attnxfer convert` ends
    # 2 ranks x 8 images per step == 1 process x 16: the same stage-1 losses, accuracies and agreement
    for a, b in zip(r_job["stage1"]["history"], r_one["stage1"]["history"], strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert r_job["top1"] == pytest.approx(r_one["top1"], abs=1e-6)  # val set split over ranks, counts summed
    for a, b in zip(r_job["agreement"]["end_to_end"], r_one["agreement"]["end_to_end"], strict=True):
        assert a["after_stage1"] == pytest.approx(b["after_stage1"], rel=1e-3)
    # weights: equal up to summation order, which AdamW's normalised steps (lr 1e-2 here, up to 4e-2 of
    # movement per weight) amplify for the few weights whose gradients are nearly zero
    w_job, w_one = (ResumePoint.find(tmp_path / r / "stage1").load_tensors()["model"] for r in ("job", "one"))
    for k in w_one:
        torch.testing.assert_close(w_job[k], w_one[k], rtol=1e-3, atol=3e-4)
    name_j, w_job2, state = _final(tmp_path / "job" / "stage2")
    name_1, w_one2, _ = _final(tmp_path / "one" / "stage2")
    assert name_j == name_1 and state["world_size"] == 2 and len(set(state["rank_checksums"])) == 1
    for k in w_one2:
        torch.testing.assert_close(w_job2[k], w_one2[k], rtol=1e-3, atol=3e-4)
    logs = {p.name: p.read_text() for p in (tmp_path / "job" / "submitit").glob("*_log.out")}
    rank0 = next(text for name, text in logs.items() if name.endswith("_0_log.out"))
    rank1 = next(text for name, text in logs.items() if name.endswith("_1_log.out"))
    assert "stage 1 step 4/4" in rank0 and "stage 1 step" not in rank1  # one rank logs


def test_submit_wait_reports_a_failed_rank_in_one_line_and_the_job_stays_failed(slurm, tmp_path):
    """A failed rank: no 94-line traceback, and sacct/scontrol say FAILED, not CANCELLED."""
    run = tmp_path / "job"
    missing = tmp_path / "no-such-dataset"
    res = attnxfer_process(
        "submit",
        f"run_dir={run}",
        *TINY,
        "data.dataset=folder",
        f"data.root={missing}",
        "model.num_classes=10",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--wait",
    )
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()  # the folder missing here said at submit, then the job's error
    assert len(lines) == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith(f"warning: data.root={missing} does not exist on this machine"), lines[0]
    line = lines[1]
    assert line.startswith("attnxfer submit: error: job ") and " failed on rank " in line, line
    assert (
        str(missing) in line
    )  # the rank's own message, as the CLI says it (no attnxfer.x.y.Error: before it)
    assert not re.search(r"attnxfer(\.\w+)+: ", line), line
    log = Path(line.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.is_file() and str(missing) in log.read_text()
    job_id = line.split("job ", 1)[1].split()[0]
    deadline = time.monotonic() + WAIT_S
    while (state := (slurm_job_info(job_id) or {}).get("JobState")) in ("RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert state == "FAILED", state


@pytest.mark.parametrize("sent", ["TERM", "USR2"])
def test_a_stop_signal_saves_the_step_and_requeues_the_job(slurm, tmp_path, sent):
    """scancel --signal=TERM (what preemption without USR2 sends), or USR2 (what SLURM sends before the time
    limit, and on preemption where set up so; submitit's requeue saved nothing, the steps since the last
    periodic checkpoint were redone): both ranks stop at the same step, rank 0 saves it and requeues the job,
    the requeued job resumes from that very step and finishes."""
    run = tmp_path / "job"
    steps = 120
    sub = attnxfer_process(
        "submit",
        f"run_dir={run}",
        *TINY,
        f"schedule.max_steps={steps}",
        "checkpoint.every_steps=1000",  # no periodic save: the only mid-run checkpoint is the stop's
        "data.batch_size=16",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "10",
        "--max-requeues",
        "0",  # a preemption is not a time limit
    )
    job_id = _job_id(sub)
    metrics = run / "metrics.jsonl"
    _wait_until(
        lambda: metrics.exists() and metrics.read_text().count('"train"') >= 3, "training did not start"
    )
    subprocess.run(["scancel", f"--signal={sent}", job_id], check=True)
    info = _ended(job_id)
    logs = "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))
    assert info["JobState"] == "COMPLETED", (info, logs[-3000:])
    assert int(info.get("Restarts", 0)) == 1
    m = re.search(rf"stopped by SIG{sent} at step (\d+) of \d+; checkpoint saved", logs)
    assert m, logs[-3000:]
    stopped = int(m.group(1))
    assert 3 <= stopped < steps
    assert f"job {job_id} requeued" in logs
    assert f"resumed from checkpoint step {stopped}" in logs
    saved = {p.name for p in (run / "checkpoints").glob("step-*")}
    assert f"step-{stopped:08d}" in saved and f"step-{steps:08d}" in saved
    name, _, state = _final(run)
    assert name == f"step-{steps:08d}" and state["step"] == steps and state["world_size"] == 2
    record = json.loads((run / "submitit" / f"{job_id}_requeues.json").read_text())
    assert [(e["event"], e.get("cause")) for e in record["events"]] == [
        ("requeued", "preemption"),
        ("restarted", None),
    ]
    assert record["timeouts"] == 0 and record["preemptions"] == 1


def test_a_preemption_signal_while_the_job_loads_its_task_requeues_the_job(slurm, tmp_path):
    """USR2 before submitit's handler is in place (the task's unpickling imports torch and timm, seconds): its
    default action ended the job FAILED, unsaved and not requeued. It is held, and requeues the job once the
    task runs; the requeued job trains to its end."""
    run = tmp_path / "job"
    sub = attnxfer_process(
        "submit", f"run_dir={run}", *TINY, "schedule.max_steps=4", "--cpus-per-task", "1", "--time", "10"
    )
    job_id = _job_id(sub)
    out = run / "submitit" / f"{job_id}_0_log.out"
    _wait_until(lambda: out.exists() and "Loading pickle" in out.read_text(), "the job did not start")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    info = _ended(job_id)
    logs = "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))
    assert info["JobState"] == "COMPLETED" and int(info.get("Restarts", 0)) == 1, (info, logs[-3000:])
    assert "a preemption signal (USR2) came while the job loaded: requeuing before any work" in logs
    name, _, state = _final(run)
    assert name == "step-00000004" and state["step"] == 4


def test_a_plain_scancel_saves_the_step_and_the_job_stays_cancelled(slurm, tmp_path):
    """`scancel JOB`, as `submit` prints it: the ranks save the step (within KillWait) but do not requeue the
    job (SLURM would requeue even a cancelled one), and `--wait` says so in one line: cancelled (not failed),
    the checkpoint and the command that resume the run, and the log."""
    run = tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = ["submit", f"run_dir={run}", *TINY, "schedule.max_steps=120", "checkpoint.every_steps=1000"]
    flags = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--wait"]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "attnxfer", *argv, *flags],
        env=env,
        cwd=ROOT,
        text=True,
        stderr=subprocess.PIPE,
    )
    try:
        metrics = run / "metrics.jsonl"
        _wait_until(lambda: metrics.exists() and '"train"' in metrics.read_text(), "training did not start")
        [job_id] = [p.name.split("_")[0] for p in (run / "submitit").glob("*_submitted.pkl")]
        subprocess.run(["scancel", job_id], check=True)
        info = _ended(job_id)
        _, err = waiting.communicate(timeout=WAIT_S)
    finally:
        waiting.kill()
    logs = "".join(p.read_text() for p in sorted((run / "submitit").glob("*_0_log.*")))
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, (info, logs[-3000:])
    m = re.search(r"stopped by SIGTERM at step (\d+) of \d+; checkpoint saved", logs)
    assert m and f"job {job_id} was cancelled, not requeued" in logs, logs[-3000:]
    [line] = err.strip().splitlines()
    assert line == (
        f"attnxfer submit: error: job {job_id} was cancelled (scancel): re-run the same command to resume; "
        f"last intact checkpoint: step {m.group(1)} ({run}/checkpoints/step-{int(m.group(1)):08d}) "
        f"(log: {run}/submitit/{job_id}_0_log.err)"
    ), line


def test_ctrl_c_of_submit_wait_stops_the_wait_and_the_job_trains_on(slurm, tmp_path):
    """Ctrl-C of `submit --wait` does not reach a SLURM job: the command says the job keeps running and how to
    follow and stop it (exit 130), not that the run 'continues from step N' as if it had stopped."""
    from helpers import popen_interruptible

    run = tmp_path / "job"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = ["submit", f"run_dir={run}", *TINY, "schedule.max_steps=400", "checkpoint.every_steps=1000"]
    flags = ["--cpus-per-task", "1", "--time", "10", "--wait"]
    waiting = popen_interruptible(
        [sys.executable, "-m", "attnxfer", *argv, *flags],
        env=env,
        cwd=ROOT,
        text=True,
        stderr=subprocess.PIPE,
    )
    job_id = None
    try:
        metrics = run / "metrics.jsonl"
        _wait_until(lambda: metrics.exists() and '"train"' in metrics.read_text(), "training did not start")
        [job_id] = [p.name.split("_")[0] for p in (run / "submitit").glob("*_submitted.pkl")]
        waiting.send_signal(signal.SIGINT)
        _, err = waiting.communicate(timeout=WAIT_S)
        assert waiting.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"attnxfer submit: stopped waiting; job {job_id} keeps running (follow: squeue -j {job_id}; stop "
            f"it: scancel {job_id}, and the same command resumes it)"
        )
        assert slurm_job_info(job_id)["JobState"] == "RUNNING"
    finally:
        waiting.kill()
        if job_id is not None:
            subprocess.run(["scancel", job_id], check=False)
            _ended(job_id)


# ---- a rank that dies or hangs: the job ends in bounded time, with one line naming it -----------------
RANK_FAILURE = [
    *TINY,
    "data.dataset=synthetic",
    "data.batch_size=8",
    "data.kwargs.length=32",
    "schedule.epochs=1000",
    "schedule.max_steps=5000",  # far beyond the end: the job is mid-run whenever the signal lands
    "checkpoint.every_steps=5",
]


def _job_pids(job_id: str, rank: int | None = None) -> list[int]:
    """The job's Python tasks on this machine (all of them, or rank ``rank``'s), found by their environment."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(
                item.split("=", 1)
                for item in environ.read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
            command = (environ.parent / "cmdline").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if env.get("SLURM_JOB_ID") != job_id or b"submitit" not in command:
            continue
        if rank is None or env.get("SLURM_PROCID") == str(rank):
            pids.append(int(environ.parent.name))
    return pids


def _submit_then_signal(
    run: Path, signum: int, *overrides: str
) -> tuple[subprocess.CompletedProcess, str, int]:
    """``attnxfer submit --wait`` of a 2-task training job; once its first checkpoint is saved, ``signum``
    goes to task 1's process. Returns how submit ended, the job id and the pid that got the signal; the
    signalled process is killed and the job cancelled whatever happens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [f"run_dir={run}", *RANK_FAILURE, *overrides]
    slurm = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "5", "--wait"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnxfer", "submit", *args, *slurm],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    job_id, pid = "", 0
    try:
        deadline = time.monotonic() + WAIT_S
        while not list((run / "checkpoints").glob("step-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint was saved"
            time.sleep(0.1)
        job_id = next((run / "submitit").glob("*_0_log.out")).name.split("_")[0]
        [pid] = _job_pids(job_id, rank=1)
        os.kill(pid, signum)
        out, err = proc.communicate(timeout=WAIT_S)  # a hang guard: a job that hangs fails the test here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # ends a stopped process too
        if job_id:
            subprocess.run(["scancel", job_id], check=False, capture_output=True)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), job_id, pid


def _assert_job_ended_on_intact_checkpoint(line: str, job_id: str) -> None:
    """The job is over (FAILED, no task left on the node), and the checkpoint its line names is intact."""
    deadline = time.monotonic() + WAIT_S
    while _job_pids(job_id) or (slurm_job_info(job_id) or {}).get("JobState") in ("RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job_id} still has tasks: {_job_pids(job_id)}"
        time.sleep(0.2)
    assert slurm_job_info(job_id)["JobState"] == "FAILED"
    m = re.search(r"last intact checkpoint: step (\d+) \((\S+)\)", line)
    assert m, line
    info = verify_checkpoint(m.group(2), verify_hash=True)  # every file's sha256 against its manifest
    assert info.step == int(m.group(1)) >= 5


def test_a_killed_rank_ends_the_job_with_one_line_naming_it(slurm, tmp_path):
    """SIGKILL of one task: srun (--kill-on-bad-exit) ends the other at once, and submit --wait says which
    task died, how, and where the run can resume from."""
    res, job_id, _ = _submit_then_signal(tmp_path / "job", signal.SIGKILL)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"attnxfer submit: error: job {job_id} failed: rank 1 died "), line
    node = slurm_job_info(job_id)["NodeList"]  # either loopback node: whichever SLURM placed the job on
    assert f"(srun: error: {node}: task 1: Killed)" in line
    _assert_job_ended_on_intact_checkpoint(line, job_id)


def test_a_stopped_rank_ends_the_job_after_dist_timeout_with_one_line_naming_it(slurm, tmp_path):
    """SIGSTOP of one task: the other's watchdog names it after dist.timeout and ends its own process; srun
    then ends the stopped one, and submit --wait prints the watchdog's line."""
    res, job_id, pid = _submit_then_signal(tmp_path / "job", signal.SIGSTOP, "dist.timeout=10")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    line = lines[0]
    node = slurm_job_info(job_id)["NodeList"]  # either loopback node: whichever SLURM placed the job on
    opening = f"attnxfer submit: error: job {job_id} failed: rank 1 on {node} (pid {pid}) "
    assert line.startswith(opening), line
    assert re.search(r"has not answered for 1\d s \(stopped or hung; dist.timeout=10\): stopping", line), line
    _assert_job_ended_on_intact_checkpoint(line, job_id)
