"""Library code where a library does it: the model card through huggingface_hub's
`ModelCard` (with a ``model-index``), the teacher's licence read by `ModelCard.load`, one sha256 helper
(`hashlib.file_digest`), and a cache directory that honours ``XDG_CACHE_HOME``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import tiny_vit
from huggingface_hub import ModelCard

from attnxfer.checkpoints.export import ModelCardInfo, export_student
from attnxfer.checkpoints.store import CheckpointManager
from attnxfer.data import cache_dir
from attnxfer.sources import load_teacher
from attnxfer.sources.resolve import sha256_file


def _wilson(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval in percent, from its formula."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


@pytest.fixture(scope="module")
def student():
    return tiny_vit(depth=1, seed=3, plain_timm=False)


def test_exported_card_parses_with_modelcard_load_and_holds_the_figures(tmp_path, student):
    metrics = {
        "val_top1": 81.2,
        "val_top5": 97.5,
        "val_count": 1000,
        "ema_val_top1": 82.0,
        "ema_val_count": 1000,
    }
    teacher = {"spec": "hf-hub:acme/teacher", "hf_repo": "acme/teacher", "license": "apache-2.0"}
    info = ModelCardInfo(model_name="tiny-student", teacher=teacher, metrics=metrics, dataset="animal_mnist")
    out = export_student(student, tmp_path / "out", card=info)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "timm"
    assert card.data.datasets == ["animal_mnist"] and card.data.base_model == "acme/teacher"
    top1, top5 = card.data.eval_results
    assert (top1.task_type, top1.dataset_type, top1.dataset_split) == (
        "image-classification",
        "animal_mnist",
        "validation",
    )
    assert (top1.metric_type, top1.metric_value) == ("accuracy", 81.2)
    lo, hi = _wilson(812, 1000)
    assert top1.metric_args["images"] == 1000
    assert top1.metric_args["interval_95_wilson"] == pytest.approx([lo, hi], abs=1e-4)
    assert f"[{lo:.2f}, {hi:.2f}] on 1000 images" in top1.metric_name
    assert (top5.metric_type, top5.metric_value) == ("top-5 accuracy", 97.5)
    # the raw YAML the Hub reads: a model-index with the same figures
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    [entry] = front["model-index"]
    assert entry["name"] == "tiny-student"
    assert [m["value"] for m in entry["results"][0]["metrics"]] == [81.2, 97.5]
    assert "81.2" in card.text and f"[{lo:.2f}, {hi:.2f}]" in card.text  # and the card's prose says it

    # EMA weights are scored by the EMA's evaluation, not the raw weights'; no top-5 recorded for it
    ema = ModelCardInfo(model_name="tiny-ema", teacher=teacher, metrics=metrics, eval_prefix="ema_val")
    out = export_student(student, tmp_path / "ema", card=ema)
    [result] = ModelCard.load(out / "README.md").data.eval_results
    assert result.metric_value == 82.0 and result.dataset_name == "unknown"
    # no metrics: no model-index, and the card still parses
    out = export_student(student, tmp_path / "none", card=ModelCardInfo(model_name="x", teacher=teacher))
    assert ModelCard.load(out / "README.md").data.eval_results is None


def _teacher_folder(tmp_path: Path, readme: str) -> Path:
    from timm.models import save_for_hf

    folder = tmp_path / "teacher"
    save_for_hf(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1),
        folder,
        safe_serialization=True,
    )
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].pop("license", None)  # timm's config names none: the card is the source
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text(readme)
    return folder


@pytest.mark.parametrize(
    "readme,licence",
    [
        ("---\nlibrary_name: timm\nlicense: cc-by-nc-4.0\ntags:\n- mae\n---\n# A teacher\n", "cc-by-nc-4.0"),
        ("---\nlicense: 'apache-2.0'  # quoted, with a comment\n---\n", "apache-2.0"),
        ("# no metadata at all\n\nlicense: mit\n", None),  # prose is not metadata
        ("---\nlicense: [unclosed\n---\n", None),  # unparsable metadata: unknown, not a crash
    ],
)
def test_teacher_licence_is_read_from_its_model_card(tmp_path, readme, licence):
    folder = _teacher_folder(tmp_path, readme)
    _, record = load_teacher(f"local-dir:{folder}")
    assert record.license == licence


def test_one_sha256_helper_for_teacher_weights_and_checkpoint_manifests(tmp_path):
    big = tmp_path / "blob.bin"
    payload = bytes(range(256)) * (1 << 15)  # 8 MiB, more than one read block
    big.write_bytes(payload)
    assert sha256_file(big) == hashlib.sha256(payload).hexdigest()
    manager = CheckpointManager(tmp_path / "run")
    path = Path(manager.save(1, {"model": {"w": torch.arange(6.0)}}, {"step": 1}))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"ATTNXFER_CACHE": "{tmp}/mine", "XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/mine"),
        ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/attnxfer"),
        ({"XDG_CACHE_HOME": "relative/xdg"}, "{home}/.cache/attnxfer"),  # the spec: relative is ignored
        ({"XDG_CACHE_HOME": ""}, "{home}/.cache/attnxfer"),
        ({}, "{home}/.cache/attnxfer"),
    ],
)
def test_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch, env, expected):
    monkeypatch.delenv("ATTNXFER_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    assert cache_dir() == Path(expected.format(tmp=tmp_path, home=tmp_path / "home"))
