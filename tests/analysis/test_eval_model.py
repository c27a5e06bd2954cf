"""`attnxfer eval SPEC`: a model that is no run scored as timm's validate.py scores it (its own crop,
interpolation and statistics), with k-NN top-1 for a model without the data's head; nothing is written."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import timm
import torch
from helpers import card, image_folder, peaked_teacher, run_cli
from timm.models import save_for_hf

from attnxfer import load_student
from attnxfer.checkpoints.export import export_student
from attnxfer.models.efficient import efficient_student_from_teacher


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """An image folder of 3 classes (36 val images, 40 x 48 px) and a 32 px teacher with a 3-class head,
    saved twice: with timm's crop of its arch (centre, crop_pct 0.9), and squashed (the whole image resized)."""
    root = tmp_path_factory.mktemp("eval-model")
    image_folder(root / "data", classes=3)
    model = peaked_teacher(depth=2, qkv_bias=True, plain_timm=True, num_classes=3).eval()
    save_for_hf(model, root / "center", safe_serialization=True)
    squashed = copy.deepcopy(model)
    squashed.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": "squash", "crop_pct": 1.0}
    save_for_hf(squashed, root / "squash", safe_serialization=True)
    return root, {"center": model, "squash": squashed}


def _score(said: str, name: str) -> float:
    return float(re.search(rf"^{name}: ([\d.]+)$", said, re.M)[1])


@pytest.mark.parametrize("crop", ("center", "squash"))
def test_a_model_is_scored_as_timms_validate_scores_it(crop, three_classes, capsys):
    root, models = three_classes
    model = models[crop]
    data = ["data.dataset=folder", f"data.root={root / 'data'}"]
    before = sorted(p.name for p in root.rglob("*"))
    code, out, err = run_cli(capsys, "eval", str(root / crop), *data)
    assert code == 0, err
    # timm's own route: the model's eval transform (its crop, bicubic, mean/std 0.5) on each val image
    config = timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=model)
    transform = timm.data.create_transform(**config)
    images = timm.data.ImageDataset(str(root / "data" / "val"))
    with torch.no_grad():
        right = sum(int(model(transform(img)[None]).argmax(-1).item() == y) for img, y in images)
    assert _score(out, "val_top1") == pytest.approx(100 * right / len(images), abs=1e-4)
    assert _score(out, "val_count") == len(images) == 36
    assert 0 <= _score(out, "knn_top1") <= 100
    assert f"local-dir:{root / crop}: scored on data.dataset=folder's val split" in out
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written


def test_a_converted_students_export_is_scored_as_load_student_builds_it(three_classes, capsys):
    """An efficient-attention student's export, which no teacher can be (timm builds it only as softmax), is
    scored as attnxfer.load_student builds it, through timm's transform of its own pretrained_cfg."""
    root, models = three_classes
    student = efficient_student_from_teacher(copy.deepcopy(models["center"]), "relu_linear").eval()
    export_student(student, root / "linear", card=card())
    data = ["data.dataset=folder", f"data.root={root / 'data'}"]
    code, out, err = run_cli(capsys, "eval", str(root / "linear"), *data)
    assert code == 0, err
    loaded = load_student(f"local-dir:{root / 'linear'}")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=loaded))
    images = timm.data.ImageDataset(str(root / "data" / "val"))
    with torch.no_grad():
        right = sum(int(loaded(transform(img)[None]).argmax(-1).item() == y) for img, y in images)
    assert _score(out, "val_top1") == pytest.approx(100 * right / len(images), abs=1e-4)
    with torch.no_grad():  # not the teacher it was converted from, scored by mistake
        assert not torch.allclose(
            loaded(transform(images[0][0])[None]), models["center"](transform(images[0][0])[None])
        )


def test_a_model_without_the_datas_head_gets_its_knn_top1_and_no_top1(
    three_classes, tiny_teacher_dir, capsys
):
    """A 10-class head on 3 classes (as an ImageNet head on a user's data): its argmax means nothing here."""
    data = ["data.dataset=folder", f"data.root={three_classes[0] / 'data'}"]
    code, out, err = run_cli(capsys, "eval", f"local-dir:{tiny_teacher_dir}", *data, "eval.knn_k=5")
    assert code == 0, err
    assert "no top-1: " in out and "has a head of 10 outputs, and data.dataset=folder has 3 classes" in out
    assert "val_top1" not in out and "knn_top1 (%) [95% Wilson interval, 36 images, k=5, T=0.07]:" in out
    code, _, err = run_cli(capsys, "eval", str(tiny_teacher_dir), *data, "eval.metrics=[top1]")
    assert (
        code == 2 and "has a head of 10 outputs, and data.dataset=folder has 3 classes: drop top1" in err
    ), err


def test_a_head_of_other_classes_as_many_as_the_datas_gets_no_top1(three_classes, tmp_path, capsys):
    """A model whose config.json names its head's classes (label_names) scored on data of other classes, as
    many: its argmax is an index into the wrong names, and its top-1 (a chance figure) was said as any."""
    root, _ = three_classes
    named = tmp_path / "named"
    shutil.copytree(root / "center", named)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "label_names": ["cat", "dog", "fish"]}))
    data = ["data.dataset=folder", f"data.root={root / 'data'}", "eval.knn_k=5"]
    code, out, err = run_cli(capsys, "eval", str(named), *data)
    assert code == 0, err
    assert (
        f"no top-1: local-dir:{named}'s head names its classes cat, dog, fish, and data.dataset=folder's"
        in out
    )
    assert "val_top1" not in out and "knn_top1" in out
    code, _, err = run_cli(capsys, "eval", str(named), *data, "eval.metrics=[top1]")
    assert code == 2 and "give the data it learned, or drop top1" in err, err


def test_keys_no_model_evaluation_reads_are_refused(tiny_teacher_dir, capsys):
    model = str(tiny_teacher_dir)
    for given, said in (
        (
            ["transfer.mode=copy"],
            "transfer.mode: eval of a model reads only teacher.spec, arch, revision and",
        ),
        (["teacher.dtype=bf16"], "teacher.dtype: eval of a model reads only"),  # it runs at precision's
        (
            [f"teacher.spec=local-dir:{model}"],
            f"local-dir:{model} is the model eval scores: drop teacher.spec",
        ),
        (["eval.metrics=[]"], "nothing to score: eval.metrics is empty"),
    ):
        code, _, err = run_cli(capsys, "eval", model, "data.dataset=synthetic", *given)
        assert code == 2 and said in err, err


def test_a_misspelt_model_is_told_the_nearest_timm_name(capsys):
    code, _, err = run_cli(capsys, "eval", "vit_tny_patch16_224", "data.dataset=synthetic")
    assert code == 2 and "vit_tny_patch16_224 is no run's folder, and as a model: unknown teacher" in err, err
    assert "(did you mean 'vit_tiny_patch16_224'?)" in err


def test_a_web_address_or_a_file_of_a_models_folder_is_told_the_spec_that_names_the_model(
    three_classes, capsys
):
    """A Hub page's address is told its hf-hub: spec (as a run's teacher.spec is), and local-dir: of a file
    inside a model's folder (its config.json, its weights) is told the folder, not sent to teacher.arch."""
    code, _, err = run_cli(capsys, "eval", "https://huggingface.co/acme/tiny-vit", "data.dataset=synthetic")
    assert code == 2 and "is a Hub address: use 'hf-hub:acme/tiny-vit'" in err, err
    folder = three_classes[0] / "center"
    for inside in ("config.json", "model.safetensors"):
        code, _, err = run_cli(capsys, "eval", f"local-dir:{folder / inside}", "data.dataset=synthetic")
        assert code == 2 and f"is a file of a model's folder: give the folder, local-dir:{folder}" in err, err
