"""Trackers on a machine without internet or a login, as a cluster's compute node is: how each tracker logs is
decided before the teacher or the data load, in one line, and a tracker that cannot log stops the command with
one ``attnxfer train: error:`` line (exit code 2) before anything is written.

The real packages run here: ``wandb`` with ``HOME`` a temporary folder and no ``WANDB_*`` variable (no key,
no ``wandb login``), MLflow with no ``MLFLOW_TRACKING_URI`` (MLflow 3's own default, ``sqlite:///mlflow.db``,
cannot be opened by the ``mlflow-skinny`` extra), and tracking servers on a real closed port of 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import attnxfer_process, once_each, run_cli, tiny_run

from attnxfer.train.trackers import TrackerUnavailableError, prepare_trackers, server_problem

TINY = [
    *tiny_run(16, 8),
    "model.kwargs={depth: 2, embed_dim: 48}",
    "transfer.mode=none",
    "log.every_steps=1",
    "schedule.max_steps=2",
    "checkpoint.every_epoch=false",
    "device=cpu",
]


def _closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any W&B or MLflow setting, HOME a fresh folder (no ~/.netrc, no
    ~/.config/wandb), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "NETRC"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), OMP_NUM_THREADS="1", **extra)
    return env


def _refusal(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith("attnxfer train: error: "), lines[0]
    return lines[0]


def _refusal_in_process(code: int, out: str, err: str) -> str:
    """`_refusal` of a CLI run in this process (`run_cli`'s exit code, stdout and stderr)."""
    return _refusal(subprocess.CompletedProcess([], code, out, err))


def _set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """This process's environment made ``env`` (`_clean_env`'s) for the test, put back after it."""
    for k in set(os.environ) - set(env):
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# ------------------------------------------------------------------------------------------------ servers


def test_a_closed_port_is_named_as_no_answer_and_an_http_error_is_an_answer(tmp_path):
    port = _closed_port()
    assert "refused" in server_problem(f"http://127.0.0.1:{port}/health").lower()
    # a server that answers 404 (or 401: a login it wants) is up: a real HTTP server in this process
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    try:
        assert server_problem(f"http://user:secret@127.0.0.1:{server.server_port}/health") is None
    finally:
        thread.join(timeout=30)
        server.server_close()


# ------------------------------------------------------------------------------------------------ W&B


def test_wandb_without_a_key_is_decided_offline_in_one_line(tmp_path, monkeypatch, capsys):
    """The decision alone, in this process: no key anywhere -> offline, said in one line naming where the
    files go and the `wandb sync` command."""
    wandb = pytest.importorskip("wandb", reason="the wandb extra: pip install 'attnxfer[wandb]'")
    for k in [k for k in os.environ if k.startswith(("WANDB_", "NETRC"))]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    try:
        capsys.readouterr()
        setup = prepare_trackers(["wandb"], tmp_path / "run")["wandb"]
        said = capsys.readouterr().out.splitlines()
        assert dict(setup.options) == {"mode": "offline"}
        assert said == [setup.notice] and "no API key" in said[0]
        assert f"wandb sync {tmp_path / 'run' / 'wandb'}/offline-run-*" in said[0]
        assert not (tmp_path / "run").exists()  # deciding writes nothing

        monkeypatch.setenv("WANDB_MODE", "online")  # asked for the server: a refusal naming both fixes
        with pytest.raises(TrackerUnavailableError, match=r"wandb login.*unset WANDB_MODE"):
            prepare_trackers(["wandb"], tmp_path / "other")
    finally:
        wandb.teardown()  # its settings were read under this test's HOME: later tests start afresh


def test_a_tensorboard_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """RUN_DIR/tb a file, or in a folder this user cannot write (/proc, even for root): refused in one line
    while deciding, not by TensorBoard's writer with a traceback at the first record, after the first steps."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("")
    with pytest.raises(TrackerUnavailableError, match=r"tb is a file, not a directory; .*remove tensorboard"):
        prepare_trackers(["tensorboard"], run)
    (run / "tb").unlink()
    with pytest.raises(TrackerUnavailableError, match=r"/proc/run/tb cannot be written .*remove tensorboard"):
        prepare_trackers(["tensorboard"], Path("/proc/run"))
    assert prepare_trackers(["tensorboard"], tmp_path / "new" / "run")["tensorboard"].notice is None
    assert not (tmp_path / "new").exists()  # deciding writes nothing


@pytest.mark.slow
def test_wandb_without_a_key_trains_offline_under_the_run_dir(tmp_path):
    """`attnxfer train log.trackers=[wandb]` with no key, no login, no WANDB_MODE: exit 0, one line saying
    offline, and the offline run under RUN_DIR/wandb holds the run's records."""
    pytest.importorskip("wandb", reason="the wandb extra: pip install 'attnxfer[wandb]'")
    run = tmp_path / "run"
    args = ["train", f"run_dir={run}", *TINY, "log.trackers=[wandb]"]
    res = attnxfer_process(*args, env=_clean_env(tmp_path / "home"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    said = [line for line in res.stdout.splitlines() if line.startswith("wandb:")]
    assert (
        len(said) == 1 and "no API key" in said[0] and f"wandb sync {run / 'wandb'}/offline-run-*" in said[0]
    )
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    files = list((run / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_wandb_with_a_key_but_no_server_goes_offline_and_online_is_refused(tmp_path, monkeypatch, capsys):
    """A key (as `wandb login` on a login node leaves in a shared HOME) but W&B's server out of reach, as on
    a compute node: offline, said; with WANDB_MODE=online: one error line, nothing written. The refusal is
    decided before any work, so it runs in this process (`run_cli`, the environment set as in `_clean_env`);
    the offline run, which starts wandb's own run, in an interpreter of its own."""
    wandb = pytest.importorskip("wandb", reason="the wandb extra: pip install 'attnxfer[wandb]'")
    url = f"http://127.0.0.1:{_closed_port()}"
    env = _clean_env(tmp_path / "home", WANDB_API_KEY="a" * 40, WANDB_BASE_URL=url)
    _set_env(monkeypatch, {**env, "WANDB_MODE": "online", "WANDB_SILENT": "true"})
    wandb.teardown()  # settings another test's wandb.setup() read: this one reads the environment above
    try:
        args = once_each(["train", f"run_dir={tmp_path / 'online'}", *TINY, "log.trackers=[wandb]"])
        line = _refusal_in_process(*run_cli(capsys, *args))
    finally:
        wandb.teardown()  # read under this test's HOME: later tests start afresh
    assert url in line and "unset WANDB_MODE" in line
    assert not (tmp_path / "online").exists()

    run = tmp_path / "run"
    res = attnxfer_process("train", f"run_dir={run}", *TINY, "log.trackers=[wandb]", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    said = [line for line in res.stdout.splitlines() if line.startswith("wandb:")]
    assert len(said) == 1 and url in said[0] and "offline" in said[0]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


# ------------------------------------------------------------------------------------------------ MLflow


def _mlflow_history(store: Path, experiment: str) -> tuple[list, dict[int, float]]:
    """(runs, train/total by step) of a file store, read with MLflow's own client (in this process: the
    store is named, so nothing of this process's MLflow settings is read)."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = mlflow.MlflowClient(store.as_uri())
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        history = {
            m.step: m.value for r in runs for m in client.get_metric_history(r.info.run_id, "train/total")
        }
    return [r.info.run_id for r in runs], history


@pytest.mark.slow
def test_mlflow_with_no_tracking_uri_logs_into_the_runs_own_store_and_a_resume_continues_it(tmp_path):
    """No MLFLOW_TRACKING_URI, no MLFLOW_ALLOW_FILE_STORE: the run logs into RUN_DIR/mlruns (said in one
    line), leaves no mlflow.db in the working directory, and its extension continues the same MLflow run."""
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'attnxfer[mlflow]'")
    run = tmp_path / "run"
    env = _clean_env(tmp_path / "home")
    common = ["train", f"run_dir={run}", *TINY, "log.trackers=[mlflow]", "log.project=offline-test"]
    first = attnxfer_process(*common, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    said = [line for line in first.stdout.splitlines() if line.startswith("mlflow:")]
    assert len(said) == 1 and str(run / "mlruns") in said[0]
    assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlruns").exists()
    second = attnxfer_process(
        *common, "schedule.max_steps=4", "log.project=elsewhere", env=env, cwd=tmp_path
    )  # at step 2
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    # the MLflow run goes on in the experiment it began in, and the start-up says so rather than list a change
    assert "log.project=elsewhere is not where this run's mlflow run logs: it began in offline-test" in (
        second.stdout + second.stderr
    )

    runs, history = _mlflow_history(run / "mlruns", "offline-test")
    assert runs == [json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]]  # one run, continued
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["total"] for r in records if r["split"] == "train"}
    assert sorted(history) == [1, 2, 3, 4] == sorted(logged)
    assert all(history[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)


@pytest.mark.slow
def test_an_mlflow_server_that_does_not_answer_stops_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    """MLFLOW_TRACKING_URI on a closed port: one line naming the URI, exit code 2, nothing written; the check
    comes before the teacher and the data (a teacher folder that does not exist is never reached). A refusal
    before any work: in this process (`run_cli`), the environment set as in `_clean_env`."""
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'attnxfer[mlflow]'")
    uri = f"http://127.0.0.1:{_closed_port()}"
    # a URI another test set in this process forgotten first: this one reads the environment (MLflow's
    # set_tracking_uri(None) also unsets MLFLOW_TRACKING_URI, so it comes before the environment is set)
    mlflow.set_tracking_uri(None)
    _set_env(monkeypatch, _clean_env(tmp_path / "home", MLFLOW_TRACKING_URI=uri))
    run = tmp_path / "run"
    args = once_each(["train", f"run_dir={run}", *TINY, "log.trackers=[mlflow]", "transfer.mode=distill"])
    code, out, err = run_cli(capsys, *args, f"teacher.spec=local-dir:{tmp_path / 'no-teacher'}")
    line = _refusal_in_process(code, out, err)
    assert f"MLFLOW_TRACKING_URI={uri}" in line and "does not answer" in line
    assert not run.exists()


@pytest.mark.slow
def test_mlflow_stores_mlflow_skinny_cannot_open_are_refused_in_one_line(tmp_path, monkeypatch):
    """A file store without MLFLOW_ALLOW_FILE_STORE (MLflow 3 refuses it) and a database store without
    SQLAlchemy: refused before any work, each naming its fix. The store is set as a notebook sets it."""
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'attnxfer[mlflow]'")
    import mlflow.environment_variables as mlflow_env

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        mlflow.set_tracking_uri((tmp_path / "store").as_uri())
        if hasattr(mlflow_env, "MLFLOW_ALLOW_FILE_STORE"):  # MLflow 3's guard
            with pytest.raises(TrackerUnavailableError, match="MLFLOW_ALLOW_FILE_STORE=true"):
                prepare_trackers(["mlflow"], tmp_path / "run")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert prepare_trackers(["mlflow"], tmp_path / "run")["mlflow"].notice is None  # the user's store
        if importlib.util.find_spec("sqlalchemy") is None:
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
            with pytest.raises(TrackerUnavailableError, match=r"pip install mlflow"):
                prepare_trackers(["mlflow"], tmp_path / "other")
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_mlflow_logs_a_loss_beside_its_parts_into_its_file_store(tmp_path, monkeypatch):
    """A loss and its parts (``feat_cos`` and ``feat_cos/prefix``, ``mse_q`` and ``mse_q/3``) are one name
    under another, which MLflow's file store (RUN_DIR/mlruns, the default) cannot write: MLflow gets the parts
    as ``train/feat_cos_prefix``, and the run logs every value."""
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'attnxfer[mlflow]'")
    from attnxfer.train.trackers import TrackerSet

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    trackers = TrackerSet(run, ["mlflow"], project="parts")
    trackers.log("train", 1, {"feat_cos": 0.5, "feat_cos/prefix": 0.25, "feat_cos/patch": 0.75})
    trackers.log("val", 1, {"val_feat_cos_prefix": 0.9})
    trackers.finish()

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    metrics = mlflow.MlflowClient((run / "mlruns").as_uri()).get_run(run_id).data.metrics
    assert metrics == {
        "train/feat_cos": 0.5,
        "train/feat_cos_prefix": 0.25,
        "train/feat_cos_patch": 0.75,
        "val/feat_cos_prefix": 0.9,
    }


@pytest.mark.slow
def test_a_conversions_stage2_tracker_run_is_named_after_the_conversion(tmp_path, monkeypatch):
    """Stage 2 logs from RUN_DIR/stage2: its tracker run is named ``<conversion>/stage2``, so that conversions
    logged into one project are told apart (every one was named ``stage2``)."""
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'attnxfer[mlflow]'")
    from attnxfer.train.trackers import TrackerSet

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    names = {}
    for run in (tmp_path / "demo_hedgehog" / "stage2", tmp_path / "plain"):
        trackers = TrackerSet(run, ["mlflow"], project="names")
        trackers.log("train", 1, {"total": 1.0})
        trackers.finish()
        import mlflow

        with monkeypatch.context() as m:
            m.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
            run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
            names[run.name] = mlflow.MlflowClient((run / "mlruns").as_uri()).get_run(run_id).info.run_name
    assert names == {"stage2": "demo_hedgehog/stage2", "plain": "plain"}
