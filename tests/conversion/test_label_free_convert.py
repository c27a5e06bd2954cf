"""`attnxfer convert` of a headless teacher: the label-free stage 2 by default, no label read anywhere, a
headless encoder out that `load_student` (and plain timm, for softmax blocks) rebuilds with the same final
features, and a report of quality without labels (final-feature agreement; k-NN top-1 where the val split has
labels). How stage 2 is chosen follows a table written here; a task loss without a head stops in one line."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
from helpers import (
    QUIET,
    labels_raise_registered,
    peaked_teacher,
    run_cli,
    run_cli_reading_no_label,
    tiny_convert_report,
)
from safetensors.torch import load_file
from timm.models import save_for_hf

from attnxfer import load_student, load_teacher
from attnxfer.apps.convert.stage2 import stage2_objective, student_head
from attnxfer.apps.run.evaluation import evaluate_run
from attnxfer.apps.run.training import build_engine
from attnxfer.checkpoints.run_dir import RunDir
from attnxfer.config import load_config
from attnxfer.errors import InputError
from attnxfer.launch import cli
from attnxfer.models.efficient import build_efficient_student
from attnxfer.models.student import attention_layout

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def headless_dir(tmp_path_factory):
    """A tiny peaked ViT encoder without a head (num_classes=0, as MAE and DINO encoders are)."""
    folder = tmp_path_factory.mktemp("headless")
    save_for_hf(peaked_teacher(depth=2, num_classes=0, plain_timm=True), folder, safe_serialization=True)
    return folder


# -- how stage 2 is chosen -------------------------------------------------------------------------------------


class _Teacher(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes


#: (teacher classes, model.num_classes, data labelled, transfer.task_weight, transfer.feature_distill) ->
#: (task weight, feature weight, what stage 2 is, the student's head: None keeps the teacher's)
CHOICES = [
    ((0, None, True, None, None), (0.0, 1.0, "label-free feature distillation (the teacher is headless)", 0)),
    (
        (0, None, False, None, None),
        (0.0, 1.0, "label-free feature distillation (the teacher is headless)", 0),
    ),
    ((10, None, True, None, None), (1.0, 0.0, "labelled fine-tuning (the teacher's 10-class head)", 10)),
    (
        (10, None, False, None, None),
        (0.0, 1.0, "label-free feature distillation (the data has no labels)", None),
    ),
    ((0, 7, True, None, None), (1.0, 0.0, "labelled fine-tuning (a new 7-class head: model.num_classes)", 7)),
    (
        (10, None, True, None, 0.5),
        (1.0, 0.5, "labelled fine-tuning with feature distillation (the teacher's", 10),
    ),
    ((10, None, True, 0, None), (0.0, 1.0, "label-free feature distillation (transfer.task_weight=0)", None)),
    ((0, None, True, 0, 0), (0.0, 0.0, "label-free distillation (transfer.task_weight=0)", 0)),
    # CLIP's 16-d image projection as timm's head, on 10 classes: kept as the teacher's, not trained on them
    (
        (16, None, True, None, None),
        (
            0.0,
            1.0,
            "label-free feature distillation (the teacher's head has 16 outputs, not the data's 10",
            None,
        ),
    ),
]


@pytest.mark.parametrize("given,want", CHOICES)
def test_stage2_is_labelled_for_a_classifier_on_labels_and_label_free_otherwise(given, want):
    classes, head, labelled, task, features = given
    overrides = [f"model.num_classes={head}"] if head else []
    overrides += [f"transfer.task_weight={task}"] if task is not None else []
    overrides += [f"transfer.feature_distill={features}"] if features is not None else []
    cfg = load_config(None, overrides)
    choice = stage2_objective(cfg, _Teacher(classes), labelled, 10)
    assert (choice.task_weight, choice.feature_distill) == want[:2]
    assert choice.describe().startswith(want[2]), choice.describe()
    assert student_head(cfg, _Teacher(classes), choice, 10) == want[3]


def test_a_headless_teacher_with_a_task_loss_and_no_head_says_the_two_ways_out():
    cfg = load_config(None, ["transfer.task_weight=1"])
    choice = stage2_objective(cfg, _Teacher(0), True, 10)
    with pytest.raises(InputError, match=r"model.num_classes=K .* or transfer.task_weight=0"):
        student_head(cfg, _Teacher(0), choice, 10)


def test_a_new_head_that_stage_2_would_never_train_is_refused():
    """A headless teacher's student given model.num_classes on unlabelled data: the head would be exported
    as it was drawn at random; the message says why stage 2 has no task loss, not a key the user did not set."""
    for labelled, overrides, why in (
        (False, [], r"\(the data has no labels\)"),
        (True, ["transfer.task_weight=0"], r"\(transfer.task_weight=0\)"),
    ):
        cfg = load_config(None, ["model.num_classes=7", *overrides])
        choice = stage2_objective(cfg, _Teacher(0), labelled, 10)
        with pytest.raises(
            InputError, match=rf"model.num_classes=7 .* {why} never trains: drop model.num_classes"
        ):
            student_head(cfg, _Teacher(0), choice, 10)


def _convert_args(run, teacher_dir, *extra: str) -> list[str]:
    return [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher_dir}",
        "data.batch_size=8",
        "convert.attention=relu_linear",
        "convert.stage1_train=qk",
        "convert.stage1_steps=2",
        *tiny_convert_report(1, 2),
        "eval.knn_bank_size=16",
        "transfer.mode=none",
        "schedule.epochs=1",
        "schedule.max_steps=2",
        "model.drop_path_rate=0",
        *QUIET,
        *extra,
    ]


@pytest.mark.slow  # loads the teacher first: ~1.5 s of CPU
def test_a_task_loss_for_a_headless_teacher_without_a_head_stops_before_work(tmp_path, headless_dir, capsys):
    run = tmp_path / "run"
    code, _, lines = run_cli_reading_no_label(
        capsys,
        "convert",
        *_convert_args(run, headless_dir, "data.dataset=synthetic", "transfer.task_weight=1"),
    )
    assert (
        code == 2 and len(lines) == 1 and lines[0].startswith("attnxfer convert: error: the teacher has no")
    )
    assert "model.num_classes=K" in lines[0] and "transfer.task_weight=0" in lines[0] and not run.exists()


# -- end to end --------------------------------------------------------------------------------------------------


def _final_weights(stage2) -> dict:
    return load_file(str(sorted((stage2 / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


@pytest.mark.slow  # a conversion (2 + 2 steps, four measurements) and an export: ~5 s of CPU
def test_label_free_conversion_reads_no_label_and_exports_a_headless_encoder(tmp_path, headless_dir, capsys):
    run, out = tmp_path / "run", tmp_path / "export"
    with labels_raise_registered():
        code, printed, err = run_cli_reading_no_label(
            capsys,
            "convert",
            *_convert_args(run, headless_dir, "data.dataset=labels_raise", "data.labels=false"),
        )
    assert code == 0, err
    assert "by label-free feature distillation (the teacher is headless)" in printed
    assert "feature distillation: weight 1" in printed and "task loss: none" in printed
    report = json.loads((run / "report.json").read_text())
    assert report["stage2"]["objective"] == "label-free feature distillation (the teacher is headless)"
    assert (report["stage2"]["task_weight"], report["stage2"]["feature_distill"]) == (0.0, 1.0)
    assert report["student"]["num_classes"] == 0 and report["data"]["labels"] is False
    assert all(v is None for v in report["top1"].values()) and report["knn"] is None
    for stage in ("before_stage1", "after_stage1", "after_stage2"):
        features = report["features"][stage]
        assert set(features) == {
            "feat_cos_prefix",
            "feat_rel_err_prefix",
            "feat_cos_patch",
            "feat_rel_err_patch",
        }
        assert -1 <= features["feat_cos_patch"] <= 1 and features["feat_rel_err_patch"] >= 0
    md = (run / "report.md").read_text()
    assert "## Final-feature agreement with the teacher" in md and "| student after stage 2 |" in md
    assert "None: the data has no labels" in md and "k-NN top-1" not in md
    stage2 = json.loads((run / "stage2" / "run.json").read_text())
    assert stage2["best_metric"] == "val_feat_cos_patch" and stage2["num_classes"] == 0
    assert (
        cli.main(["export", str(run / "stage2"), str(out), "--weights", "raw", "--checkpoint", "latest"]) == 0
    )
    exported = load_student(f"local-dir:{out}").eval()
    assert exported.num_classes == 0
    teacher, _ = load_teacher(f"local-dir:{headless_dir}")
    rebuilt = build_efficient_student(teacher, "relu_linear").eval()
    rebuilt.load_state_dict(_final_weights(run / "stage2"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.forward_features(x), rebuilt.forward_features(x))
        assert torch.equal(exported(x), rebuilt(x))  # headless: the output is the pooled feature
    # eval of stage 2's config scores the converted (relu_linear) student the run trained, although that
    # config records convert.attention and no model.attention: a softmax student would take its weights silently
    built = {}

    def build(cfg, found):
        built["engine"] = build_engine(cfg, scoring=True, found=found)
        return built["engine"]

    with labels_raise_registered():  # the run's dataset; its labels stay unread here too
        evaluate_run(load_config(str(run / "stage2" / "config.yaml"), []), build=build)
    scored = built["engine"].student.eval()
    assert attention_layout(scored) == ["relu_linear", "relu_linear"]
    with torch.no_grad():
        assert torch.equal(scored.forward_features(x), rebuilt.forward_features(x))


@pytest.mark.slow  # a conversion (2 + 2 steps, four measurements): ~4 s of CPU
def test_the_report_after_stage_2_measures_the_student_an_export_gives(tmp_path, headless_dir, capsys):
    """With EMA an export takes the best checkpoint's EMA weights: the report's figures after stage 2 are
    that student's (stage 2's own evaluation of it), not those of the raw weights the last step left."""
    run = tmp_path / "run"
    extra = ("data.dataset=synthetic", "data.labels=false", "ema.decay=0.5")
    code, _, err = run_cli(capsys, "convert", *_convert_args(run, headless_dir, *extra))
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    rows = RunDir(run / "stage2").metric_rows()
    best = max((r for r in rows if r["split"] == "val"), key=lambda r: r["ema_val_feat_cos_patch"])
    measured = report["features"]["after_stage2"]["feat_cos_patch"]
    assert measured == pytest.approx(best["ema_val_feat_cos_patch"], abs=1e-6)
    assert measured != pytest.approx(best["val_feat_cos_patch"], abs=1e-6)  # the raw weights score otherwise
    assert "ema weights, as `attnxfer export` takes them" in (run / "report.md").read_text()


@pytest.mark.slow  # a conversion without stage 1, k-NN at three stages, an export: ~4 s of CPU
def test_labelled_val_split_gives_knn_rows_and_a_softmax_encoder_exports_to_plain_timm(
    tmp_path, headless_dir, capsys
):
    run, out = tmp_path / "run", tmp_path / "export"
    args = _convert_args(run, headless_dir, "data.dataset=synthetic", "data.kwargs.length=48")
    code, _, err = run_cli_reading_no_label(
        capsys, "convert", *args, "convert.attention=softmax", "--skip-stage1"
    )
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["student"]["num_classes"] == 0 and report["top1"]["after_stage2"] is None
    knn = report["knn"]
    assert knn["after_stage1"] is None
    for stage in ("before_stage1", "after_stage2"):
        row = knn[stage]
        # eval.knn_k is 20, but a bank of 16 images votes with 16
        assert row["knn_count"] == 48 and row["knn_k"] == 16 and row["knn_bank"] == 16
        assert row["knn_top1_low"] <= row["knn_top1"] <= row["knn_top1_high"]
        assert row["knn_share"] == pytest.approx(row["knn_top1"] / row["knn_teacher_top1"])
    # weights swapped in for softmax = the teacher itself: identical embeddings, identical k-NN top-1
    assert knn["before_stage1"]["knn_top1"] == knn["before_stage1"]["knn_teacher_top1"]
    assert report["features"]["before_stage1"]["feat_cos_patch"] == pytest.approx(1.0)
    md = (run / "report.md").read_text()
    assert "## k-NN top-1 (validation, no head needed)" in md and "k = 16, temperature 0.07" in md
    assert f"| student after stage 2 | {knn['after_stage2']['knn_top1']:.2f} |" in md
    assert "None: the student is a headless encoder" in md
    assert (
        cli.main(["export", str(run / "stage2"), str(out), "--weights", "raw", "--checkpoint", "latest"]) == 0
    )
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours = load_student(f"local-dir:{out}").eval()
    assert plain.num_classes == ours.num_classes == 0
    assert type(plain.blocks[0].attn) is timm.layers.Attention
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), ours.forward_features(x))


def test_a_task_loss_on_a_head_of_other_classes_is_refused_with_the_key_that_converts_it():
    """A teacher's head of other outputs than the data's classes (a transformers ViTForImageClassification, or
    CLIP's projection as timm's head) with a task loss asked for: the refusal says which config key converts
    it, not a Python argument."""
    cfg = load_config(None, ["transfer.task_weight=1"])
    choice = stage2_objective(cfg, _Teacher(16), True, 10)
    with pytest.raises(InputError, match=r"16 outputs but the data has 10 classes.*transfer.task_weight=0"):
        student_head(cfg, _Teacher(16), choice, 10)
