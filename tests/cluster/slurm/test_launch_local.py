"""attnxfer.launch without a SLURM cluster: options, CLI, dry runs, and real local process groups."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import torchrun_launch
from toy_training import ToyConfig, final_weights, reference_weights, toy_main

from attnxfer.launch.slurm import (
    JobFailedError,
    SlurmOptions,
    add_slurm_arguments,
    build_executor,
    options_from_args,
    parse_key_values,
    parse_sweep,
    parse_time_minutes,
    render_dry_run,
    sbatch_error,
    submit,
    sweep_points,
    wait,
)
from attnxfer.train.distributed import DistributedInfo, cleanup_distributed, init_distributed

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---- process groups for real -----------------------------------------------------------------
@pytest.mark.slow
def test_init_distributed_under_torchrun_joins_ranks_that_talk(tmp_path):
    launch, env = torchrun_launch(ranks=2)  # no TORCHRUN_ENV to drop: torchrun sets its workers' own
    cmd = [*launch, str(ROOT / "tests/cluster/slurm/toy_training.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert [r["local_rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["local_world_size"] == 2 for r in records)
    assert all(r["sum"] == 3.0 for r in records)  # 1 + 2: each rank saw the other's value
    assert all(r["backend"] == "gloo" for r in records)


def test_single_process_needs_no_process_group(monkeypatch):
    for k in TORCHRUN_ENV + ("SUBMITIT_EXECUTOR",):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert info == DistributedInfo() and not info.is_distributed and info.is_main_process
    assert not torch.distributed.is_initialized()
    cleanup_distributed()  # safe without a group


def test_distributed_info_rejects_inconsistent_environment(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=2 is outside"):
        DistributedInfo.from_environment()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="must be integers"):
        DistributedInfo.from_environment()


@pytest.mark.slow
def test_local_cluster_runs_the_same_task_with_two_ranks(tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"))
    opts = SlurmOptions(cluster="local", tasks_per_node=2, time=5)
    jobs = submit(toy_main, cfg, opts)
    [results] = wait(jobs, timeout=120)
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    ref = reference_weights(cfg)
    for rank in range(2):
        torch.testing.assert_close(
            final_weights(cfg.run_dir, rank)["weight"], ref["weight"], rtol=1e-5, atol=1e-6
        )


@pytest.mark.slow
def test_a_local_job_whose_rank_fails_ends_by_itself_without_an_interrupt_traceback(tmp_path, capfd):
    """The failure is one error; the job's controller, which writes to this terminal, is let end on its own
    rather than interrupted (its KeyboardInterrupt traceback would follow the error, as if Ctrl-C was pressed)."""
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), fail_rank=0, fail_at_step=0)
    [job] = submit(toy_main, cfg, SlurmOptions(cluster="local", time=5))
    with pytest.raises(JobFailedError, match="toy failure on rank 0 at step 0"):
        wait(job, timeout=120)
    assert job._process.wait(timeout=60) == 0  # submitit keeps its controller there
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def _waiting_for_a_local_job(
    tmp_path: Path, length: str
) -> tuple[multiprocessing.process.BaseProcess, Path, Path, str]:
    """`submit --cluster local --wait` of a tiny run (``length``: its schedule key) in a forked child, once its
    job has trained two steps: the child, the run's folder, the child's log, and the job's id (the pid of
    its controller)."""
    from helpers import fork_cli, tiny_run

    run_dir, log = tmp_path / "run", tmp_path / "submit.log"
    argv = ["submit", f"run_dir={run_dir}", *tiny_run(512, 8), "transfer.mode=none", "log.every_steps=1"]
    argv += ["model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}", length]
    proc = fork_cli([*argv, "--cluster", "local", "--wait"], log)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or metrics.read_text().count('"train"') < 2:
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(log.read_text()[-3000:])
        time.sleep(0.05)
    [job] = [p.name.split("_")[0] for p in (run_dir / "submitit").glob("*_0_log.err")]
    return proc, run_dir, log, job


@pytest.mark.slow
def test_a_local_job_killed_saves_its_step_and_submit_wait_says_how_to_resume_without_a_traceback(tmp_path):
    """`kill JOB` (SIGTERM, what submit prints to cancel a local job) stops the run as it stops `attnxfer train`:
    the step saved, the loop's one line in the job's log, and ``--wait`` says it stopped (exit 143), not failed."""
    proc, run_dir, log, job = _waiting_for_a_local_job(tmp_path, "schedule.max_steps=400")
    try:
        os.kill(int(job), signal.SIGTERM)  # the job's controller, which hands the signal to its task
        proc.join(120)
    finally:
        if proc.is_alive():
            proc.kill()
            os.kill(int(job), signal.SIGTERM)
    text, job_log = log.read_text(), (run_dir / "submitit" / f"{job}_0_log.err").read_text()
    assert proc.exitcode == 128 + signal.SIGTERM, text[-3000:]
    said = re.search(
        r"attnxfer submit: stopped by SIGTERM at step (\d+) of 400; checkpoint saved \((.+?)\); "
        r"re-run the same command to resume",
        text,
    )
    assert said and "Traceback" not in text and "failed" not in text, text[-3000:]
    step = int(said.group(1))
    assert Path(said.group(2)) == run_dir / "checkpoints" / f"step-{step:08d}"
    assert json.loads((Path(said.group(2)) / "state.json").read_text())["step"] == step
    assert f"stopped by SIGTERM at step {step} of 400" in job_log and "Traceback" not in job_log, job_log


@pytest.mark.slow
def test_ctrl_c_of_submit_wait_alone_stops_the_wait_not_the_job_and_says_how_to_stop_it(tmp_path):
    """A Ctrl-C that reaches `submit --wait` and not its job (a SLURM job's always; a local one's sent to the
    command alone) stops the wait: one line with the job's id and how to stop it, exit 130; not 'continues
    from step N' about a run that trains on."""
    proc, run_dir, log, job = _waiting_for_a_local_job(tmp_path, "schedule.epochs=100")
    metrics = run_dir / "metrics.jsonl"
    try:
        os.kill(proc.pid, signal.SIGINT)
        proc.join(60)
        assert proc.exitcode == 130, log.read_text()[-3000:]
        assert log.read_text().splitlines()[-1] == (
            f"attnxfer submit: stopped waiting; job {job} keeps running (follow: its log; stop it: kill {job}, "
            "and the same command resumes it)"
        )
        steps = metrics.read_text().count('"train"')
        deadline = time.monotonic() + 60
        while metrics.read_text().count('"train"') == steps:  # it trains on
            assert time.monotonic() < deadline, "the job stopped with the wait"
            time.sleep(0.05)
    finally:
        if proc.is_alive():
            proc.kill()
        with contextlib.suppress(ProcessLookupError):  # the job's controller: its step saved, the job ends
            os.kill(int(job), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                os.kill(int(job), 0)
                time.sleep(0.1)


def test_debug_cluster_runs_in_this_process(tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=3)
    [job] = submit(toy_main, cfg, SlurmOptions(cluster="debug"))
    [[result]] = wait(job)
    assert result["world_size"] == 1 and result["steps_run"] == 3


def test_a_job_run_in_the_submitters_process_does_not_count_the_submitters_restarts(
    tmp_path, monkeypatch, capsys
):
    """A command submitted from inside a requeued SLURM job sees that job's SLURM_RESTART_COUNT: under the
    debug (and local) executor it is not this job's, which was never requeued, and must neither pass for
    preemptions past --max-preemptions nor be announced as a restart."""
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=3)
    [job] = submit(toy_main, cfg, SlurmOptions(cluster="debug", max_preemptions=1))
    [[result]] = wait(job)
    assert result["steps_run"] == 3 and "restart 5" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_job_submitted_from_inside_a_requeued_job_does_not_inherit_its_restart_count(tmp_path, monkeypatch):
    """SLURM sets SLURM_RESTART_COUNT only once it requeues a job, and a job inherits its submitter's
    environment: the requeued submitter's count would pass for this job's own restarts."""
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=3)
    [job] = submit(toy_main, cfg, SlurmOptions(cluster="local", time=5))
    [[result]] = wait(job, timeout=120)
    assert result["restart"] == 0 and result["steps_run"] == 3
    assert os.environ["SLURM_RESTART_COUNT"] == "5"  # the submitting process keeps its own


def test_a_sweeps_folder_is_refused_to_other_commands_from_its_submission_before_any_point_runs(tmp_path):
    """Between the submission and a point's first files (the queue's wait), another command's run put into the
    folder would mix with the sweep's points: the sweep's record marks the folder as it is submitted."""
    from attnxfer.checkpoints.run_lock import refuse_other_work
    from attnxfer.errors import PathExistsError

    run = tmp_path / "sweep"
    jobs = submit(toy_main, ToyConfig(run_dir=str(run)), SlurmOptions(cluster="debug"), {"lr": [0.1, 0.2]})
    assert not list(run.glob("0*"))  # the debug executor runs a job only when asked for its result
    with pytest.raises(PathExistsError, match=r"holds a sweep \(sweep.json\), which attnxfer train"):
        refuse_other_work(run, "train")
    refuse_other_work(run, "train --sweep", writes="sweep")  # its own resubmission goes on with it
    assert [r[0]["steps_run"] for r in wait(jobs)] == [12, 12]


def test_submit_to_the_debug_cluster_runs_the_job_without_being_told_to_wait(tmp_path, capsys):
    # submitit's debug executor runs a job only when asked for its result: a submit that returned at once
    # ran nothing, and named log files no job would write
    from helpers import run_cli, tiny_run

    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "submit",
        f"run_dir={run}",
        *tiny_run(16, 8),
        "transfer.mode=none",
        "schedule.max_steps=1",
        "--cluster",
        "debug",
    )
    assert code == 0 and (run / "run.json").is_file(), err
    assert (
        "runs now, in this process (--cluster debug)" in out and "stdout:" not in out and "tail -f" not in out
    )
    # and it ends as `attnxfer train` ends: steps, the best score its metrics recorded, the run's folder
    [val] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert out.splitlines()[-1] == f"done: 1 step, best val top1 {val['best_top1']:.2f} -> {run}", out


@pytest.mark.slow
def test_a_study_waited_for_ends_as_attnxfer_study_ends(tmp_path, capsys, tiny_teacher_dir):
    """A train study's job ends with each student's done line and the study's folder, read from the job's
    result (the convert study's lines: the loopback cluster's convert study test)."""
    from helpers import run_cli, tiny_run

    run = tmp_path / "study"
    code, out, err = run_cli(
        capsys,
        "submit",
        "--command",
        "study",
        f"run_dir={run}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        *tiny_run(16, 8),
        "schedule.max_steps=1",
        "--vary",
        "transfer.mode=copy,distill",
        "--cluster",
        "debug",
    )
    assert code == 0, err
    lines = out.splitlines()[-3:]
    for line, name in zip(lines, ("copy", "distill")):
        [val] = [
            json.loads(v) for v in (run / name / "metrics.jsonl").read_text().splitlines() if '"val"' in v
        ]
        assert line == f"{name}: done: 1 step, best val top1 {val['best_top1']:.2f} -> {run / name}", out
    assert lines[-1] == f"study -> {run} (study.json, study.md)", out


def test_a_cancelled_job_submitted_with_resume_none_is_told_to_resume_with_auto(
    tmp_path, capsys, monkeypatch
):
    """The same command would start over: the line for a cancelled job names the checkpoint.resume that resumes
    it, as a stopped `train` does (the loopback cluster's scancel test covers the line itself)."""
    from helpers import run_cli, tiny_run

    import attnxfer.launch.slurm as slurm
    from attnxfer.launch.slurm.monitor import JobCancelledError

    def cancelled(*args, **kwargs):
        raise JobCancelledError("...", "12", reason="re-run the same command to resume")

    monkeypatch.setattr(slurm, "submit_from_args", cancelled)
    code, _, err = run_cli(
        capsys,
        "submit",
        f"run_dir={tmp_path}",
        *tiny_run(16, 8),
        "transfer.mode=none",
        "checkpoint.resume=none",
    )
    assert code == 1 and err.strip() == (
        "attnxfer submit: error: job 12 was cancelled (scancel): re-run the same command to resume with "
        "checkpoint.resume=auto (checkpoint.resume=none would start over again)"
    ), err


def test_a_search_batch_past_a_bound_is_told_what_the_search_command_takes():
    """A search's array task keeps no checkpoint and the search has no --max-requeues: its refusals say to
    run the search again (it resumes from its last generation), with a longer --time past a time limit."""
    from attnxfer.launch.search_array import BatchTask
    from attnxfer.launch.slurm.task import RequeueLimitReached

    with pytest.raises(RequeueLimitReached) as timed_out:
        BatchTask(print, None, max_requeues=0).checkpoint()  # no time limit known: a signal is a time limit
    assert "a longer --time for the array's tasks" in str(timed_out.value)
    assert "--max-requeues" not in str(timed_out.value) and "checkpoint" not in str(timed_out.value)
    with pytest.raises(RequeueLimitReached) as preempted:  # signalled at once, far from its hour's end
        BatchTask(print, None, max_requeues=0, max_preemptions=0, time_limit_min=60).checkpoint()
    assert "max_preemptions=0 reached" in str(preempted.value)
    assert "run the same search command to go on from it" in str(preempted.value)


def test_a_restart_past_the_preemption_bound_says_so_not_that_the_run_resumes(capsys):
    """--max-preemptions 0, the job requeued once by the scheduler: its log said "main resumes from its run
    directory", then the refusal."""
    from attnxfer.launch.slurm.task import RequeueLimitReached, TrainingTask

    task = TrainingTask(print, None, max_preemptions=0)
    task.preemptions = 1  # the pickled task of a job requeued once
    with pytest.raises(RequeueLimitReached) as past:
        task()
    err = capsys.readouterr().err
    assert "1 preemption(s) of at most 0): past its bound" in err and "resumes" not in err, err
    assert str(past.value).startswith("job preempted 1 time, more than max_preemptions=0; the run dir keeps")
    unbounded = TrainingTask(lambda cfg: None, None)  # unbounded preemptions are said as such
    unbounded.preemptions = 1
    with contextlib.suppress(Exception):  # the run itself needs a config; the line comes first
        unbounded()
    assert "1 preemption(s) of no bound): the run resumes from its run directory" in capsys.readouterr().err


def test_a_job_past_its_requeue_bound_submitted_with_resume_none_is_told_to_resubmit_with_auto(
    tmp_path, capsys, monkeypatch
):
    """The job's own words say resubmit to continue, which with checkpoint.resume=none would start over."""
    from helpers import run_cli, tiny_run

    import attnxfer.launch.slurm as slurm
    from attnxfer.launch.slurm.task import RequeueLimitReached, TrainingTask

    with pytest.raises(RequeueLimitReached) as refused:  # the time-limit bound, as the job raises it
        TrainingTask(print, None, max_requeues=0).checkpoint()
    reason = f"attnxfer.launch.slurm.task.RequeueLimitReached: {refused.value}"

    def failed(*args, **kwargs):
        raise JobFailedError("...", "12", 0, reason=reason)

    monkeypatch.setattr(slurm, "submit_from_args", failed)
    code, _, err = run_cli(
        capsys,
        "submit",
        f"run_dir={tmp_path}",
        *tiny_run(16, 8),
        "transfer.mode=none",
        "checkpoint.resume=none",
    )
    assert code == 1 and (
        "resubmit to continue with checkpoint.resume=auto (checkpoint.resume=none would start over again), with a "
        "longer --time" in err
    ), err


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="rank 0 runs SLURM's scontrol requeue")
def _as_rank_0_of_slurm_job_12(monkeypatch, job_folder) -> None:
    """This process as rank 0 of a first attempt of SLURM job 12 that submitit ran, its folder ``job_folder``."""
    for var, value in dict(
        SUBMITIT_EXECUTOR="slurm", SUBMITIT_FOLDER=str(job_folder), SLURM_JOB_ID="12", SLURM_PROCID="0"
    ).items():
        monkeypatch.setenv(var, value)
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)


def test_the_task_pickled_for_a_requeue_after_sigterm_replaces_the_old_one_whole(tmp_path, monkeypatch):
    """SLURM's SIGKILL follows a SIGTERM KillWait later, and a cluster that requeues preempted jobs restarts the
    job whatever rank 0 managed to write: the requeued task goes beside the old pickle and is renamed over it,
    so a kill mid-write leaves the previous attempt's task, never a truncated one no attempt can load."""
    import submitit
    from submitit.core.utils import DelayedSubmission

    from attnxfer.launch.slurm.task import TrainingTask
    from attnxfer.train.stop import StopRequested

    _as_rank_0_of_slurm_job_12(monkeypatch, tmp_path)
    conf = tmp_path.parent / f"{tmp_path.name}-empty-slurm.conf"  # scontrol refuses at once: no cluster
    conf.write_text("")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    task = TrainingTask(print, None)
    pickled = submitit.JobEnvironment().paths.submitted_pickle
    DelayedSubmission(task).dump(pickled)
    os.link(pickled, tmp_path / "first-attempt.pkl")  # the bytes the file held, as its inode keeps them
    before = (tmp_path / "first-attempt.pkl").read_bytes()
    with pytest.raises(SystemExit):
        task._requeue_after_stop(StopRequested(signal.SIGTERM, 3, None), rank=0)
    assert (tmp_path / "first-attempt.pkl").read_bytes() == before  # never truncated and rewritten in place
    assert DelayedSubmission.load(pickled).function.requeues == 1  # the requeued task, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "12_requeues.json",
        "12_submitted.pkl",
        "first-attempt.pkl",
    ]


@pytest.mark.parametrize(
    "scontrol, said",
    [
        (None, r"scontrol could not run: No such file or directory"),
        ("exec {sleep} 30", r"scontrol requeue 12 did not answer within 0.3 s"),
        (
            "echo 'scontrol: error: Access/permission denied' >&2; exit 1",
            r"scontrol: error: Access/permission denied",
        ),
    ],
    ids=["scontrol-missing", "scontrol-hangs", "scontrol-refuses"],
)
def test_a_requeue_after_sigterm_that_scontrol_cannot_do_says_so_and_still_meets_the_other_ranks(
    tmp_path, monkeypatch, capsys, scontrol, said
):
    """Rank 0 asks scontrol to requeue the job after SIGTERM: a missing or hung scontrol must not end rank 0
    with a traceback before the barrier the other ranks wait at, and the job's log must say that it was not
    requeued and how to go on."""
    from attnxfer.launch.slurm import task as task_module
    from attnxfer.launch.slurm.task import TrainingTask
    from attnxfer.train.stop import StopRequested

    _as_rank_0_of_slurm_job_12(monkeypatch, tmp_path)
    bin_dir = tmp_path / "bin"  # a real PATH lookup: no scontrol there, or a script that answers as said
    bin_dir.mkdir()
    if scontrol is not None:
        (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{scontrol.format(sleep=shutil.which('sleep'))}\n")
        (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(task_module, "SCONTROL_TIMEOUT_S", 0.3)
    with pytest.raises(SystemExit) as ended:
        TrainingTask(print, None)._requeue_after_stop(StopRequested(signal.SIGTERM, 3, None), rank=0)
    assert ended.value.code == 143  # past the barrier, as every rank leaves
    err = capsys.readouterr().err
    assert re.search(
        rf"stopped by SIGTERM at step 3; checkpoint saved; job 12 was not requeued \({said}\): submit the "
        r"same command to resume from that step \(with checkpoint.resume=auto where",
        err,
    ), err
    # the job's requeue record ends as the job did: not requeued, and why
    events = json.loads((tmp_path / "12_requeues.json").read_text())["events"]
    assert [e["event"] for e in events] == ["requeued", "not requeued"], events
    assert re.search(said, events[-1]["cause"]), events


def test_a_job_preempted_on_a_cluster_that_cancels_preempted_jobs_is_said_as_cancelled_not_waited_for(
    tmp_path, monkeypatch
):
    """PREEMPTED is final where PreemptMode is CANCEL (a requeued job shows PENDING): wait without a timeout
    would wait for ever."""
    import submitit

    from attnxfer.launch.slurm import monitor

    monkeypatch.setattr(monitor, "slurm_job_info", lambda job_id: {"JobState": "PREEMPTED"})
    with pytest.raises(monitor.JobCancelledError) as ended:
        wait(submitit.SlurmJob(folder=tmp_path, job_id="12"), timeout=5, poll_s=0.01, grace_s=0)
    assert ended.value.summary().startswith(
        "job 12 was preempted and not requeued (the cluster ends preempted jobs): re-run the same command"
    ), ended.value.summary()


# ---- options and command line ----------------------------------------------------------------
@pytest.mark.parametrize(
    "value, minutes",
    [
        (90, 90),
        ("90", 90),
        ("1:30", 2),
        ("01:30:00", 90),
        ("2-12", 3600),
        ("1-00:00:01", 1441),
        ("1-02:03", 1563),
    ],
)
def test_time_limits_in_sbatch_formats(value, minutes):
    assert parse_time_minutes(value) == minutes


@pytest.mark.parametrize("value", ["abc", "0", "1:2:3:4", "-5", ""])
def test_bad_time_limits_say_what_is_expected(value):
    with pytest.raises(ValueError, match="time"):
        parse_time_minutes(value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gpus_per_node=4, tasks_per_node=2), "one task per GPU"),
        (dict(cluster="kubernetes"), "cluster must be one of"),
        (dict(cluster="local", nodes=2), "use --nodes 1"),
        (dict(mem="lots"), "mem must look like"),
        (dict(extra={"output": "x.log"}), "--slurm cannot set output: submitit manages it"),
        (dict(nodes=0), "--nodes must be >= 1"),
        (dict(max_requeues=-1), "--max-requeues"),
        (dict(time=2), "--time 2: SLURM sends the requeue signal 120 s before the time limit"),
    ],
)
def test_bad_options_are_rejected_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**kwargs)


def test_sbatch_refusal_without_an_error_line_keeps_its_reason():
    said = "sbatch: unrecognized option '--Partition=x'\nTry \"sbatch --help\" for more information"
    assert sbatch_error(said).startswith("sbatch: unrecognized option '--Partition=x'")


def test_one_task_per_gpu():
    assert SlurmOptions(nodes=2, gpus_per_node=8).num_tasks == 16
    assert SlurmOptions(nodes=2, tasks_per_node=3).num_tasks == 6
    assert SlurmOptions().num_tasks == 1


def test_cli_flags_become_options():
    parser = add_slurm_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(
        [
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--cpus-per-task",
            "10",
            "--mem",
            "0",
            "--time",
            "1-00:00:00",
            "--partition",
            "gpu",
            "--account",
            "lab",
            "--qos",
            "high",
            "--constraint",
            "a100",
            "--exclude",
            "n[1-3]",
            "--slurm",
            "mail-type=END",
            "--slurm",
            "mail_user=me@x",
            "--job-dir",
            "/jobs",
            "--name",
            "vitb",
            "--array-parallelism",
            "4",
            "--max-requeues",
            "5",
            "--sweep",
            "optim.lr=1e-3,1e-4",
            "--dry-run",
        ]
    )
    opts = options_from_args(ns)
    assert opts == SlurmOptions(
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=10,
        mem="0",
        time="1-00:00:00",
        partition="gpu",
        account="lab",
        qos="high",
        constraint="a100",
        exclude="n[1-3]",
        extra={"mail-type": "END", "mail-user": "me@x"},
        job_dir="/jobs",
        name="vitb",
        array_parallelism=4,
        max_requeues=5,
    )
    assert opts.timeout_min == 1440
    assert parse_sweep(ns.sweep) == {"optim.lr": ["1e-3", "1e-4"]} and ns.dry_run


@pytest.mark.parametrize("items, message", [(["novalue"], "KEY=VALUE"), (["a=1", "a=2"], "twice")])
def test_a_slurm_key_without_a_value_or_given_twice_is_refused(items, message):
    with pytest.raises(ValueError, match=message):
        parse_key_values(items)


def test_an_empty_value_in_a_sweep_is_refused():
    with pytest.raises(ValueError, match="comma-separated"):
        parse_sweep(["lr=0.1,,0.2"])


def test_sweeps_over_list_values_and_safe_slurm_keys():
    assert parse_sweep(["transfer.layers=[0,1],[2,3]", "optim.lr=1e-3,1e-4"]) == {
        "transfer.layers": ["[0,1]", "[2,3]"],
        "optim.lr": ["1e-3", "1e-4"],
    }
    with pytest.raises(ValueError, match="control characters"):
        SlurmOptions(extra={"comment": "a\n#SBATCH --x"})
    assert SlurmOptions(extra={"mail_type": "END"}).extra == {"mail-type": "END"}


def test_a_swept_run_dir_or_a_value_twice_is_refused_not_relocated_or_run_twice(tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path))  # a swept run_dir would be replaced by each point's own folder
    with pytest.raises(ValueError, match=r"--sweep run_dir: each job of a sweep runs in its own folder"):
        sweep_points(cfg, {"run_dir": [str(tmp_path / "a"), str(tmp_path / "b")]})
    with pytest.raises(ValueError, match=r"--sweep lr lists '0.1' twice: each value makes one job"):
        sweep_points(cfg, {"lr": ["0.1", "0.2", "0.1"]})


def test_sweep_points_are_the_cartesian_product_with_own_run_dirs(tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path))
    points = sweep_points(cfg, {"lr": ["0.1", "0.2"], "seed": [0, 1]})
    assert [(p.cfg.lr, p.cfg.seed) for p in points] == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    assert [Path(p.run_dir).name for p in points] == [
        "000_lr=0.1_seed=0",
        "001_lr=0.1_seed=1",
        "002_lr=0.2_seed=0",
        "003_lr=0.2_seed=1",
    ]
    assert all(Path(p.run_dir).parent == tmp_path for p in points)
    assert sweep_points(cfg, None)[0].cfg is cfg
    with pytest.raises(TypeError, match="with_overrides"):
        sweep_points({"run_dir": "x"}, None)


def test_sweep_point_folders_name_list_empty_and_negative_values_readably(tmp_path):
    """A value's brackets and spaces are dropped as a study's student names drop them, not left as `-` runs
    beside `=` and `_`; the index keeps two values that read alike apart."""
    points = sweep_points(ToyConfig(run_dir=str(tmp_path)), {"seed": [[0, 1], {}], "fail_rank": ["-1", "1"]})
    assert [Path(p.run_dir).name for p in points] == [
        "000_seed=0,1_fail_rank=-1",
        "001_seed=0,1_fail_rank=1",
        "002_seed=_fail_rank=-1",
        "003_seed=_fail_rank=1",
    ]


def test_dry_run_prints_the_sbatch_script_and_configs_without_submitting(tmp_path, capsys):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"))
    opts = SlurmOptions(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        mem="64G",
        time="01:30:00",
        partition="gpu",
        account="lab",
        qos="high",
        constraint="a100",
        exclude="n7",
        extra={"mail-type": "END"},
        name="vitb-copy",
        max_requeues=2,
    )
    capsys.readouterr()
    assert submit(toy_main, cfg, opts, sweep={"lr": ["0.1", "0.2"]}, dry_run=True) == []
    text = capsys.readouterr().out
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --time=90",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclude=n7",
        "#SBATCH --mail-type=END",
        "#SBATCH --job-name=vitb-copy",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --array=0-1%2",
        "--kill-on-bad-exit=1",
        "-m submitit.core._submit",
    ]:
        assert line in text, line
    assert text.count("ToyConfig(") == 2 and "lr=0.2" in text  # both resolved configs
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_dry_run_for_the_local_executor_has_no_sbatch_script(tmp_path):
    text = render_dry_run(ToyConfig(run_dir=str(tmp_path)), SlurmOptions(cluster="local", tasks_per_node=2))
    assert "#SBATCH" not in text and "local executor" in text and "ToyConfig(" in text


def test_slurm_executor_without_srun_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH lookup that finds no srun
    with pytest.raises(RuntimeError, match="--cluster local"):
        build_executor(SlurmOptions(), tmp_path)
