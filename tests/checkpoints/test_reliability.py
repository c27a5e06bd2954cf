"""Reliability, through the CLI: runs that never get stuck on their own checkpoints, a read-only
`eval`, a resume that checks what it resumes, and messages that name the real problem."""

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
from helpers import popen_interruptible, run_cli, tiny_run
from safetensors.torch import load_file

from attnxfer.launch import cli

# 4 steps an epoch on synthetic data, a 1-block model: about a second a run
S = [
    *tiny_run(64, 16),
    "transfer.mode=none",
    "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}",
    "log.every_steps=1",
    "deterministic=true",
]


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("rel") / "run"
    assert cli.main(["train", *S, "schedule.max_steps=4", f"run_dir={run}"]) == 0
    return run


def test_eval_writes_only_its_result_file(trained, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), "log.every_steps=3")
    assert code == 0, err
    result = json.loads((trained / "eval-00000004.json").read_text())
    assert result["step"] == 4 and "val_top1" in result["metrics"]
    after = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    assert after.pop("eval-00000004.json")
    assert after == before  # config.yaml, run.json, metrics.jsonl untouched
    assert (
        "eval_only" not in (trained / "config.yaml").read_text()
        or "eval_only: false" in (trained / "config.yaml").read_text()
    )


def test_a_second_eval_of_a_step_with_other_settings_keeps_the_firsts_scores(trained, capsys):
    def scored(*overrides: str) -> Path:
        code, out, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), *overrides)
        assert code == 0, err
        return Path(out.strip().splitlines()[-1].rsplit(" -> ", 1)[1])

    first = scored()
    kept, files = first.read_bytes(), set(trained.glob("eval-*.json"))
    other = scored("eval.metrics=[top1]")
    assert first.read_bytes() == kept and other not in files and other.name.startswith("eval-00000004-")
    assert json.loads(other.read_text())["config"]["eval"]["metrics"] == ["top1"]
    code, out, _ = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), "eval.metrics=[top1]")
    assert code == 0 and "scoring step-00000004 with keys changed since it was saved: eval.metrics" in out, (
        out
    )
    assert "resume:" not in out  # eval resumes nothing
    assert scored() == first  # the first evaluation again replaces only its own scores
    assert set(trained.glob("eval-*.json")) == files | {other}


def test_eval_of_another_runs_checkpoint_names_that_runs_config_not_training_advice(
    trained, tmp_path, capsys
):
    other = tmp_path / "other"
    assert cli.main(["train", *S, "schedule.max_steps=1", "ema.decay=0.9", f"run_dir={other}"]) == 0
    step = other / "checkpoints" / "step-00000001"
    code, _, err = run_cli(capsys, "eval", "-c", str(trained / "config.yaml"), f"checkpoint.resume={step}")
    assert (
        code == 2 and f"score it with that run's own config: attnxfer eval -c {other / 'config.yaml'}" in err
    )
    assert "model.init" not in err  # how to train from its weights is no answer to scoring it


def test_eval_of_a_run_without_checkpoint_refuses(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", *S, f"run_dir={tmp_path / 'never'}")
    assert code == 2 and "no checkpoint to evaluate" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


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
    code, _, err = run_cli(capsys, "train", *S, "schedule.max_steps=6", f"run_dir={trained}", *change)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()
    assert len(line) == 1 and all(k in line[0] for k in keys) and "run_dir=" in line[0]
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    assert _steps(trained) == ["step-00000004"]


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_run_dir_or_recipe_given_without_c_names_the_c_to_pass(trained, capsys, command):
    """Export and inspect take a run dir as it is; eval and train read a config, with -c."""
    code, _, err = run_cli(capsys, command, str(trained))
    assert code == 2 and err.strip().endswith(f"pass -c {trained / 'config.yaml'}"), err
    code, _, err = run_cli(capsys, command, "demo/copy")
    assert code == 2 and err.strip().endswith("pass -c demo/copy"), err


def test_a_run_trained_after_eval_trains(trained, capsys):
    code, _, err = run_cli(capsys, "train", "-c", str(trained / "config.yaml"), "schedule.max_steps=5")
    assert code == 0, err
    assert "step-00000005" in _steps(trained)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "-c", ""], "-c was given an empty name"),
        (["train", "-c", "{tmp}"], "is a directory"),
        (["train", "-c", "{tmp}/binary"], "not a text YAML file"),
        (["train", *S, "run_dir={tmp}/afile"], "is a file, not a directory"),
        (["train", *S, "run_dir={tmp}/afile/run"], "afile is a file, not a directory"),
        (["demo", "--quick", "--out", "{tmp}/afile/demo"], "afile is a file, not a directory"),
        (["demo", "--quick", "--out", "{tmp}"], "holds other work (afile, binary) and no demo's runs"),
        (["submit", *S, "run_dir={tmp}/afile/run", "--dry-run"], "afile is a file, not a directory"),
        (["export", "{tmp}/missing", "{tmp}/out"], "does not exist"),
        (["train", *S, "data.dataset=folder", "run_dir={tmp}/r"], "set data.root"),
        (["train", *S, "device=cuda", "run_dir={tmp}/r"], "no CUDA device"),
        (["train", *S, "data.kwargs.length=3", "run_dir={tmp}/r"], "give the training split more images"),
        (["train", *S, "data.kwargs.lenght=3", "run_dir={tmp}/r"], "has no option(s) lenght (data.kwargs)"),
        (["submit", *S, "--slurm", "foo bar=x; rm -rf /", "--cluster", "local"], "not an sbatch option"),
        (["submit", *S, "schedule.epochs=0"], "attnxfer submit: error: schedule.epochs"),
    ],
)
def test_bad_input_names_the_real_problem(tmp_path, capsys, monkeypatch, argv, needle):
    if torch.cuda.is_available() and "device=cuda" in argv:
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "binary"]  # nothing left behind


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


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{run}", "{tmp}/afile/out"],
        ["inspect", "{run}", "{run}", "--out", "{tmp}/afile/x"],
    ],
)
def test_an_output_folder_under_a_file_is_refused_before_anything_is_read(trained, tmp_path, capsys, argv):
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(trained)) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert (
        code == 2 and f"{tmp_path / 'afile'} is a file, not a directory" in err and "Traceback" not in err
    ), err
    assert (tmp_path / "afile").read_text() == "x"


def test_no_command_writes_its_run_into_an_exported_model(trained, tmp_path, capsys):
    """An export (maybe the teacher the run reads) is a model, not a run folder: nothing is mixed into it."""
    export = tmp_path / "exported"
    assert run_cli(capsys, "export", str(trained), str(export))[0] == 0
    before = sorted(p.name for p in export.iterdir())
    for command in ("train", "pretrain"):
        code, _, err = run_cli(capsys, command, *S, "schedule.max_steps=1", f"run_dir={export}")
        assert code == 2 and f"run_dir={export} holds an exported model" in err, err
    assert sorted(p.name for p in export.iterdir()) == before


def test_a_push_without_the_hub_is_one_line_after_a_complete_export(trained, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # what HF_HUB_OFFLINE=1 sets at import
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "export", str(trained), str(out), "--push-to-hub", "acme/student")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"hf upload acme/student {out} ." in err and (out / "model.safetensors").is_file()
    code, _, err = run_cli(capsys, "export", str(trained), str(tmp_path / "o2"), "--push-to-hub", "bad name!")
    assert code == 2 and "'bad name!' is not a Hub repo id" in err and not (tmp_path / "o2").exists()


def test_the_card_of_a_run_without_a_teacher_says_so_and_export_into_dot_names_the_folder(
    trained, tmp_path, capsys, monkeypatch
):
    """From scratch (or MAE pre-training): no 'from the teacher (no teacher recorded)', no teacher's licence;
    `export RUN .` names the card after the folder it is written into, not ''."""
    (tmp_path / "scratch-vit").mkdir()
    monkeypatch.chdir(tmp_path / "scratch-vit")
    code, _, err = run_cli(capsys, "export", str(trained), ".")
    assert code == 0, err
    body = (tmp_path / "scratch-vit" / "README.md").read_text().split("---", 2)[2]
    assert body.lstrip().startswith("# scratch-vit\n") and "trained without a teacher, with attnxfer." in body
    assert "## Teacher\n\nNone: trained without a teacher." in body and "teacher's licence" not in body


def test_a_teacher_exported_from_a_micro_vit_is_recorded_by_its_name(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(trained), str(tmp_path / "exported"))
    assert code == 0, err
    assert (
        json.loads((tmp_path / "exported/config.json").read_text())["architecture"] != "vit_micro_patch4_28"
    )
    run = tmp_path / "copy"
    code, _, err = run_cli(
        capsys,
        "train",
        *(a for a in S if a.split("=")[0] not in ("transfer.mode", "model.kwargs")),
        "transfer.mode=copy",
        f"teacher.spec=local-dir:{tmp_path / 'exported'}",
        "schedule.max_steps=1",
        f"run_dir={run}",
    )
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["teacher"]["architecture"] == "vit_micro_patch4_28"


@pytest.mark.slow
def test_ctrl_c_before_any_checkpoint_says_the_run_starts_over(tmp_path):
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
    assert "no checkpoint was saved yet" in err and "Traceback" not in err, err


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


def test_an_export_into_the_runs_own_folder_is_refused(trained, capsys):
    """--overwrite there would mix config.json and model.safetensors among the run's own files."""
    before = sorted(p.name for p in trained.iterdir())
    code, _, err = run_cli(capsys, "export", str(trained), f"{trained}/", "--overwrite")
    assert code == 2 and f"is the run's own folder: export into {trained / 'export'}" in err, err
    assert sorted(p.name for p in trained.iterdir()) == before


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "teacher"
    assert cli.main(["export", str(trained), str(out)]) == 0
    return out


@pytest.mark.parametrize("ce_path", [pytest.param("auto", marks=pytest.mark.slow), "attention_lse"])
def test_the_ce_path_is_chosen_by_config_and_recorded(ce_path, exported, tmp_path, capsys):
    """transfer.ce_path reaches the training step (attention_lse: the student's layers hand out their
    log-sum-exp, or the loss refuses to run) and run.json records the path used and how it was chosen
    (auto: measured here, every path that runs on a CPU timed; a forced path: nothing timed)."""
    run = tmp_path / "distill"
    code, _, err = run_cli(
        capsys,
        "train",
        *[a for a in S if a != "transfer.mode=none"],
        "transfer.mode=distill",
        f"teacher.spec=local-dir:{exported}",
        f"transfer.ce_path={ce_path}",
        "schedule.max_steps=1",
        f"run_dir={run}",
        "deterministic=false",  # with deterministic=true auto takes the device default (test_ce_select)
    )
    assert code == 0, err
    info = json.loads((run / "run.json").read_text())
    choice = info["ce_path_choice"]
    if ce_path == "auto":
        assert choice["how"] == "measured" and set(choice["timings_ms"]) == {
            "rows",
            "sdpa",
            "attention_lse",
            "materialised",
        }
        assert info["ce_path"] == min(choice["timings_ms"], key=choice["timings_ms"].get)
        assert choice["unavailable"] == {"triton": "needs CUDA"}
    else:
        assert info["ce_path"] == ce_path and choice["timings_ms"] == {}


@pytest.mark.slow
def test_a_resumed_auto_run_reuses_the_recorded_ce_path_and_stays_bit_identical(exported, tmp_path, capsys):
    """transfer.ce_path=auto measures once, at the start: the checkpoint records the choice and a resumed
    run takes it back without timing anything (another path would change the trajectory in the last
    bits). Resumed after step 1, the run ends bit-identical to one told the recorded path from the start:
    the calibration disturbed neither the RNG streams nor the weights."""
    distill = [
        *[a for a in S if a != "transfer.mode=none"],
        "transfer.mode=distill",
        f"teacher.spec=local-dir:{exported}",
        "model.drop_path_rate=0.1",  # the RNG stream matters
        "checkpoint.every_steps=1",
        "deterministic=false",  # deterministic=true: auto takes the device default without timing
    ]
    run = tmp_path / "auto"
    assert (
        run_cli(capsys, "train", *distill, "transfer.ce_path=auto", "schedule.max_steps=1", f"run_dir={run}")[
            0
        ]
        == 0
    )
    first = json.loads((run / "run.json").read_text())["ce_path_choice"]
    assert first["how"] == "measured"
    state = json.loads((run / "checkpoints/step-00000001/state.json").read_text())
    assert state["ce_path"] == first
    code, out, err = run_cli(
        capsys, "train", *distill, "transfer.ce_path=auto", "schedule.max_steps=3", f"run_dir={run}"
    )
    assert code == 0, err
    again = json.loads((run / "run.json").read_text())["ce_path_choice"]
    assert again == {**first, "how": "resumed from step-00000001"}  # the same timings: nothing re-measured
    assert f"ce_path: {first['path']} (resumed from step-00000001" in out
    told = tmp_path / "told"
    code, _, err = run_cli(
        capsys,
        "train",
        *distill,
        f"transfer.ce_path={first['path']}",
        "schedule.max_steps=3",
        f"run_dir={told}",
    )
    assert code == 0, err
    a, b = (load_file(str(r / "checkpoints/step-00000003/model.safetensors")) for r in (run, told))
    assert all(torch.equal(a[k], b[k]) for k in a)


_ENDS_AFTER_A_GROUP = """
import atexit, logging, sys
from pathlib import Path

from attnxfer.launch.process_exit import end_program
from attnxfer.train.distributed import joined_process_group

out = Path(sys.argv[1])
logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
class Finalized:
    def __del__(self):
        print("interpreter finalization ran", flush=True)
kept_until_finalization = Finalized()
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
from concurrent.futures import ThreadPoolExecutor
idle = ThreadPoolExecutor(1)  # never shut down: its worker waits until threading's exit hook stops it
idle.submit(print, "", end="")
with joined_process_group("gloo") as info:
    pass
logging.getLogger("run").info("rank %d finished", info.rank)
print("stdout of rank", info.rank, end="")  # unflushed: end_program must flush it
end_program(3)
"""


@pytest.mark.slow
def test_after_a_multi_rank_run_the_program_ends_with_its_code_and_its_outputs_but_without_finalization(
    tmp_path,
):
    """The gloo teardown race (`attnxfer.launch.process_exit`): a rank that finished must exit with its
    command's code, after the atexit handlers and with its streams flushed, and skip interpreter
    finalization; a single process exits the ordinary way."""
    script = tmp_path / "ends.py"
    script.write_text(_ENDS_AFTER_A_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    two_dir.mkdir()
    one_dir.mkdir()
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--tee=3", str(script), str(two_dir)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert two.returncode != 0 and "exitcode  : 3" in two.stderr, two.stderr[-2000:]  # both ranks exit 3
    assert "stdout of rank 0" in two.stdout and "stdout of rank 1" in two.stdout
    assert "interpreter finalization ran" not in two.stdout
    assert (two_dir / "atexit.txt").read_text() == "ran"
    assert "rank 0 finished" in (two_dir / "log.txt").read_text()
    one = subprocess.run(
        [sys.executable, str(script), str(one_dir)], capture_output=True, text=True, timeout=120, env=env
    )
    assert one.returncode == 3 and "interpreter finalization ran" in one.stdout
    assert (one_dir / "atexit.txt").read_text() == "ran"


def test_export_given_a_folder_that_is_not_a_run_says_what_it_is(trained, exported, tmp_path, capsys):
    """A folder of runs (the demo's runs/demo), an export, a path that is not there: each answer points to
    what to give instead, and nothing is written."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a").symlink_to(trained)
    cases = {
        tmp_path / "runs": f"holds runs (a/): give one of them, e.g. {tmp_path / 'runs' / 'a'}",
        exported: f"is an exported model, not a run's dir: it loads as local-dir:{exported}",
        exported.parent: f"it holds an exported model, {exported}, which loads as local-dir:{exported}",
        tmp_path / "runs" / "b": f"does not exist ({tmp_path / 'runs'} holds: a/)",
        trained / "config.yaml": f"is a file, not a run's folder: give the folder it is in, {trained}",
    }
    for given, says in cases.items():
        code, _, err = run_cli(capsys, "export", str(given), str(tmp_path / "out"))
        assert code == 2 and says in err, err
    assert not (tmp_path / "out").exists()
