"""attnxfer.launch.slurm against a real SLURM cluster on loopback (see conftest.py).

Every job is waited for with a hard timeout (``WAIT_S``): the cluster has no accounting,
so nothing else would notice a job that hangs. The timeouts are generous (they count time
in the queue, and the machine may be busy with other tests): they cost time only when a test
fails. No test depends on how fast a job runs: a job is slowed down (``step_sleep_s``) only
until it is preempted, with a wide margin, and its requeued run goes at full speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from toy_training import ToyConfig, final_weights, read_checkpoint_step, reference_weights, toy_main

from attnxfer.launch.slurm import (
    JobFailedError,
    SlurmOptions,
    requeue_record_path,
    sbatch_script,
    slurm_job_info,
    submit,
    wait,
)
from attnxfer.train.distributed import expand_node_list

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

WAIT_S = 300  # upper bound for any one job here, queueing and requeue included


def _submit(cfg: ToyConfig, opts: SlurmOptions, **kw) -> list[submitit.Job]:
    return submit(toy_main, cfg, opts, **kw)


def _assert_matches_reference(run_dir: str | Path, cfg: ToyConfig, world_size: int) -> None:
    ref = reference_weights(cfg)
    ranks = [final_weights(run_dir, r) for r in range(world_size)]
    for w in ranks[1:]:  # every rank holds the very same weights
        torch.testing.assert_close(w["weight"], ranks[0]["weight"], rtol=0, atol=0)
        torch.testing.assert_close(w["bias"], ranks[0]["bias"], rtol=0, atol=0)
    # ... equal to one process on the whole global batch (gradient all-reduce is a mean)
    torch.testing.assert_close(ranks[0]["weight"], ref["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["bias"], ref["bias"], rtol=1e-5, atol=1e-6)


def _wait_for_checkpoint(job: submitit.Job, run_dir: str, at_least: int, timeout_s: float = WAIT_S) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        step = read_checkpoint_step(run_dir)
        if step >= at_least:
            return step
        info = slurm_job_info(job.job_id)
        assert info is not None and info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (
            f"job ended before its first checkpoint: {info}\n{job.stderr()}"
        )
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint at step >= {at_least} after {timeout_s} s:\n{job.stderr()}")


@pytest.mark.parametrize("nodes, tasks_per_node", [(1, 2), (2, 1)], ids=["1node-2tasks", "2nodes-1task"])
def test_two_rank_job_trains_like_one_process(slurm, tmp_path, nodes, tasks_per_node):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"))
    opts = SlurmOptions(nodes=nodes, tasks_per_node=tasks_per_node, time=10)
    [job] = _submit(cfg, opts)
    [results] = wait(job, timeout=WAIT_S)

    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["steps_run"] == cfg.steps for r in results)
    info = slurm_job_info(job.job_id)
    assert int(info["NumNodes"]) == nodes  # the layout asked for is the one SLURM ran
    # SLURM may place a one-node job on either node (whichever is idle): the ranks share one of the cluster's
    ran_on = expand_node_list(info["NodeList"])
    assert len(ran_on) == nodes and set(ran_on) <= set(slurm.node_names), info["NodeList"]
    _assert_matches_reference(cfg.run_dir, cfg, world_size=2)
    # the check is not vacuous: a rank training alone on its half of the batch ends elsewhere
    alone = reference_weights(ToyConfig(run_dir="-", global_batch=cfg.global_batch // 2))
    assert not torch.allclose(alone["weight"], final_weights(cfg.run_dir, 0)["weight"], atol=1e-3)
    # --dry-run prints exactly the script submitit submitted
    assert job.paths.submission_file.read_text() == sbatch_script(opts, Path(cfg.run_dir) / "submitit")


def test_a_job_submitted_from_a_requeued_job_starts_as_a_first_attempt(slurm, tmp_path, monkeypatch):
    """sbatch passes the submitter's environment on, and SLURM sets SLURM_RESTART_COUNT only once it
    requeues a job: a job submitted from inside a requeued one would count that job's restarts as its own
    preemptions and stop at --max-preemptions before its first step."""
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=3)
    [job] = _submit(cfg, SlurmOptions(time=10, max_preemptions=1))
    [[result]] = wait(job, timeout=WAIT_S)
    assert result["restart"] == 0 and result["steps_run"] == 3


@pytest.mark.parametrize("how", ["signal", "scontrol-requeue"])
def test_preempted_job_requeues_and_resumes_from_its_checkpoint(slurm, tmp_path, how):
    # 30 s of steps before the preemption can land (it lands after ~1 s); the requeued run finishes at once
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=200, ckpt_every=5, step_sleep_s=0.15)
    # max_requeues=0: a preemption (a signal minutes before the time limit) is not a time limit
    opts = SlurmOptions(nodes=2, tasks_per_node=1, time=10, max_requeues=0)
    [job] = _submit(cfg, opts)
    before = _wait_for_checkpoint(job, cfg.run_dir, at_least=5)
    assert before < cfg.steps
    if how == "signal":  # what SLURM sends `signal_delay_s` before a time limit; submitit checkpoints
        subprocess.run(["scancel", f"--signal={submitit.JobEnvironment.USR_SIG}", job.job_id], check=True)
    else:  # requeued from outside (an admin, a preempting scheduler): no checkpoint() call at all
        subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    [results] = wait(job, timeout=WAIT_S)

    for r in results:
        assert r["restart"] == 1, r  # the second run finished the job
        assert before <= r["resumed_from"] < cfg.steps, r  # no checkpoint lost, none skipped
        assert r["resumed_from"] + r["steps_run"] == cfg.steps, r
    # the run resumed bit-for-bit where it stopped: same weights as an uninterrupted run
    _assert_matches_reference(cfg.run_dir, cfg, world_size=2)
    record = json.loads(requeue_record_path(Path(cfg.run_dir) / "submitit", job.job_id).read_text())
    assert record["requeues"] == 1
    expected = ["requeued", "restarted"] if how == "signal" else ["restarted"]
    assert [e["event"] for e in record["events"]] == expected
    assert record["timeouts"] == 0 and record["preemptions"] == 1, record
    if how == "signal":
        assert record["events"][0]["cause"] == "preemption"
    assert int(slurm_job_info(job.job_id)["Restarts"]) == 1


def test_time_limit_requeues_are_bounded(slurm, tmp_path):
    """SLURM's own time-limit signal is recognised as a time limit and, with max_requeues=0, refused.

    slurmctld checks time limits every 30 s and sends ``--signal=USR2@D`` at the first check at least
    ``D + 30`` s before the limit (measured on this cluster: time=2, D=40 and D=50 both signalled at the
    check 58 s into the job; time=1, D=30 before the job had started Python). With time=1 and D=5 the
    signal comes at the first check 25 s or more into the job (25-55 s): after submitit's handler is in
    place, before the limit. TrainingTask calls any signal later than limit - D - 90 s a time limit,
    which is every signal of a 1-minute job."""
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=4000, ckpt_every=20, step_sleep_s=0.05)
    [job] = _submit(cfg, SlurmOptions(nodes=1, tasks_per_node=1, time=1, signal_delay_s=5, max_requeues=0))
    with pytest.raises(JobFailedError, match=r"RequeueLimitReached.*max_requeues=0") as err:
        wait(job, timeout=WAIT_S)
    assert err.value.rank == 0
    assert int(slurm_job_info(job.job_id)["Restarts"]) == 0
    record = json.loads((Path(cfg.run_dir) / "submitit" / f"{job.job_id}_requeues.json").read_text())
    assert [(e["event"], e["cause"]) for e in record["events"]] == [("refused", "timeout")]


def test_preemptions_are_bounded_only_when_asked(slurm, tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=400, ckpt_every=2, step_sleep_s=0.1)
    opts = SlurmOptions(nodes=1, tasks_per_node=1, time=10, max_requeues=5, max_preemptions=0)
    [job] = _submit(cfg, opts)
    _wait_for_checkpoint(job, cfg.run_dir, at_least=2)
    subprocess.run(["scancel", f"--signal={submitit.JobEnvironment.USR_SIG}", job.job_id], check=True)
    with pytest.raises(JobFailedError, match=r"RequeueLimitReached.*max_preemptions=0"):
        wait(job, timeout=WAIT_S)
    assert int(slurm_job_info(job.job_id)["Restarts"]) == 0


def test_sweep_runs_as_a_job_array_with_one_run_dir_per_point(slurm, tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path / "sweep"), steps=6)
    opts = SlurmOptions(nodes=1, tasks_per_node=1, time=10)
    jobs = _submit(cfg, opts, sweep={"lr": ["0.05", "0.2"]})
    assert len(jobs) == 2
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_0", f"{array_id}_1"]
    assert "#SBATCH --array=0-1%2" in jobs[0].paths.submission_file.read_text()
    wait(jobs, timeout=WAIT_S)

    # sweep.json: the sweep's record, written as it was submitted
    run_dirs = sorted(p for p in Path(cfg.run_dir).iterdir() if p.name not in ("submitit", "sweep.json"))
    assert [p.name for p in run_dirs] == ["000_lr=0.05", "001_lr=0.2"]
    for run_dir, lr in zip(run_dirs, (0.05, 0.2)):
        point = ToyConfig(run_dir=str(run_dir), steps=6, lr=lr)
        _assert_matches_reference(run_dir, point, world_size=1)  # each point trained with its own lr


def test_failing_rank_makes_wait_raise_its_error_and_log(slurm, tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=500, step_sleep_s=0.1, fail_rank=1, fail_at_step=3)
    [job] = _submit(cfg, SlurmOptions(nodes=2, tasks_per_node=1, time=10))
    with pytest.raises(JobFailedError) as err:
        wait(job, timeout=WAIT_S)
    message = str(err.value)
    assert err.value.rank == 1 and err.value.job_id == job.job_id
    assert "RuntimeError: toy failure on rank 1 at step 3" in message
    assert f"last 40 lines of {job.task(1).paths.stderr}" in message
    # rank 0 is not left blocked in its all-reduce until the time limit
    deadline = time.monotonic() + WAIT_S
    while slurm_job_info(job.job_id)["JobState"] in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm_job_info(job.job_id)["JobState"] == "FAILED"  # not cancelled over its failure


def test_job_that_dies_without_a_result_is_noticed(slurm, tmp_path):
    cfg = ToyConfig(run_dir=str(tmp_path / "run"), steps=50, fail_rank=0, fail_at_step=1, fail_mode="exit")
    [job] = _submit(cfg, SlurmOptions(nodes=1, tasks_per_node=1, time=10))
    with pytest.raises(JobFailedError, match=r"ended \(FAILED\) without a result") as err:
        wait(job, timeout=WAIT_S, grace_s=2)
    assert "exit code 3" in str(err.value)  # srun's report of the dead task, from the log tail


def test_plain_srun_step_forms_a_process_group(slurm, tmp_path):
    """A hand-written sbatch script (no submitit): `srun python ...` ranks still find each other."""
    root = Path(__file__).resolve().parents[3]
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --time=5 --output={tmp_path}/job.out
export PYTHONPATH={root}
srun --kill-on-bad-exit=1 {sys.executable} {root}/tests/cluster/slurm/toy_training.py {tmp_path}
""")
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True
    ).stdout.strip()
    deadline = time.monotonic() + WAIT_S
    while slurm_job_info(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job_id} still running after {WAIT_S} s"
        time.sleep(0.5)
    assert slurm_job_info(job_id)["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["master_addr"]) for r in records] == [
        (0, 2, "node1"),
        (1, 2, "node1"),
    ]
    assert all(r["sum"] == 3.0 for r in records)


@pytest.mark.parametrize(
    "node_list",
    ["node[1-2]", "gpu[1-3,5],cpu7", "n[08-10],n[099-101]", "n[8-10]", "r[1-2]n[1-2]", "login", "a,b[0-1]"],
)
def test_node_lists_expand_as_scontrol_expands_them(slurm_cluster, node_list):
    """Our reading of SLURM's hostlist syntax (no submitit private) against SLURM's own."""
    out = subprocess.run(
        ["scontrol", "show", "hostnames", node_list], capture_output=True, text=True, check=True, timeout=30
    )
    assert expand_node_list(node_list) == out.stdout.split()
