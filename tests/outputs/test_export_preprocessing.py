"""An export carries the preprocessing its student was validated with and its class names: timm's own
``resolve_data_config`` + ``create_transform`` on the export, loaded in plain timm, prepare images exactly as
the run's val loader did, and score what the model card says."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import QUIET, card, image_folder
from huggingface_hub import ModelCard
from timm.data import ImageDataset, create_transform, resolve_data_config

from attnxfer.apps.run.parts import stamp_input_cfg
from attnxfer.checkpoints.export import export_student
from attnxfer.data import build_dataset
from attnxfer.launch import cli
from attnxfer.models.student import student_like

from .test_export import teacher_model


def _timm_pipeline(export) -> tuple[torch.nn.Module, object]:
    """The export as a newcomer loads it: plain timm, timm's data config, timm's eval transform."""
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    return model, create_transform(**resolve_data_config({}, model=model))


def test_timm_prepares_images_as_the_run_validated_them_and_names_the_classes(tmp_path):
    """The teacher's config says crop_pct 0.9 / bicubic; the folder validates at 0.8 / bilinear: the export
    declares the folder's, so timm's transform gives the val loader's tensors bit for bit."""
    root = image_folder(tmp_path / "images", per_class={"train": 1, "val": 2})
    val = build_dataset("folder", "val", root=root, img_size=32, crop_pct=0.8, interpolation="bilinear")
    teacher = teacher_model()
    teacher.pretrained_cfg.update(crop_pct=0.9, interpolation="bicubic")
    student = student_like(teacher, num_classes=3).eval()
    info = val.info
    stamp_input_cfg(student, info.mean, info.std, info.in_chans, info.img_size, info.eval_preprocessing())
    names = list(info.class_names)
    out = export_student(student, tmp_path / "out", card=card(class_names=names))

    model, transform = _timm_pipeline(out)
    assert model.pretrained_cfg["label_names"] == names == ["class0", "class1", "class2"]
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == names  # where timm's save_for_hf writes them
    assert (config["pretrained_cfg"]["crop_pct"], config["pretrained_cfg"]["interpolation"]) == (
        0.8,
        "bilinear",
    )
    readme = (out / "README.md").read_text()
    # the size timm's transform resizes to, floor(32 / 0.8) px, in pixels (not the formula)
    assert "resized (bilinear) to 40 px on the short side, then a center crop of 32 x 32 px" in readme
    assert transform.transforms[0].size == 40
    assert "- classes: 3 (class0, class1, class2)" in readme
    timm_val = ImageDataset(str(root / "val"), transform=transform)
    assert len(timm_val) == len(val) == 6
    for i in range(len(val)):
        assert timm_val[i][1] == val[i][1]
        assert torch.equal(timm_val[i][0], val[i][0])


def test_the_card_of_a_one_channel_student_says_to_read_images_in_one_channel(tmp_path):
    """timm reads images as RGB, which a grayscale student (the demo's) refuses: the card says how to read them,
    and read so, timm's own pipeline feeds the model."""
    from attnxfer.models import create_vit

    root = image_folder(tmp_path / "images", per_class={"train": 1, "val": 1})
    student = student_like(create_vit("vit_micro_patch4_28", num_classes=3), depth=1).eval()
    out = export_student(student, tmp_path / "out", card=card())
    assert 'timm\'s `ImageDataset(..., input_img_mode="L")`' in (out / "README.md").read_text()
    model, transform = _timm_pipeline(out)
    image = ImageDataset(str(root / "val"), input_img_mode="L", transform=transform)[0][0]
    assert model(image[None]).shape == (1, 3)


def test_class_names_that_do_not_fit_the_head_are_refused(tmp_path):
    student = student_like(teacher_model(), num_classes=3).eval()
    with pytest.raises(ValueError, match="2 class names for a student of 3 classes"):
        export_student(student, tmp_path / "out", card=card(class_names=["a", "b"]))


@pytest.mark.slow
def test_timm_pipeline_on_the_export_scores_the_runs_val_top1_and_the_cards_figure(
    tmp_path, tiny_teacher_dir, capsys
):
    """A run on an image folder (EMA kept: the export and its card are the EMA's), exported by the CLI;
    timm alone, on the val folder, scores the card's figure and the run's own val top-1."""
    root = image_folder(tmp_path / "images", per_class={"train": 24, "val": 20})
    run = tmp_path / "run"
    args = [
        f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "data.dataset=folder",
        f"data.root={root}",
        "data.batch_size=8",
        "schedule.max_steps=12",
        "ema.decay=0.5",
        *QUIET,
        f"run_dir={run}",
    ]
    assert cli.main(["train", *args]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert said == [
        "warning: this run takes 12 optimiser steps, fewer than 100 (schedule.max_steps=12): raise "
        "schedule.max_steps for a student that learns"
    ]
    assert cli.main(["export", str(run), str(tmp_path / "export")]) == 0

    model, transform = _timm_pipeline(tmp_path / "export")
    images = ImageDataset(str(root / "val"), transform=transform)
    loader = torch.utils.data.DataLoader(images, batch_size=32)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    timm_top1 = 100.0 * correct / len(images)

    card_figure = ModelCard.load(tmp_path / "export" / "README.md").data.eval_results[0].metric_value
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ema_top1 = [r["ema_val_top1"] for r in rows if "ema_val_top1" in r][-1]
    assert abs(timm_top1 - card_figure) <= 0.5 and abs(timm_top1 - ema_top1) <= 0.5
    assert model.pretrained_cfg["label_names"] == ["class0", "class1", "class2"]


def test_class_names_go_into_the_export_only_where_they_name_the_students_outputs():
    """A headless student (an encoder converted on labelled images) exports without class names instead of
    failing on "10 class names for a student of 0 classes"; a head of as many classes gets them."""
    from torch import nn

    from attnxfer.checkpoints.export import _class_names

    names = [f"c{i}" for i in range(10)]
    headless, head = nn.Module(), nn.Module()
    headless.num_classes, head.num_classes = 0, 10
    assert _class_names({"class_names": names, "num_classes": 0}, headless) is None
    assert _class_names({"class_names": names, "num_classes": 10}, head) == names
    assert _class_names({"class_names": names[:3], "num_classes": 10}, head) is None
    assert _class_names({"num_classes": 10}, head) is None


def test_an_in_memory_datasets_export_declares_its_whole_image_bilinear_resize_not_the_teachers_crop(
    tmp_path,
):
    """An in-memory dataset (animal-mnist's kind) resizes whole images bilinear to the student's size; a student
    whose timm config says crop_pct 0.9 / bicubic (an EVA's, say) is exported with the dataset's resize, so
    timm's transform on the export prepares the images the run validated on (to resampling rounding)."""
    import numpy as np
    from PIL import Image

    from attnxfer.data import DatasetInfo, InMemoryImageDataset

    pixels = torch.randint(
        0, 256, (2, 3, 20, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    info = DatasetInfo("mem", 3, ("a", "b", "c"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), in_chans=3, img_size=32)
    val = InMemoryImageDataset(pixels, torch.tensor([0, 1]), info)
    teacher = teacher_model()
    teacher.pretrained_cfg.update(crop_pct=0.9, interpolation="bicubic")
    student = student_like(teacher, num_classes=3).eval()
    info = val.info
    stamp_input_cfg(student, info.mean, info.std, info.in_chans, info.img_size, info.eval_preprocessing())
    out = export_student(student, tmp_path / "out", card=card())
    readme = (out / "README.md").read_text()  # a non-square image is squashed, and the card says so
    assert (
        "squashed (bilinear) to 32 x 32 px, the aspect ratio not kept, then a center crop of 32 x 32"
        in readme
    )

    _, transform = _timm_pipeline(out)
    for i in range(len(val)):
        image = Image.fromarray(np.ascontiguousarray(pixels[i].permute(1, 2, 0).numpy()))
        assert torch.allclose(transform(image), val[i][0], atol=0.05)  # PIL vs torch resampling: ~0.02


def test_the_onnx_section_states_the_resize_and_crop_of_the_validation_images():
    from attnxfer.checkpoints.model_card import _onnx_section

    report = dict(file="model.onnx", opset=18, input_name="pixel_values", input_shape=["batch", 3, 32, 32])
    report |= dict(
        output_name="logits", exporter="dynamo", onnxruntime="1", provider="CPU", check_batches=[1]
    )
    report |= dict(max_abs_diff=0.0, max_abs_output=1.0)
    data_cfg = dict(input_size=[3, 32, 32], crop_pct=0.8, interpolation="bilinear", mean=[0.5], std=[0.2])
    text = _onnx_section(report, "local-dir:/out", data_cfg)
    assert (
        "Images as the run validated them: resized (bilinear) to 40 px on the short side, then a center "
        in text
    )
    assert "crop of 32 x 32 px (crop_pct 0.8), normalised with mean [0.5] and std [0.2]." in text


@pytest.mark.slow
def test_an_onnx_only_card_says_how_the_run_resized_and_cropped_its_images(tmp_path):
    """An ONNX user has no timm transform to read the preprocessing from: the card's ONNX section states it in
    full (resize, crop, normalisation), as the timm section does."""
    teacher = teacher_model()
    teacher.pretrained_cfg.update(crop_pct=0.8, interpolation="bilinear")
    student = student_like(teacher, num_classes=3).eval()
    out = export_student(student, tmp_path / "out", card=card(), formats=("onnx",))
    onnx_part = (out / "README.md").read_text().split("## ONNX")[1]
    assert "resized (bilinear) to 40 px on the short side, then a center crop of 32 x 32 px" in onnx_part
    assert "normalised with mean" in onnx_part
