"""What `attnxfer convert` prints is true: a headless (MAE) teacher has no top-1, so no
"teacher val top-1 None" and no "n/a% of the teacher's"; stage 2 says it fine-tunes the converted student
(it is not a from-scratch baseline)."""

from __future__ import annotations

import json

import pytest
from helpers import peaked_teacher, tiny_convert_report, tiny_run
from timm.models import save_for_hf

from attnxfer.apps.convert.report import conversion_summary, teacher_near_chance
from attnxfer.launch.cli import main


@pytest.fixture(scope="module")
def headless_teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mae_like")
    save_for_hf(peaked_teacher(depth=2, num_classes=0, plain_timm=True), folder, safe_serialization=True)
    return folder


@pytest.mark.slow  # a whole conversion (2 stage-1 steps, 1 stage-2 step)
def test_convert_with_a_headless_teacher_says_what_is_true(tmp_path, headless_teacher_dir, capsys):
    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{headless_teacher_dir}",
        *tiny_run(32, 16),
        "convert.attention=hedgehog",
        "convert.stage1_steps=2",
        "schedule.epochs=1",
        "schedule.max_steps=1",
        "transfer.mode=none",
        "transfer.logit_distill=0",
        "model.num_classes=10",  # a new head: the labelled stage 2 (without it, the student stays headless)
        *tiny_convert_report(1, 2),
    ]
    assert main(["convert", *args]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert (
        "teacher val top-1: none (the teacher has no classifier head of the data's classes (e.g. an MAE"
        in out
    )
    assert "None" not in "\n".join(line for line in lines if "top-1" in line)
    [stage2] = [line for line in lines if line.startswith("stage 2:")]
    assert stage2.startswith(
        "stage 2: fine-tunes the converted student end to end (the teacher's weights after stage 1"
    )
    assert "from-scratch" not in out and "mode=none (no attention transfer)" in stage2
    [done] = [line for line in lines if line.startswith("done:")]
    report = json.loads((run / "report.json").read_text())
    assert report["top1"]["teacher"] is None and report["recovered_pct"] is None
    student = report["student_top1"]
    assert done.startswith(f"done: student top-1 {student:.2f} (the teacher has no classifier head")
    assert "n/a" not in done and "% of the teacher's" not in done
    md = (run / "report.md").read_text()
    assert "| teacher (softmax) | none (no classifier head) |" in md
    assert "Recovered: not defined: the teacher has no classifier head" in md and "—%" not in md
    # run again with a stage-1 learning rate its stage 1 was not fitted with: refused, its config.yaml as it was,
    # before the teacher is measured (on ImageNet, minutes of work the refusal would throw away)
    config = (run / "config.yaml").read_text()
    assert main(["convert", *args, "convert.stage1_lr=0.5"]) == 2
    out, err = capsys.readouterr()
    assert "nothing was written" in err and (run / "config.yaml").read_text() == config
    assert err.rstrip().endswith(f"(its config: {run / 'config.yaml'})"), err  # not a stage-1 checkpoint's
    assert "teacher val top-1" not in out and "before stage 1:" not in out, out


@pytest.mark.slow  # a whole conversion (2 stage-1 steps, 1 stage-2 step)
def test_a_teacher_head_of_other_outputs_than_the_datas_classes_scores_no_top1(tmp_path, capsys):
    """CLIP's projection (timm's head) or another label set's classifier, converted label-free on labelled data:
    its argmax is no class of the data, so neither teacher nor student has a top-1 (not a chance-level one)."""
    folder = tmp_path / "teacher"
    save_for_hf(peaked_teacher(depth=2, num_classes=16, plain_timm=True), folder, safe_serialization=True)
    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{folder}",
        *tiny_run(32, 16),
        "convert.attention=hedgehog",
        "convert.stage1_steps=2",
        "schedule.max_steps=1",
        "transfer.task_weight=0",
        *tiny_convert_report(1, 2),
    ]
    assert main(["convert", *args]) == 0
    assert (
        "teacher val top-1: none (the teacher has no classifier head of the data's" in capsys.readouterr().out
    )
    report = json.loads((run / "report.json").read_text())
    assert report["top1"]["teacher"] is None and report["student_top1"] is None


@pytest.mark.parametrize(
    "option, said",
    [
        ("feature_dim=-3", "feature_dim must be >= 1, got -3"),  # refused by the attention itself
        (
            "feature_dim=abc",
            "convert.attention_kwargs: feature_dim must be an integer or None (null in a config) for hedgehog",
        ),
    ],
)
def test_an_attention_option_value_it_cannot_be_built_with_is_one_line(
    tmp_path, headless_teacher_dir, capsys, option, said
):
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"teacher.spec=local-dir:{headless_teacher_dir}",
        *tiny_run(32, 16),
    ]
    code = main(["convert", *args, "convert.attention=hedgehog", f"convert.attention_kwargs.{option}"])
    err = capsys.readouterr().err
    assert code == 2 and said in err, err
    assert "Traceback" not in err


def test_top1_of_a_run_without_a_task_loss_is_refused_before_any_work(tmp_path, headless_teacher_dir, capsys):
    """A headless teacher's stage 2 has no task loss (convert resolves it), nor has a train run at
    transfer.task_weight=0: no head is trained, so a top-1 asked for stops at the start, not in a later eval,
    saying why there is no task loss (not a transfer.task_weight=0 convert's user never set)."""
    base = [f"teacher.spec=local-dir:{headless_teacher_dir}", *tiny_run(32, 16), "eval.metrics=[top1]"]
    for command, extra, why in (
        ("convert", [], "the teacher is headless"),
        ("train", ["transfer.task_weight=0"], "transfer.task_weight=0"),
    ):
        run = tmp_path / command
        assert main([command, f"run_dir={run}", *base, *extra]) == 2
        out, err = capsys.readouterr()
        said = f"eval.metrics=top1: this run has no task loss ({why}), so no head was trained"
        assert said in err and not (run / "config.yaml").exists(), err
        assert "teacher val top-1" not in out, out


def test_a_default_size_too_large_for_the_grid_is_named_under_the_options_key(
    tmp_path, headless_teacher_dir, capsys
):
    """nystrom's default 32 landmarks on the teacher's 17 tokens: refused as a value the user set would be,
    naming the key that sets it (a zoo attention in train too)."""
    base = [f"teacher.spec=local-dir:{headless_teacher_dir}", *tiny_run(32, 16)]
    assert main(["convert", f"run_dir={tmp_path / 'c'}", *base, "convert.attention=nystrom"]) == 2
    said = "attention_kwargs: num_landmarks 32 is larger than the 4x4 token grid (17 tokens with the prefix)"
    assert f"convert.{said}" in capsys.readouterr().err
    assert main(["train", f"run_dir={tmp_path / 't'}", *base, "model.attention=nystrom"]) == 2
    assert f"model.{said}" in capsys.readouterr().err
    # a formula's window is set by the attention's name, not an option: named under that key
    assert (
        main(["train", f"run_dir={tmp_path / 'w'}", *base, "model.attention=formula:sum(relu+win(9))"]) == 2
    )
    assert "model.attention: win 9 is larger than the 4x4 token grid" in capsys.readouterr().err


def test_a_linformer_seq_len_other_than_the_models_token_count_is_refused_before_the_teacher_is_measured(
    tmp_path, headless_teacher_dir, capsys
):
    """seq_len given for another size (a recipe's, at another data.img_size): refused where the student is
    built, naming the key, not at its first image after the teacher's evaluation (minutes on a real one)."""
    base = [f"teacher.spec=local-dir:{headless_teacher_dir}", *tiny_run(32, 16)]
    options = "attention_kwargs={seq_len: 64, proj_len: 8}"
    said = "attention_kwargs: seq_len 64 is not the model's 17 tokens (1 prefix + 4x4 grid)"
    for command, key in (("convert", "convert"), ("train", "model")):
        argv = [
            command,
            f"run_dir={tmp_path / command}",
            *base,
            f"{key}.attention=linformer",
            f"{key}.{options}",
        ]
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert f"{key}.{said}" in err and "set it to 17" in err, err
        assert "teacher val top-1" not in out, out


def test_a_linformer_seq_len_for_another_size_is_refused_where_a_teacher_of_any_size_is_built(
    tmp_path, capsys
):
    """A dynamic_img_size teacher (recall/convert_zoo's) has no grid of its own: a seq_len for another size is
    checked against the tokens of data.img_size (1 prefix + 8x8 at 64 px), not met at the first image."""
    teacher = tmp_path / "teacher"
    save_for_hf(
        peaked_teacher(depth=2, plain_timm=True, dynamic_img_size=True), teacher, safe_serialization=True
    )
    argv = [f"run_dir={tmp_path / 'run'}", f"teacher.spec=local-dir:{teacher}", *tiny_run(32, 16)]
    options = ["data.img_size=64", "convert.attention=linformer", "convert.attention_kwargs={seq_len: 17}"]
    assert main(["convert", *argv, *options]) == 2
    out, err = capsys.readouterr()
    assert (
        "convert.attention_kwargs: seq_len 17 is not the model's 65 tokens" in err and "set it to 65" in err
    ), err
    assert "teacher val top-1" not in out, out


def test_summary_with_a_classifier_teacher_gives_the_share():
    report = {
        "top1": {"teacher": 80.0, "before_stage1": 10.0, "after_stage1": 60.0, "after_stage2": 72.0},
        "student_top1": 72.0,
        "recovered_pct": 90.0,
        "speed": {"speedup": 1.5},
        "run_dir": "runs/x",
    }
    assert conversion_summary(report) == (
        "done: teacher top-1 80.00, student top-1 72.00 (90.00% of the teacher's), speed 1.50x -> runs/x/report.md"
    )
    withheld = {**report, "speed": {"speedup": 1.5, "speedup_withheld": "rounds on both sides of 1"}}
    assert conversion_summary(withheld).endswith(", speed withheld (see the report) -> runs/x/report.md")


def test_a_teacher_under_twice_chance_is_said_to_be_trained_on_other_data():
    """A recall teacher read with another seed's glyphs scores about chance: its students could only learn that."""
    said = teacher_near_chance(11.0, 10)
    assert said is not None and said.startswith(
        "the teacher scores 11.00 % on this run's val data, under twice"
    )
    assert "(10.0 % of 10 classes)" in said and "recall's glyphs follow data.seed, else seed" in said
    assert teacher_near_chance(20.0, 10) is None and teacher_near_chance(0.5, 1000) is None
    assert teacher_near_chance(None, 10) is None and teacher_near_chance(5.0, 0) is None  # no top-1, no head


def _measured(top1=None, cos=None, knn=None) -> dict:
    return {"val_top1": top1, "features": {"feat_cos_patch": cos}, "knn": {"knn_top1": knn} if knn else None}


def test_stage2_that_makes_the_student_worse_is_named_by_the_conversions_own_measure():
    """Labelled: val top-1; label-free: the final-feature cosine, with k-NN top-1 where measured (both must
    fall); no fall (at the digits the report prints), no word."""
    from attnxfer.apps.convert.quality import stage2_worse

    labelled = {"after_stage1": _measured(top1=45.2, cos=0.9), "after_stage2": _measured(top1=43.0, cos=0.95)}
    worse = stage2_worse(labelled, steps=3)
    assert (worse["metric"], worse["after_stage1"], worse["after_stage2"], worse["steps"]) == (
        "val_top1",
        45.2,
        43.0,
        3,
    )
    assert "val top-1 45.20 -> 43.00 (after stage 1 -> after stage 2, 3 steps)" in worse["message"]
    assert "schedule.epochs" in worse["message"]
    label_free = {
        "after_stage1": _measured(cos=0.9996, knn=40.0),
        "after_stage2": _measured(cos=0.9894, knn=38.5),
    }
    worse = stage2_worse(label_free, steps=3)
    assert worse["metric"] == "feat_cos_patch"
    assert "(patch tokens) 0.9996 -> 0.9894; k-NN top-1 40.00 -> 38.50" in worse["message"]
    assert stage2_worse({**labelled, "after_stage2": _measured(top1=45.2)}, steps=3) is None
    assert stage2_worse({**label_free, "after_stage2": _measured(cos=0.9997)}, steps=3) is None
    # features a little further from the teacher's while their neighbours classify better: not worse
    assert stage2_worse({**label_free, "after_stage2": _measured(cos=0.9894, knn=41.0)}, steps=3) is None
    # a fall the report's digits cannot show (0.99996 -> 0.99995 prints 1.0000 -> 1.0000) is not a warning
    assert (
        stage2_worse({"after_stage1": _measured(cos=0.99996), "after_stage2": _measured(cos=0.99995)}, 3)
        is None
    )
    assert stage2_worse({**labelled, "after_stage2": None}, steps=0) is None  # stage 2 did not run
    # k-NN within stage 1's 95% interval (2 images of 1,000 fewer), the cosine at its fourth digit: noise
    noisy = {"knn_top1": 67.5, "knn_top1_low": 64.5}
    before = {**_measured(cos=1.0), "knn": noisy}
    assert stage2_worse({"after_stage1": before, "after_stage2": _measured(cos=0.9998, knn=67.3)}, 3) is None
    assert stage2_worse({"after_stage1": before, "after_stage2": _measured(cos=0.9998, knn=64.0)}, 3)


def _relu_linear_conversion(run, teacher_dir, *keys: str) -> list[str]:
    """A label-free relu_linear conversion of two stage-1 steps, its report measured on the least that runs."""
    return [
        f"run_dir={run}",
        f"teacher.spec=local-dir:{teacher_dir}",
        *tiny_run(32, 16),
        "convert.attention=relu_linear",
        "convert.stage1_train=qk",
        "convert.stage1_steps=2",
        "transfer.mode=none",
        *tiny_convert_report(1, 2),
        "convert.speed_sweep=[]",
        *keys,
    ]


@pytest.mark.slow  # a whole conversion (2 stage-1 steps, 2 stage-2 steps at a learning rate that wrecks it)
def test_a_stage2_that_made_the_student_worse_says_so_in_its_report(tmp_path, headless_teacher_dir, capsys):
    run = tmp_path / "run"
    # label-free feature distillation at this rate pulls the features apart
    args = _relu_linear_conversion(run, headless_teacher_dir, "schedule.max_steps=2", "optim.lr=3.0")
    assert main(["convert", *args, "schedule.warmup_epochs=0"]) == 0
    report = json.loads((run / "report.json").read_text())
    worse = report["stage2_worse"]
    features = report["features"]
    assert worse["metric"] == "feat_cos_patch" and worse["steps"] == 2
    assert worse["after_stage2"] == features["after_stage2"]["feat_cos_patch"] < worse["after_stage1"]
    assert "**Warning: Stage 2 made the student worse than stage 1 left it" in (run / "report.md").read_text()
    assert f"warning: {worse['message']}" in capsys.readouterr().out.splitlines()


def _agreement(before: float, after: float, layer: int = 0) -> dict:
    return {"layer": layer, "metric": "kl", "before_stage1": before, "after_stage1": after}


def test_a_stage1_that_moved_a_block_away_from_the_teachers_map_is_named_with_its_values():
    """A rise at the report's four digits names the block, both values and what to change; none, no word."""
    from attnxfer.apps.convert.quality import stage1_worse

    worse = stage1_worse([_agreement(0.5, 0.1), _agreement(0.20, 0.31, layer=1)], steps=4)
    assert worse["layers"] == [1] and worse["steps"] == 4
    assert "1 of 2 blocks further from the teacher's maps than the weights swapped in" in worse["message"]
    assert "block 1 kl 0.2 -> 0.31" in worse["message"] and "convert.stage1_lr" in worse["message"]
    assert stage1_worse([_agreement(0.5, 0.1)], steps=4) is None
    assert stage1_worse([_agreement(0.123451, 0.123454)], steps=4) is None  # below the printed digits
    assert stage1_worse([_agreement(0.5, None)], steps=0) is None  # stage 1 skipped


@pytest.mark.slow  # a whole conversion (2 stage-1 steps at a learning rate that wrecks the fit, 1 stage-2 step)
def test_a_stage1_that_made_the_maps_worse_says_so_in_its_report(tmp_path, headless_teacher_dir, capsys):
    run = tmp_path / "run"
    wrecking = ["convert.stage1_warmup_steps=0", "convert.stage1_lr=50.0", "convert.stage1_clip_grad=null"]
    assert (
        main(
            [
                "convert",
                *_relu_linear_conversion(run, headless_teacher_dir, "schedule.max_steps=1", *wrecking),
            ]
        )
        == 0
    )
    report = json.loads((run / "report.json").read_text())
    worse = report["stage1_worse"]
    rows = {r["layer"]: r for r in report["agreement"]["teacher_input"]}
    assert worse["layers"] and all(
        rows[i]["after_stage1"] > rows[i]["before_stage1"] for i in worse["layers"]
    )
    assert "**Warning: Stage 1 left" in (run / "report.md").read_text()
    assert f"warning: {worse['message']}" in capsys.readouterr().out.splitlines()
