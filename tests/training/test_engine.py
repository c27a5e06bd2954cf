"""The training engine: config errors through the CLI, exact resume after SIGKILL, corrupt checkpoints,
two ranks under torchrun, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ONE_BLOCK_RUN, QUIET, run_cli, tiny_run, tiny_vit, torchrun_launch
from safetensors.torch import load_file

from attnxfer.apps.run.parts import RunParts
from attnxfer.apps.run.training import build_engine, train
from attnxfer.checkpoints.run_dir import RunDir
from attnxfer.checkpoints.verify import CorruptCheckpointWarning
from attnxfer.config import ConfigError, load_config
from attnxfer.train.drive import Drive, StudentStreams, own_feed
from attnxfer.train.stop import StopRequested

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
#: tests/dist_train.py, run under torchrun (`torchrun_launch`) on two CPU ranks in a gloo group: its config overrides follow
DIST_TRAIN = str(ROOT / "tests" / "dist_train.py")
# A 2-block micro-ViT on real animal-mnist: a few seconds a run.
TINY = [
    "model.name=vit_micro_patch4_28",
    "model.kwargs={depth: 2, embed_dim: 48}",
    "data.batch_size=32",
    *QUIET,
    "log.every_steps=2",
    "model.drop_path_rate=0.1",
    "checkpoint.every_epoch=false",
    "deterministic=true",
]


# one torch intra-op thread, as a run in a process of its own has (OMP_NUM_THREADS=1): a run here is compared
# bit for bit, or to 1e-5, with one there
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _weights(run_dir):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / "model.safetensors")), ckpts[-1].name


@pytest.mark.parametrize(
    "args,needle",
    [
        (["optim.lrr=1"], "did you mean 'optim.lr'"),
        (["schedule.epochs=1.5"], "schedule.epochs: expected an integer"),
        (
            ["data.dataset=folder", "data.root=/nonexistent/imagenet", "transfer.mode=none"],
            "/nonexistent/imagenet",
        ),
        (["-c", "paper/vit_large_copyy"], "did you mean the built-in recipe 'paper/vit_large_copy'"),
        (["transfer.mode=copy"], "needs a teacher"),
        (  # timm's own assertion, from model.kwargs the architecture cannot take
            ["transfer.mode=none", "model.name=vit_micro_patch4_28", "model.kwargs={embed_dim: 50}"],
            "model.name=vit_micro_patch4_28 cannot be built with model.kwargs {'embed_dim': 50}",
        ),
        (  # timm builds it, but a student without blocks has no attention to transfer
            ["transfer.mode=none", "model.kwargs={depth: 0}"],
            "with model.kwargs {'depth': 0}: VisionTransformer has no attention layer",
        ),
        (  # a CNN: built by timm, nothing for attnxfer to transfer into
            ["transfer.mode=none", "model.name=resnet18"],
            "model.name=resnet18: ResNet has no attention layer attnxfer can find",
        ),
        (  # timm would drop 3 px of each side without a word
            ["transfer.mode=none", "data.img_size=27"],
            "4 px patches (model.name / model.kwargs.patch_size) do not tile its 27 px images "
            "(data.img_size / model.kwargs.img_size): sizes that work near it are 24 px and 28 px; or patches "
            "that tile it: model.kwargs.patch_size=3 or 9\n",
        ),
        (  # a patch larger than the image: no token at all, the first step would stop
            ["transfer.mode=none", "model.kwargs.patch_size=64"],
            "64 px patches (model.name / model.kwargs.patch_size) do not tile its 28 px images "
            "(data.img_size / model.kwargs.img_size): sizes that work near it are 64 px; or patches that tile "
            "it: model.kwargs.patch_size=4, 7 or 14\n",
        ),
        (  # fewer classes than the data has: a label past the head would stop the first step
            ["transfer.mode=none", "model.num_classes=5"],
            "model.num_classes=5 is fewer than the 10 classes of data.dataset=animal_mnist",
        ),
    ],
)
def test_bad_input_is_one_clear_message(args, needle, tmp_path, capsys):
    """Through the CLI's own main, in this process (the kill-and-resume test below runs ``attnxfer train`` as a
    real process)."""
    code, _, err = run_cli(capsys, "train", f"run_dir={tmp_path / 'r'}", *args)
    assert code == 2, err[-2000:]
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (
            "model.kwargs.foo=1",
            "the teacher's architecture: model.mirror_teacher=true) cannot be built with model.kwargs",
        ),
        (
            "model.kwargs.depth=abc",
            "student_like: depth must be an int, got 'abc' (model.kwargs.depth in a config)",
        ),
    ],
)
def test_model_kwargs_a_mirrored_student_cannot_take_are_one_message_naming_them(
    kwargs, needle, tiny_teacher_dir, tmp_path, capsys
):
    """With a teacher the student is built as the teacher's architecture: timm (or student_like) refusing the
    user's kwargs there is the same one line as for a named model, not a traceback."""
    teacher = f"teacher.spec=local-dir:{tiny_teacher_dir}"
    code, _, err = run_cli(
        capsys, "train", f"run_dir={tmp_path / 'r'}", teacher, "transfer.mode=copy", kwargs
    )
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert needle in err and "model.kwargs" in err and not (tmp_path / "r").exists()


def test_a_named_student_whose_patches_do_not_tile_the_teachers_images_is_pointed_to_the_teachers_patch(
    tiny_teacher_dir, tmp_path, capsys
):
    """The student reads the teacher's images (32 px here), so another image size would not do: the teacher's
    patch, which also gives the student the teacher's tokens, is the one answer that trains."""
    args = ["transfer.mode=distill", "model.mirror_teacher=false", "model.kwargs.patch_size=6"]
    code, _, err = run_cli(
        capsys, "train", f"run_dir={tmp_path / 'r'}", f"teacher.spec=local-dir:{tiny_teacher_dir}", *args
    )
    assert code == 2 and "Traceback" not in err, err[-2000:]
    said = (
        "6 px patches (model.name / model.kwargs.patch_size) do not tile its 32 px images (data.img_size / "
    )
    assert (
        f"{said}model.kwargs.img_size): give it the teacher's, model.kwargs.patch_size=8 (maps are token"
        in err
    )


def test_python_callers_passing_a_path_or_a_dict_are_told_to_build_a_config_with_load_config(tmp_path):
    for cfg in ("attnxfer/cfgs/demo/distill.yaml", {"run_dir": str(tmp_path)}):
        with pytest.raises(TypeError, match=r"train takes a TrainConfig.*load_config\(path\)"):
            train(cfg)
    # parts of one's own with a loader whose sampler cannot resume mid-epoch: said before the run dir is made
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(4, 3, 28, 28)), batch_size=2
    )
    parts = RunParts(tiny_vit(depth=1), None, loader, loader, train_sampler=None, num_classes=10)
    with pytest.raises(
        TypeError, match=r"train_sampler: .*got NoneType: sampler = attnxfer.data.ResumableSampler"
    ):
        train(load_config(None, [*QUIET, f"run_dir={tmp_path / 'run'}", "transfer.mode=none"]), parts)
    assert not (tmp_path / "run").exists()
    for overrides in (
        "data.batch_size=4",
        {"data.batch_size": 4},
    ):  # not read letter by letter, or key by key
        with pytest.raises(ConfigError, match=r"overrides: a list of 'key=value' strings"):
            load_config(None, overrides)


def test_config_overrides_and_resolved_config_written(tmp_path):
    cfg = load_config("demo/copy", ["transfer.layers=[0,2]", "optim.lr=1e-3", "teacher.spec=local-dir:/x"])
    assert cfg.transfer.layers == [0, 2] and cfg.optim.lr == 1e-3 and cfg.teacher.spec == "local-dir:/x"
    with pytest.raises(ConfigError, match="expected a list"):
        load_config(None, ["transfer.layers=3"])
    with pytest.raises(ConfigError, match=r"write e.g. log.trackers=\[tensorboard\]\)"):
        load_config(None, ["log.trackers=tensorboard"])  # the one item given, in brackets


@pytest.mark.parametrize(
    ("override", "said"),
    [
        (
            "transfer.layers=0,1",
            "transfer.layers: expected a list, got '0,1' (write e.g. transfer.layers=[0,1])",
        ),
        ("transfer.layers=[0,a]", "transfer.layers[1]: expected an integer, got 'a'"),
        (  # a span as the plan prints it ("layers 0-3"): its layers, where [0-3] would be refused in turn
            "transfer.layers=0-3",
            "transfer.layers: expected a list, got '0-3' (write e.g. transfer.layers=[0,1,2,3])",
        ),
        (  # a list of mappings given its one mapping: that mapping in brackets, in the config's words
            "transfer.losses={name: mse, signal: v}",
            "transfer.losses: expected a list, got {'name': 'mse', 'signal': 'v'} "
            "(write e.g. transfer.losses=[{name: mse, signal: v}])",
        ),
        (  # a loss's name alone: the mapping with that name, in brackets
            "transfer.losses=cosine",
            "transfer.losses: expected a list, got 'cosine' (write e.g. transfer.losses=[{name: cosine}])",
        ),
        (  # an item given as the loss's name: the mapping with that name
            "transfer.losses=[cosine]",
            "transfer.losses[0]: expected a mapping, got 'cosine' (write e.g. {name: cosine})",
        ),
        (  # a list quoted (a YAML string): the same list unquoted, not that string in more brackets
            'transfer.layers="[0,1,2]"',
            "transfer.layers: expected a list, got '[0,1,2]' (write e.g. transfer.layers=[0,1,2] without "
            "quotes: quoted, it is a string)",
        ),
        (  # items without brackets, as a shell list writes them
            "transfer.layers=0 1 2",
            "transfer.layers: expected a list, got '0 1 2' (write e.g. transfer.layers=[0,1,2])",
        ),
        (  # none of them: the empty list, not [none]
            "log.trackers=none",
            "log.trackers: expected a list, got 'none' (write e.g. log.trackers=[] for none)",
        ),
        (  # an item by its index, as OmegaConf's dotlists allow: not a mapping of '0' to write in brackets
            "transfer.losses.0.weight=2",
            "transfer.losses.0: a list is not set item by item; give it whole: transfer.losses=[...]",
        ),
    ],
)
def test_a_bad_value_of_a_list_or_null_key_names_the_brackets_or_the_item(override, said):
    """A key that may be null (transfer.layers, data.mean) answered only 'expected a list or null', even of
    a list, where a key that may not (log.trackers) names the item at fault or the brackets to write."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, [override])
    assert str(refused.value) == said


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, capsys):
    """A run SIGKILLed (its own process) after its step-8 save and resumed ends bit-identical to an
    uninterrupted one; the reference and the resume run in this process, on one thread as the killed one."""
    common = [
        *TINY,
        "transfer.mode=none",
        "schedule.max_steps=16",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=10",
    ]
    code, _, err = run_cli(capsys, "train", f"run_dir={tmp_path / 'ref'}", *common)
    assert code == 0, err[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [PY, "-m", "attnxfer", "train", f"run_dir={run}", *common],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 240
    while not list((run / "checkpoints").glob("step-00000008")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert "step-00000008" in saved and "step-00000016" not in saved, (
        saved
    )  # killed mid-run (epoch = 281 steps)
    code, out, err = run_cli(capsys, "train", f"run_dir={run}", *common)
    assert code == 0, err[-2000:]
    assert "resumed from checkpoint step" in out
    a, name_a = _weights(tmp_path / "ref")
    b, name_b = _weights(run)
    assert name_a == name_b == "step-00000016"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # earlier checkpoints written before the kill were not overwritten or lost
    assert {"step-00000004", "step-00000008"} <= {p.name for p in (run / "checkpoints").glob("step-*")}


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_reported_and_previous_used(tmp_path, capsys):
    common = [*TINY, "transfer.mode=none", "schedule.max_steps=8", "checkpoint.every_steps=4"]
    run = tmp_path / "r"
    assert run_cli(capsys, "train", f"run_dir={run}", *common)[0] == 0
    newest = run / "checkpoints" / "step-00000008" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(CorruptCheckpointWarning, match="step-00000008 is not usable") as said:
        code, out, err = run_cli(capsys, "train", f"run_dir={run}", *common, "schedule.max_steps=10")
    assert code == 0, err[-2000:]
    assert "resumed from checkpoint step 4" in out and any("moved it to" in str(w.message) for w in said)
    assert (run / "checkpoints" / "step-00000010").exists()


def test_a_resumed_run_reports_the_whole_runs_history_and_seconds(tmp_path):
    """The result (and so a conversion's report) counts the attempts before the resume, not the last alone."""
    common = [*TINY, "transfer.mode=none", f"run_dir={tmp_path / 'r'}"]
    first = train(load_config(None, [*common, "schedule.max_steps=2"]))
    again = train(load_config(None, [*common, "schedule.max_steps=4"]))
    assert [h["step"] for h in again.history] == [2, 4] and again.history[0] == first.history[0]
    assert again.seconds > first.seconds > 0


def test_a_resume_whose_plan_changed_with_the_code_says_how_and_keeps_the_earlier_plan(tmp_path, capsys):
    """The keys that change a plan are refused on resume, but a loss's default or a mode's layers may change
    with attnxfer itself: run.json was rewritten with the new plan, the earlier steps' plan lost, not a word."""
    common = [*TINY, "transfer.mode=none", f"run_dir={tmp_path / 'r'}"]
    train(load_config(None, [*common, "schedule.max_steps=2"]))
    record = RunDir(tmp_path / "r").record_file
    now = json.loads(record.read_text())["plan"]
    older = now.replace("transfer plan: mode=none", "transfer plan: mode=none, as an older attnxfer said it")
    record.write_text(json.dumps({**json.loads(record.read_text()), "plan": older}))
    capsys.readouterr()
    train(load_config(None, [*common, "schedule.max_steps=4"]))
    err = capsys.readouterr().err
    assert "warning: the transfer plan differs from the one run.json records for the steps up to 2" in err
    assert f"  was: {older.splitlines()[0]}\n  now: {now.splitlines()[0]}\n" in err
    kept = json.loads(record.read_text())
    assert kept["plan"] == now and kept["earlier_plans"] == [{"until_step": 2, "plan": older}]
    train(load_config(None, [*common, "schedule.max_steps=6"]))  # the same plan again: nothing to say
    assert "plan differs" not in capsys.readouterr().err
    assert json.loads(record.read_text())["earlier_plans"] == kept["earlier_plans"]


def test_a_run_stopped_between_two_log_steps_logs_the_records_of_an_uninterrupted_run(tmp_path):
    """A SIGTERM saves the step it stops at, between log steps: the terms summed since the last record are saved
    with it, so the resumed run's next record is the mean over the same steps, not over those after the resume."""
    common = [*TINY, "transfer.mode=none", "schedule.max_steps=4"]  # records at steps 2 and 4
    train(load_config(None, [f"run_dir={tmp_path / 'ref'}", *common]))
    cfg = load_config(None, [f"run_dir={tmp_path / 'r'}", *common])
    asked = []

    def stop():
        asked.append(1)
        return signal.SIGTERM if len(asked) == 3 else None  # after step 3

    with pytest.raises(StopRequested):
        build_engine(cfg, drive=Drive(stop=stop)).run()
    train(cfg)

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]

    assert records("r") == records("ref")


def test_a_run_without_logit_distillation_resumes_whatever_logit_temperature_it_is_given(tmp_path):
    """Read only by logit distillation: recipes that stopped setting it still continue their runs."""
    common = [*TINY, "transfer.mode=none", f"run_dir={tmp_path / 'r'}"]
    train(load_config(None, [*common, "schedule.max_steps=2", "transfer.logit_temperature=2"]))
    assert train(load_config(None, [*common, "schedule.max_steps=4"])).steps == 4


def test_non_finite_loss_names_the_term_and_saves_nothing(tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "train",
        f"run_dir={tmp_path / 'r'}",
        *TINY,
        "transfer.mode=none",
        "optim.lr=1e30",
        "schedule.warmup_epochs=0",
        "schedule.max_steps=6",
        "checkpoint.every_steps=100",
        "optim.clip_grad=5",
    )
    assert code != 0
    assert "non-finite loss term 'task'" in err and "Traceback" not in err
    # the advice fits the run: its clip is already set, and the term is no transfer weight's
    assert err.rstrip().endswith("Try a lower optim.lr, a lower optim.clip_grad than 5.")
    assert not list((tmp_path / "r" / "checkpoints").glob("step-*"))


def test_non_finite_comparison_term_is_advised_the_weights_the_run_reads(tmp_path, capsys, tiny_teacher_dir):
    """transfer.atd_weight was advised for every term but the task's, also in a run of transfer.losses alone
    (mode none), which does not read it: the advice names the weights of the run's own comparisons."""
    code, _, err = run_cli(
        capsys,
        "train",
        f"run_dir={tmp_path / 'r'}",
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        *tiny_run(8, 4),
        "transfer.mode=none",
        "transfer.task_weight=0",
        "transfer.losses=[{name: mse, signal: v}]",
        "optim.lr=1e30",
        "schedule.warmup_epochs=0",
        "schedule.max_steps=2",
    )
    assert code != 0 and "non-finite loss term 'mse_v/0'" in err
    assert err.rstrip().endswith(
        "Try a lower optim.lr, optim.clip_grad=1.0, or a lower transfer.losses[0] weight."
    )


#: the runs of `two_ranks` and its one-process reference: 4 steps, no drop-path (nothing random in a step), a
#: save due every few microseconds (checkpoint.every_minutes), CPU ranks in a gloo group also on a GPU machine
#: (where device=auto would want one GPU per rank)
TWO_RANK_RUN = [
    *TINY,
    "transfer.mode=none",
    "schedule.max_steps=4",
    "model.drop_path_rate=0.0",
    "checkpoint.every_minutes=1e-6",
    "device=cpu",
]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """`TWO_RANK_RUN` on two torchrun ranks, 16 images a rank, rank 1's clock standing still (tests/dist_train.py's
    STOPPED_CLOCK_RANK): one launch for the tests of DDP and of the every-minutes save."""
    run = tmp_path_factory.mktemp("two") / "two"
    launch, env = torchrun_launch(ranks=2)
    res = subprocess.run(
        [*launch, DIST_TRAIN, f"run_dir={run}", *TWO_RANK_RUN, "data.batch_size=16", "dist.timeout=30"],
        capture_output=True,
        text=True,
        timeout=400,
        env={**env, "STOPPED_CLOCK_RANK": "1"},
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.mark.slow
def test_two_ranks_under_torchrun_match_one_process_with_the_same_global_batch(two_ranks, tmp_path, capsys):
    """Against the same run in one process (here, one thread) at a batch of 32: the weights, and the logged
    losses."""
    one = tmp_path / "one"
    code, _, err = run_cli(capsys, "train", f"run_dir={one}", *TWO_RANK_RUN, "data.batch_size=32")
    assert code == 0, err[-3000:]
    # the two ranks really formed one group
    assert [(two_ranks / f"rank{r}.allreduce").read_text() for r in (0, 1)] == ["1.0", "1.0"]
    r0, r1 = (load_file(str(two_ranks / f"rank{r}.safetensors")) for r in (0, 1))
    single, name = _weights(one)
    assert name == "step-00000004" and single.keys() == r0.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps ranks bit-identical
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)
    run = json.loads((two_ranks / "run.json").read_text())
    assert run["world_size"] == 2
    # the logged losses (metrics.jsonl's, summary.csv's) are the global batch's, not rank 0's share of it
    logged = [
        [r["total"] for r in RunDir(d).metric_rows() if r["split"] == "train"]
        + [float((d / "summary.csv").read_text().splitlines()[1].split(",")[1])]
        for d in (two_ranks, one)
    ]
    assert len(logged[0]) == 3 and logged[0] == pytest.approx(logged[1], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_draw_their_own_random_streams(two_ranks):
    """After the model is built (the same init on every rank), each rank's global stream is its own: streams
    left seeded alike give image i of every rank's batch the same dropout and drop-path masks."""
    draws = [(two_ranks / f"rank{r}.draws").read_text() for r in (0, 1)]
    assert draws[0] != draws[1]


def test_an_epochs_last_steps_are_logged_where_log_every_steps_does_not_divide_it(tmp_path, capsys):
    """4 steps an epoch, a record every 3: step 4 ends the first epoch's window (a record never mixes
    epochs), so its loss is in a record of its own, not in none."""
    run = tmp_path / "r"
    assert (
        run_cli(
            capsys, "train", *ONE_BLOCK_RUN, "log.every_steps=3", "schedule.max_steps=8", f"run_dir={run}"
        )[0]
        == 0
    )
    assert [r["step"] for r in RunDir(run).metric_rows() if r["split"] == "train"] == [3, 4, 6, 8]


def test_a_save_every_minutes_is_taken_at_the_log_step_after_they_passed(tmp_path, capsys):
    """The clock is read at log steps (which read the device anyway), not with a host read every step."""
    run = tmp_path / "r"
    minutes = ["checkpoint.every_minutes=1e-6", "checkpoint.every_epoch=false", "checkpoint.keep_last=9"]
    argv = [*ONE_BLOCK_RUN, "log.every_steps=2", "schedule.max_steps=3", *minutes, f"run_dir={run}"]
    assert run_cli(capsys, "train", *argv)[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]


@pytest.mark.slow  # a torchrun launch of two ranks (`two_ranks`): ~10 s of start-up and training
def test_ranks_whose_clocks_disagree_save_every_minutes_together(two_ranks):
    # rank 1's clock stands still: rank 0 alone is due for checkpoint.every_minutes' save at every step, and a
    # save of rank 0's alone would meet rank 1's next collective (a hang, or a false "non-finite loss")
    assert [p.name for p in (two_ranks / "checkpoints").glob("step-*")] == ["step-00000004"]


def test_teacher_whose_token_grid_does_not_fit_the_student_is_a_clear_error(tmp_path, capsys):
    from attnxfer.checkpoints.export import ModelCardInfo, export_student
    from attnxfer.models import create_vit

    teacher = create_vit("vit_micro_patch4_28", num_classes=10, depth=2, embed_dim=48)
    export_student(teacher, tmp_path / "teacher", card=ModelCardInfo(model_name="t", license="apache-2.0"))
    code, _, err = run_cli(
        capsys,
        "train",
        f"run_dir={tmp_path / 'r'}",
        *TINY,
        "transfer.mode=copy",
        f"teacher.spec=local-dir:{tmp_path / 'teacher'}",
        "model.mirror_teacher=false",
        "model.kwargs={depth: 2, embed_dim: 48, img_size: 32}",
    )
    assert code != 0 and "Traceback" not in err
    assert "token grids differ: teacher has 7x7 patches + 1 prefix token(s), student 8x8 + 1" in err
    assert err.rstrip().endswith("for a timm ViT student, model.kwargs: img_size=28.")  # the teacher's size
    code, _, err = run_cli(  # other patches on the same images: the teacher's patch size, not a size
        capsys,
        "train",
        f"run_dir={tmp_path / 'p'}",
        *TINY,
        "transfer.mode=copy",
        f"teacher.spec=local-dir:{tmp_path / 'teacher'}",
        "model.mirror_teacher=false",
        "model.kwargs={depth: 2, embed_dim: 48, patch_size: 7}",
    )
    assert code != 0 and err.rstrip().endswith("for a timm ViT student, model.kwargs: patch_size=4."), err


@pytest.mark.slow
def test_trained_student_records_the_normalisation_it_was_trained_with(tmp_path, capsys):
    """An exported student used as a teacher must hand its training mean/std to the next run."""
    from attnxfer.data import dataset_info

    run = tmp_path / "r"
    assert (
        run_cli(capsys, "train", f"run_dir={run}", *TINY, "transfer.mode=none", "schedule.max_steps=2")[0]
        == 0
    )
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "export"))  # EMA asked, none kept
    assert code == 0, err[-2000:]
    assert err.strip().endswith("holds no EMA weights: its raw weights were exported"), err
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    info = dataset_info("animal_mnist")
    assert cfg["mean"] == list(info.mean) and cfg["std"] == list(info.std)
    from attnxfer.sources import load_teacher

    _, record = load_teacher(f"local-dir:{tmp_path / 'export'}")
    assert list(record.mean) == list(info.mean) and list(record.std) == list(info.std)


def test_a_warmup_longer_than_the_run_says_the_lr_never_reaches_its_base():
    """warmup_epochs beyond schedule.epochs: every step warms up (the lr ends at a share of the base and the
    cosine never runs), said in one line naming the keys; a warm-up within the epochs, or a smoke run cut short
    by schedule.max_steps, says nothing."""
    from dataclasses import replace

    from attnxfer.apps.run.training import long_warmup_warning
    from attnxfer.train.engine import LoopSettings, schedule_steps

    def warning(s: LoopSettings, batches: int = 4) -> str | None:
        per_epoch, total, _ = schedule_steps(range(batches), s)
        return long_warmup_warning(s, per_epoch, total)

    s = LoopSettings(run_dir=Path("run"), epochs=1, warmup_epochs=100, base_lr=2e-3)
    said = warning(s)
    assert said.startswith("warning: schedule.warmup_epochs=100 is longer than the run's schedule.epochs=1")
    assert "(400 warm-up steps, 4 in all)" in said and "to 1% of the base lr 0.002" in said
    assert "set schedule.warmup_epochs below schedule.epochs" in said and "\n" not in said
    assert warning(replace(s, warmup_epochs=1)) is None and warning(replace(s, epochs=200)) is None
    assert warning(replace(s, epochs=200, max_steps=4)) is None  # a smoke run, said as one elsewhere
    # a run capped at 150 steps inside a warm-up of 400 (MAE's 1 epoch at toy scale): it only warms up
    capped = warning(replace(s, epochs=200, max_steps=150))
    assert capped.startswith(
        "warning: schedule.warmup_epochs=100 (400 warm-up steps) is longer than the run's "
    )
    assert "schedule.max_steps=150: the lr only rises, to 38% of" in capped and "below 37.5" in capped


def test_a_conversions_stage_2_still_hears_of_a_warmup_longer_than_the_run():
    """Stage 2 fine-tunes the teacher's own weights, so "too few steps" is not said of it; a warm-up longer
    than its epochs still leaves its lr rising throughout, and is said."""
    from types import SimpleNamespace

    from attnxfer.apps.run.training import schedule_warnings
    from attnxfer.train.engine import LoopSettings, schedule_steps

    s = LoopSettings(run_dir=Path("run"), epochs=1, warmup_epochs=5, base_lr=2e-3)
    per_epoch, total, _ = schedule_steps(range(4), s)
    engine = SimpleNamespace(settings=s, steps_per_epoch=per_epoch, total_steps=total)
    few, warmup = schedule_warnings(engine)
    assert "fewer than 100" in few and "schedule.warmup_epochs=5 is longer than the run's" in warmup
    assert schedule_warnings(engine, learner=None) == [warmup]


def test_a_run_of_few_steps_says_how_many_and_which_schedule_key_gives_more():
    """12 steps (2 epochs of 6 batches) name schedule.epochs and how many epochs reach 100 steps; a
    max_steps cap names schedule.max_steps; 120 steps say nothing."""
    from dataclasses import replace

    from attnxfer.apps.run.training import few_steps_warning
    from attnxfer.train.engine import LoopSettings, schedule_steps

    def warning(s: LoopSettings, batches: int = 6) -> str | None:
        per_epoch, total, _ = schedule_steps(range(batches), s)
        return few_steps_warning(s, per_epoch, total)

    s = LoopSettings(run_dir=Path("run"), epochs=2)
    said = warning(s)
    assert said.startswith("warning: this run takes 12 optimiser steps, fewer than 100 (2 epochs of 6 steps")
    assert "raise schedule.epochs (at least 17 for 100 steps)" in said and "\n" not in said
    capped = warning(replace(s, epochs=50, max_steps=30))
    assert "30 optimiser steps" in capped and "raise schedule.max_steps" in capped
    assert "schedule.epochs" not in capped
    also_capped = warning(replace(s, max_steps=20))  # 12 steps: more epochs alone stop at the cap
    assert also_capped.endswith("; schedule.max_steps=20 caps the run below 100 too: raise it as well")
    assert warning(replace(s, epochs=20)) is None


@pytest.mark.slow  # two tiny engines, two steps each
def test_a_run_without_deterministic_after_one_with_it_in_the_same_process_is_not_deterministic():
    """torch's deterministic mode is process-wide: a notebook's second run follows its own config, not the
    deterministic one before it (slower kernels, NaN-filled empty tensors)."""
    from attnxfer.train.runtime import create_runtime

    before = torch.are_deterministic_algorithms_enabled()
    try:
        create_runtime("cpu", "fp32", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        create_runtime("cpu", "fp32", deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_the_engine_steps_as_its_drive_says_feed_stop_check_and_streams(tmp_path):
    """What varies between loops is given to the engine when it is built: its feed prepares every batch, its
    stop check is read after every step (a stop saves that step), and each step runs under its streams."""
    cfg = load_config(
        None, [f"run_dir={tmp_path / 'a'}", *TINY, "transfer.mode=none", "schedule.max_steps=2"]
    )
    fed, asked = [], []

    def feed(x, y, place):
        fed.append(place.seed)
        return own_feed(x, y, place)

    def stop():
        asked.append(1)
        return signal.SIGTERM if len(asked) == 1 else None

    streams = StudentStreams()
    engine = build_engine(cfg, drive=Drive(feed=feed, stop=stop, streams=streams))
    streams.start(engine.accelerator)
    before = streams.torch_cpu.clone()
    with pytest.raises(StopRequested):
        engine.run()
    assert len(fed) == 1 and asked == [1] and engine.saved_step == 1  # the stop saved the step it stopped at
    assert not torch.equal(
        streams.torch_cpu, before
    )  # the step drew from the engine's own streams (drop path)
