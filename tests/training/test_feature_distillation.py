"""What teacher and student hand over is typed, and feature distillation rides on it.

The vocabulary: every registered transfer mode borrows and distils what a table written here says, as
`Signal`s. Feature distillation in `TeacherStudent`: the loss equals `feature_distill_loss` of the two models' own
``forward_features`` (the teacher runs whole, the student once), beside attention distillation unchanged.
The objective without a task loss reads no label; a `train` run with ``transfer.task_weight=0`` on a dataset
whose labels raise lowers its feature loss, logs its terms (the first step's equal to the loss computed by
hand on that batch) and is scored by feature agreement; bad combinations stop in one line before any work.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    QUIET,
    labels_raise_registered,
    peaked_teacher,
    run_cli,
    run_cli_reading_no_label,
    tiny_run,
    tiny_vit,
)
from timm.models import save_for_hf

from attnxfer.apps.run.evaluation import eval_metrics, evaluate_run
from attnxfer.apps.run.training import build_engine, plan_from_config, task_loss_from_config
from attnxfer.checkpoints.export import export_run
from attnxfer.checkpoints.run_dir import RunDir
from attnxfer.config import load_config
from attnxfer.errors import InputError
from attnxfer.models import AttentionIO, Chunks, Signal
from attnxfer.train.objective import TaskLoss, TransferObjective
from attnxfer.transfer import MODES, PlanError, TeacherStudent, build_plan
from attnxfer.transfer.feature_loss import feature_distill_loss

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# -- the vocabulary -----------------------------------------------------------------------------------------

#: mode -> (what its student borrows from the teacher, what it distils), written out by hand
MODE_TABLE = {
    "none": ((), None),
    "copy": ((Signal.Q, Signal.K), None),
    "copy_q": ((Signal.Q,), None),
    "copy_k": ((Signal.K,), None),
    "copy_v": ((Signal.V,), None),
    "distill": ((), Signal.MAPS),
    "distill_q": ((), Signal.Q),
    "distill_k": ((), Signal.K),
    "distill_v": ((), Signal.V),
}
#: what each transferred teacher layer then hands over: the borrowed projections, or what the distilled
#: signal is made of (maps: q and k)
HANDED_OVER = {
    "none": (),
    "copy": (Signal.Q, Signal.K),
    "copy_q": (Signal.Q,),
    "copy_k": (Signal.K,),
    "copy_v": (Signal.V,),
    "distill": (Signal.Q, Signal.K),
    "distill_q": (Signal.Q,),
    "distill_k": (Signal.K,),
    "distill_v": (Signal.V,),
}


def test_every_registered_mode_borrows_and_distils_what_the_table_says():
    assert set(MODES) == set(MODE_TABLE)
    for name, (borrow, distill) in MODE_TABLE.items():
        mode = MODES[name]
        assert tuple(mode.borrow) == borrow and all(type(c) is Signal for c in mode.borrow), name
        assert mode.distill is distill, name
        assert tuple(mode.chunks) == HANDED_OVER[name], name
        assert mode.teacher_at_eval == bool(borrow) and mode.moves_nothing == (name == "none")


def test_chunks_are_typed_sets_of_projections_that_print_as_the_config_letters():
    assert Chunks(Signal.MAPS) == (Signal.Q, Signal.K) == Chunks("kq") == Chunks(["k", Signal.Q])
    assert str(Chunks(Signal.MAPS)) == "qk" and repr(Chunks("v")) == "'v'" and Chunks("") == ()
    assert AttentionIO(capture=Signal.MAPS).capture == (Signal.Q, Signal.K)
    for not_a_projection in (Signal.OUTPUT, Signal.FEATURES, "input"):
        with pytest.raises(ValueError, match="not made of q/k/v projections"):
            Chunks(not_a_projection)


# -- feature distillation in TeacherStudent --------------------------------------------------------------------------


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", ["none", "distill"])
def test_feature_distillation_is_the_loss_of_both_models_own_final_tokens(mode):
    """The loss is `feature_distill_loss` of ``forward_features`` of each model (the student's taken from the
    forward that gives its logits, one patch embedding call; the teacher run to its last block), weighted;
    beside map distillation the attention terms are those of a run without features."""
    teacher, x = (
        peaked_teacher(depth=2),
        torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    )
    student = tiny_vit(depth=2, seed=2)
    plan = build_plan(teacher, student, mode, feature_weight=0.5, task_weight=0.0)
    assert {c.signal: c.weight for c in plan.comparisons}[Signal.FEATURES] == 0.5
    pair = TeacherStudent(teacher, student, plan).train()
    student_embeds, teacher_last = _count_calls(student.patch_embed), _count_calls(teacher.blocks[-1])
    out = pair(x)
    assert student_embeds[0] == 1 and teacher_last[0] == 1
    with torch.no_grad():
        ref = feature_distill_loss(student.forward_features(x), teacher.forward_features(x), 1)
        torch.testing.assert_close(out.logits, student(x))
    for key, value in ref.terms.items():
        torch.testing.assert_close(out.terms[key], value)
    assert {"feat_cos/prefix", "feat_cos/patch", "feat_smooth_l1/prefix", "feat_smooth_l1/patch"} <= set(
        out.terms
    )
    if mode == "none":
        torch.testing.assert_close(out.loss, 0.5 * ref.total)
        return
    alone = TeacherStudent(teacher, copy.deepcopy(student), build_plan(teacher, student, mode)).train()(x)
    attention = [k for k in out.terms if k.startswith("attn_ce/")]
    assert attention == ["attn_ce/0", "attn_ce/1"]
    for key in attention:
        torch.testing.assert_close(out.terms[key], alone.terms[key])
    torch.testing.assert_close(out.loss, alone.loss + 0.5 * ref.total)


def test_an_objective_without_a_task_loss_never_touches_the_labels():
    teacher, student = peaked_teacher(depth=2), tiny_vit(depth=2, seed=2, num_classes=0)
    pair = TeacherStudent(
        teacher, student, build_plan(teacher, student, "none", feature_weight=1.0, task_weight=0.0)
    )
    never = TaskLoss(lambda *_: pytest.fail("the task loss ran"), mixup=lambda *_: pytest.fail("mixup ran"))
    objective = TransferObjective(pair.train(), never)
    x, y = objective.prepare(torch.randn(2, 3, 32, 32), None, seed=0)
    out = objective.loss(pair, x, y, contextlib.nullcontext)
    assert "task" not in out.terms and out.total is out.terms["transfer"] and out.total.requires_grad
    labelled = build_plan(teacher, tiny_vit(depth=2, seed=2), "none", feature_weight=1.0)
    objective = TransferObjective(TeacherStudent(teacher, tiny_vit(depth=2, seed=2), labelled), never)
    with pytest.raises(ValueError, match="needs labels"):
        objective.loss(objective.module, torch.randn(2, 3, 32, 32), None, contextlib.nullcontext)


def test_the_plan_says_what_is_distilled_with_which_loss_and_weight_and_refuses_what_cannot_be():
    teacher = peaked_teacher(depth=2)
    said = build_plan(
        teacher, tiny_vit(depth=2, seed=2), "none", feature_weight=2.0, task_weight=0.0
    ).describe()
    assert "feature distillation: weight 2, final token features after the final norm" in said
    assert "cosine distance + smooth-L1" in said and "task loss: none (transfer.task_weight=0" in said
    assert "feature" not in build_plan(teacher, tiny_vit(depth=2, seed=2), "none").describe()
    with pytest.raises(PlanError, match="needs a teacher"):
        build_plan(None, tiny_vit(depth=2), "none", feature_weight=1.0)
    with pytest.raises(PlanError, match="teacher's have 48 channels, the student's 24.*embed_dim"):
        build_plan(teacher, tiny_vit(depth=2, embed_dim=24), "none", feature_weight=1.0)
    with pytest.raises(PlanError, match="token grids differ"):
        build_plan(teacher, tiny_vit(depth=2, patch_size=16), "none", feature_weight=1.0)
    with pytest.raises(PlanError, match="nothing to train"):
        build_plan(teacher, tiny_vit(depth=2), "none", task_weight=0.0)
    with pytest.raises(
        PlanError, match=r"nothing to train.*every comparison \(mode 'distill'\) has weight 0"
    ):
        build_plan(
            teacher, tiny_vit(depth=2), "distill", task_weight=0.0, weight=0.0
        )  # a loss of 0 each step


def test_mixup_without_a_task_loss_is_said_to_be_unused(capsys):
    teacher = peaked_teacher(depth=2)
    parts = SimpleNamespace(teacher=teacher, student=tiny_vit(depth=2, seed=2))
    overrides = ["teacher.spec=x", "transfer.mode=none", "transfer.feature_distill=1", "aug.cutmix=1.0"]
    plan_from_config(load_config(None, [*overrides, "transfer.task_weight=0"]), parts)
    assert "aug.mixup/cutmix unused with transfer.task_weight=0" in capsys.readouterr().err
    plan_from_config(load_config(None, overrides), parts)  # with a task loss the images are mixed
    assert "aug.mixup" not in capsys.readouterr().err


def test_mixup_on_an_odd_batch_is_refused_naming_the_batch_size():
    """timm's Mixup pairs each image with its mirror in the batch and asserts an even batch, mid-training."""
    with pytest.raises(InputError, match=r"data.batch_size \(per process\) must be even, got 7"):
        task_loss_from_config(load_config(None, ["aug.mixup=0.8", "data.batch_size=7"]), 10)
    assert task_loss_from_config(load_config(None, ["aug.mixup=0.8", "data.batch_size=8"]), 10).mixup


@pytest.mark.parametrize("feature_weight", [0.0, 1.0])
def test_a_copy_plan_without_a_task_loss_is_refused_as_its_student_alone_is_not_the_model(feature_weight):
    """Refused as the plan is built, told to set a task loss: not feature distillation, which does not make a
    copy student's features the model (a task-free run's advice, which a copy run was given)."""
    teacher, student = peaked_teacher(depth=2), tiny_vit(depth=2, seed=2)
    with pytest.raises(PlanError, match="transfer.mode=copy needs a task loss") as refused:
        build_plan(teacher, student, "copy", feature_weight=feature_weight, task_weight=0.0)
    assert "task_weight > 0" in str(refused.value) and "feature_distill" not in str(refused.value)


# -- train: feature distillation without labels ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    save_for_hf(peaked_teacher(depth=2, plain_timm=True), folder, safe_serialization=True)
    return folder


def _train_args(run, teacher_dir, *extra: str) -> list[str]:
    return [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher_dir}",
        "data.dataset=labels_raise",
        "data.batch_size=8",
        "transfer.mode=none",
        "transfer.feature_distill=1",
        "transfer.task_weight=0",
        "model.drop_path_rate=0",
        "optim.lr=3e-3",
        "schedule.warmup_epochs=0",
        "schedule.epochs=3",
        "log.every_steps=1",
        *QUIET,
        "ema.decay=0.9",
        *extra,
    ]


def test_train_distils_features_without_reading_a_label(tmp_path, teacher_dir):
    """On a dataset whose labels raise: the logged first step equals the loss computed by hand on that batch,
    the feature loss falls, every evaluation (the EMA's too) is feature agreement, the best is the EMA's highest
    patch cosine, and the run's student rebuilds headless."""
    run = tmp_path / "run"
    with labels_raise_registered():
        engine = build_engine(load_config(None, _train_args(run, teacher_dir)))
        teacher, before = engine.module.teacher, copy.deepcopy(engine.student).eval()
        engine.train_sampler.set_epoch(0)
        engine.train_sampler.set_position(0)
        (x,) = next(iter(engine.train_loader))
        with torch.no_grad():
            first = feature_distill_loss(before.forward_features(x), teacher.forward_features(x), 1)
        result = engine.run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[0]["step"] == 1 and "task" not in train_rows[0]
    for key, value in first.terms.items():
        assert train_rows[0][key] == pytest.approx(value.item(), rel=1e-5), key
    assert train_rows[0]["total"] == pytest.approx(first.total.item(), rel=1e-5)
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t = teacher.float().forward_features(probe)
        start = feature_distill_loss(before.forward_features(probe), t, 1).total
        end = feature_distill_loss(engine.student.eval().forward_features(probe), t, 1).total
    assert end < 0.8 * start, (start, end)
    evals = [r for r in rows if r["split"] == "val"]
    assert len(evals) == 3 and all("val_feat_cos_patch" in r and "ema_val_feat_cos_patch" in r for r in evals)
    # ranked by the EMA's agreement: its weights are what load_student and export take by default
    assert result.metric == "ema_val_feat_cos_patch" and result.best == max(
        r["ema_val_feat_cos_patch"] for r in evals
    )
    record = json.loads((run / "run.json").read_text())
    assert (record["best_metric"], record["best_mode"], record["num_classes"]) == (
        "ema_val_feat_cos_patch",
        "max",
        0,
    )
    loaded = RunDir(run).load_student(weights="raw")
    assert loaded.model.num_classes == 0 and "best EMA feat_cos_patch" in loaded.why


@pytest.mark.slow  # a short training run and its export
def test_the_card_of_a_run_without_a_task_loss_lists_its_data_as_read_without_labels(tmp_path, teacher_dir):
    """data.labels: true (the loaders hand labels out) but transfer.task_weight=0 reads none: the card's
    training data said labels: true, as if the student had learnt from labelled data."""
    run = tmp_path / "run"
    with labels_raise_registered():
        build_engine(load_config(None, _train_args(run, teacher_dir, "schedule.max_steps=1"))).run()
    card = (export_run(run, tmp_path / "export") / "README.md").read_text()
    data = card.split("## Training data", 1)[1].split("## Metrics", 1)[0]
    assert "no label was read in training" in data and "labels: false" in data and "labels: true" not in data


# -- bad input: one line, before any work ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,extra,says",
    [
        (
            "train",
            ["transfer.task_weight=1"],
            r"the task loss \(cross-entropy of the student's logits\) needs labels.*set transfer.task_weight=0",
        ),
        ("train", ["eval.metrics=[knn]"], "eval.metrics=knn needs labels"),
        ("convert", ["eval.metrics=[top1]"], "eval.metrics=top1 needs labels"),
        ("convert", ["transfer.task_weight=0.5"], "task loss .* needs labels.*set transfer.task_weight=0"),
        # not task_weight=0, which a copy student (no score but its task loss's) is refused in turn
        (
            "train",
            ["transfer.mode=copy", "transfer.task_weight=1"],
            r"needs labels.*; use labelled data, or transfer.mode=distill",
        ),
    ],
    ids=["train-task", "train-knn", "convert-top1", "convert-task", "train-copy"],
)
def test_label_work_on_data_without_labels_stops_in_one_line(
    command, extra, says, tmp_path, teacher_dir, capsys
):
    run = tmp_path / "run"
    args = _train_args(run, teacher_dir, "data.labels=false", *extra)
    with labels_raise_registered():
        code, _, lines = run_cli_reading_no_label(capsys, command, *args)
    assert code == 2 and lines[-1].startswith(f"attnxfer {command}: error: "), lines
    assert re.search(says, lines[-1]) and not run.exists(), lines[-1]


def test_eval_of_a_run_without_a_task_loss_scores_features_and_knn_but_no_head():
    cfg = load_config(
        None, ["teacher.spec=local-dir:unused", "data.dataset=synthetic", "transfer.task_weight=0"]
    )
    assert eval_metrics(cfg) == {"features", "knn"}
    with pytest.raises(InputError, match="eval.metrics=top1: this run has no task loss"):
        eval_metrics(load_config(None, ["teacher.spec=x", "transfer.task_weight=0", "eval.metrics=[top1]"]))


@pytest.mark.parametrize(
    "extra,says",
    [
        (
            ["eval.metrics=[features]", "transfer.mode=none"],
            "compares the student's final features with its teacher's, and this run has no",
        ),
        (
            ["teacher.spec=local-dir:T", "transfer.mode=copy", "eval.metrics=[knn]"],
            "eval.metrics=['knn']: a transfer.mode=copy student attends with its teacher's maps",
        ),
    ],
    ids=["features-without-teacher", "knn-of-copy"],
)
def test_a_metric_the_run_cannot_give_is_refused_before_it_trains(extra, says, tmp_path, capsys):
    """Not after the run, by the `attnxfer eval` of it: a train's config is judged as eval would judge it."""
    code, _, err = run_cli(capsys, "train", f"run_dir={tmp_path / 'run'}", *tiny_run(16, 8), *extra)
    assert code == 2 and says in err and not (tmp_path / "run").exists(), err


@pytest.mark.slow  # trains a short run, then scores it: ~4 s of CPU
def test_eval_of_a_run_without_a_task_loss_reads_the_labels_its_knn_needs(tmp_path, teacher_dir):
    """The run read no label, but scoring it on labelled data gives k-NN top-1 beside feature agreement."""
    args = [
        a
        for a in _train_args(tmp_path / "run", teacher_dir)
        if not a.startswith(("data.dataset", "schedule"))
    ]
    args += ["data.dataset=synthetic", "schedule.warmup_epochs=0", "schedule.epochs=1"]
    build_engine(load_config(None, args)).run()
    metrics = evaluate_run(load_config(None, args)).metrics
    assert {"val_feat_cos_patch", "knn_top1", "knn_teacher_top1"} <= set(metrics), metrics
    assert "val_top1" not in metrics and 0 <= metrics["knn_top1"] <= 100


@pytest.mark.slow  # trains a short run without labels, then scores it: ~4 s of CPU
def test_eval_scores_a_run_trained_without_labels_by_knn_on_the_labelled_split(tmp_path, teacher_dir):
    """A run trained on data.labels=false is scored with data.labels=true: eval trains nothing, so turning the
    labels on is not a resume that changes the checkpoint's meaning, and k-NN top-1 needs them."""
    args = [
        a
        for a in _train_args(tmp_path / "run", teacher_dir)
        if not a.startswith(("data.dataset", "schedule"))
    ]
    args += ["data.dataset=synthetic", "schedule.warmup_epochs=0", "schedule.epochs=1"]
    build_engine(load_config(None, [*args, "data.labels=false"])).run()
    metrics = evaluate_run(load_config(None, [*args, "data.labels=true", "eval.metrics=[knn]"])).metrics
    assert {"knn_top1", "knn_teacher_top1", "knn_share"} <= set(metrics), metrics
    assert 0 <= metrics["knn_top1"] <= 100
