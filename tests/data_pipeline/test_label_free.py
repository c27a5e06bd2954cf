"""data.labels=false: every source reads its images without labels (folders without class folders, a Hugging
Face dataset without a label column, webdataset shards without .cls), the batches cannot be mistaken for
labelled ones, a dataset whose labels raise when read goes through MAE pre-training and convert's stage 1
end to end, and work that needs labels stops in one line before it starts."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET, run_cli
from PIL import Image

from attnxfer.apps.run.loaders import build_loaders, data_info
from attnxfer.apps.run.pretrain import pretrain
from attnxfer.config import load_config
from attnxfer.data import (
    DatasetInfo,
    InMemoryImageDataset,
    LabelFree,
    build_dataset,
    build_loader,
    dataset_info,
    register_dataset,
    registry,
    split_batch,
)
from attnxfer.data.registry import built_info
from attnxfer.errors import InputError, MissingPathError
from attnxfer.launch import cli

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
NORM = dict(img_size=16, in_chans=1, mean=[0.5], std=[0.25])


def _gray(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _timm_eval(png: bytes) -> torch.Tensor:
    """timm's own eval transform of the image with folder's defaults (bicubic, crop_pct 0.875), which the timm
    sources share: the reference for what a source hands the model."""
    from timm.data import create_transform

    t = create_transform(
        (1, 16, 16), is_training=False, mean=(0.5,), std=(0.25,), crop_pct=0.875, interpolation="bicubic"
    )
    return t(Image.open(io.BytesIO(png)).convert("L"))


# -- folder: every image under ROOT/train and ROOT/val, class folders optional ------------------------------
@pytest.fixture
def mixed_folder(tmp_path) -> tuple[Path, dict[str, list[bytes]]]:
    """Images loose in the split folder, in a class folder and nested two deep; a hidden folder's and a text
    file are not images of the dataset."""
    root = tmp_path / "images"
    layout = {
        "train": ["img10.png", "img2.png", "dogs/a.png", "dogs/deep/er/b.png", "z/c.png"],
        "val": ["v.png", "cats/w.png"],
    }
    pngs: dict[str, list[bytes]] = {}
    for split, names in layout.items():
        pngs[split] = []
        for i, name in enumerate(names):
            path = root / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = _png(_gray(100 * len(split) + i))
            path.write_bytes(data)
            pngs[split].append(data)
        (root / split / ".cache").mkdir()
        (root / split / ".cache" / "thumb.png").write_bytes(_png(_gray(0)))
        (root / split / "notes.txt").write_text("not an image")
    return root, pngs


def test_folder_without_labels_reads_every_image_in_natural_order_with_timms_transform(mixed_folder):
    root, pngs = mixed_folder
    info = dataset_info("folder", root=str(root), labels=False)
    assert not info.has_labels and info.num_classes is None and info.class_names is None
    # natural order of the paths: dogs/a, dogs/deep/er/b, img2, img10, z/c; cats/w, v
    for split, order in (("train", [2, 3, 1, 0, 4]), ("val", [1, 0])):
        ds = build_dataset("folder", split, root=str(root), labels=False, augment=False, **NORM)
        assert isinstance(ds, LabelFree) and not ds.info.has_labels and len(ds) == len(pngs[split])
        for i, j in enumerate(order):
            sample = ds[i]
            assert len(sample) == 1  # (x,): no label, not even a placeholder
            torch.testing.assert_close(sample[0], _timm_eval(pngs[split][j]), rtol=0, atol=0)


def test_a_folder_without_class_folders_asks_for_labels_false(tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "a.png").write_bytes(_png(_gray(1)))
    with pytest.raises(MissingPathError, match="data.labels=false"):
        dataset_info("folder", root=str(tmp_path / "flat"))


def test_labelled_data_read_with_labels_false_hands_out_none_and_batches_cannot_be_unpacked_as_labelled():
    ds = build_dataset("synthetic", "val", labels=False, length=6, num_classes=3)
    assert isinstance(ds, LabelFree) and not ds.info.has_labels and ds.info.num_classes is None
    labelled = build_dataset("synthetic", "val", length=6, num_classes=3)
    for i in range(6):
        torch.testing.assert_close(ds[i][0], labelled[i][0], rtol=0, atol=0)
    loader = build_loader(ds, batch_size=4, sampler=None, drop_last=False)
    batch = next(iter(loader))
    x, y = split_batch(batch)
    assert y is None and x.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        for _x, _y in loader:
            pass
    x, y = split_batch(next(iter(build_loader(labelled, batch_size=4, sampler=None, drop_last=False))))
    assert y.tolist() == [0, 1, 2, 0]


# -- hfds/ without a label column, wds/ without .cls ----------------------------------------------------------
@pytest.fixture(scope="module")
def unlabelled_hf(tmp_path_factory) -> tuple[Path, list[bytes]]:
    import datasets

    root = tmp_path_factory.mktemp("hf") / "pictures"
    (root / "data").mkdir(parents=True)
    pngs = [_png(_gray(i)) for i in range(6)]
    features = datasets.Features({"image": datasets.Image()})
    for split, part in (("train", pngs[:4]), ("validation", pngs[4:])):
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in part]}, features=features
        )
        table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root, pngs


def test_hfds_without_a_label_column_reads_its_images_and_labels_true_says_what_to_set(
    unlabelled_hf, tmp_path
):
    root, pngs = unlabelled_hf
    name, cache = f"hfds/{root}", str(tmp_path / "cache")
    assert not dataset_info(name, root=cache, labels=False).has_labels
    val = build_dataset(name, "val", root=cache, labels=False, **NORM)
    assert len(val) == 2
    for i, png in enumerate(pngs[4:]):
        (x,) = val[i]
        torch.testing.assert_close(x, _timm_eval(png), rtol=0, atol=0)
    with pytest.raises(InputError, match="no 'label' column.*data.labels=false"):
        build_dataset(name, "val", root=cache, **NORM)
    with pytest.raises(InputError, match="no 'label' column.*data.labels=false"):
        dataset_info(name, root=cache)  # a run's first question, its class count: not "set model.num_classes"


@pytest.fixture(scope="module")
def shards_without_cls(tmp_path_factory) -> tuple[Path, list[bytes]]:
    root = tmp_path_factory.mktemp("wds")
    pngs = [_png(_gray(50 + i)) for i in range(8)]
    for name, part, start in (("train-000000.tar", pngs[:6], 0), ("val-000000.tar", pngs[6:], 6)):
        with tarfile.open(root / name, "w") as tar:
            for i, data in enumerate(part, start):
                member = tarfile.TarInfo(f"{i:06d}.png")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return root, pngs


def test_wds_without_cls_streams_every_image(shards_without_cls):
    root, pngs = shards_without_cls
    options = dict(train_split="train-000000.tar|6", val_split="val-000000.tar|2")
    val = build_dataset("wds/pictures", "val", root=str(root), labels=False, **NORM, **options)
    assert not val.info.has_labels
    got = list(val)
    assert [len(s) for s in got] == [1, 1]
    for (x,), png in zip(got, pngs[6:]):
        torch.testing.assert_close(x, _timm_eval(png), rtol=0, atol=0)
    train = build_dataset(
        "wds/pictures", "train", root=str(root), labels=False, batch_size=2, augment=False, **NORM, **options
    )
    seen = sorted(x.sum().item() for (x,) in train)  # one epoch: every image once, shuffled
    want = sorted(_timm_eval(png).sum().item() for png in pngs[:6])
    assert seen == pytest.approx(want)


# -- a dataset whose labels raise when read ----------------------------------------------------------------
_TRAP = "a label was read"
_TRAP_INFO = DatasetInfo("labels_raise", 4, None, (0.5,), (0.25,), 3, 32)


class LabelsRaise(InMemoryImageDataset):
    """Real images; reading any label raises."""

    def label(self, index: int) -> int:
        raise AssertionError(f"{_TRAP} (sample {int(index)})")


def _labels_raise(split, *, root=None, img_size=None, in_chans=None, mean=None, std=None, seed=0):
    info = built_info("labels_raise", _TRAP_INFO, img_size, in_chans, mean, std)
    n = 32 if split == "train" else 8
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return LabelsRaise(images, torch.zeros(n, dtype=torch.long), info, augment=split == "train", seed=seed)


@pytest.fixture(scope="module", autouse=True)
def labels_raise_registered():
    """``data.dataset=labels_raise`` for this module's tests only (the registry is restored after, so other
    modules' lists of datasets stay as they are)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_DATASETS", dict(registry._DATASETS))
        register_dataset("labels_raise", info=_TRAP_INFO)(_labels_raise)
        yield


_TINY_MAE = [
    "data.dataset=labels_raise",
    "model.name=vit_tiny_patch16_224",
    "model.kwargs={img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "mae.decoder_dim=16",
    "mae.decoder_heads=2",
    "mae.decoder_depth=1",
    "mae.pictures=2",
    "data.batch_size=8",
    "schedule.epochs=1",
    "schedule.max_steps=2",
    *QUIET,
    "log.every_steps=1",
    "checkpoint.every_epoch=false",
    "checkpoint.every_steps=2",
    "device=cpu",
]


def test_mae_pretraining_without_labels_never_reads_one(tmp_path):
    """Loaders, the training steps, the val loss, the reconstruction pictures, the checkpoint and the export
    run on a dataset whose label reads raise; the same run reading labels trips the trap at once."""
    with pytest.raises(AssertionError, match=_TRAP):
        pretrain(load_config(None, [*_TINY_MAE, f"run_dir={tmp_path / 'labelled'}"]))
    run = tmp_path / "run"
    result = pretrain(load_config(None, [*_TINY_MAE, "data.labels=false", f"run_dir={run}"]))
    assert result.steps == 2 and (run / "export" / "model.safetensors").is_file()
    assert list((run / "pictures").glob("*.png"))
    assert (
        cli.main(["eval", *_TINY_MAE, "data.labels=false", f"run_dir={run}"]) == 0
    )  # scored by its val loss
    [record] = [json.loads(p.read_text()) for p in run.glob("eval-*.json")]
    scored = record["metrics"]
    assert "val_loss" in scored and not any(k.startswith("knn") for k in scored)
    assert record["config"]["mae"]["mask_ratio"] == 0.75  # the masking its val loss was scored with


def test_convert_stage1_on_data_without_labels_never_reads_one(tiny_teacher_dir):
    """convert's own pieces: the run's parts (teacher, efficient student, label-free loaders) and stage 1's
    batches, fitted for two steps."""
    from attnxfer.apps.convert.convert import conversion_plan_from_config
    from attnxfer.apps.convert.stage1 import stage1_batches
    from attnxfer.apps.run.parts import build_run_parts
    from attnxfer.models.efficient import build_efficient_student
    from attnxfer.train.stage1 import stage1_transfer

    cfg = load_config(
        None,
        [
            f"teacher.spec=local-dir:{tiny_teacher_dir}",
            "data.dataset=labels_raise",
            "data.labels=false",
            "data.batch_size=4",
            "convert.attention=relu_linear",
            "convert.stage1_steps=2",
            "convert.stage1_train=qk",
            "convert.stage1_batch_size=4",
        ],
    )
    parts = build_run_parts(
        cfg, student_fn=lambda teacher, _: build_efficient_student(teacher, "relu_linear")
    )
    assert parts.num_classes == 0  # a run without labels has no classes
    plan = conversion_plan_from_config(cfg, parts.teacher, parts.student)
    result = stage1_transfer(
        parts.teacher.eval(),
        parts.student,
        plan,
        stage1_batches(cfg, parts, 4, torch.device("cpu")),
    )
    assert result.steps == 2 and all(
        np.isfinite(v) for r in result.history for k, v in r.items() if k != "step"
    )


def test_loaders_without_labels_yield_images_alone():
    cfg = load_config(None, ["data.dataset=labels_raise", "data.labels=false", "data.batch_size=4"])
    assert not data_info(cfg.data).has_labels
    loaders = build_loaders(
        cfg.data, cfg.aug, img_size=32, in_chans=3, mean=[0.5], std=[0.25], num_classes=0, seed=0
    )
    for loader in (loaders.train_loader, loaders.val_loader):
        batch = next(iter(loader))
        assert len(batch) == 1 and batch[0].shape == (4, 3, 32, 32)


# -- work that needs labels stops before it starts ------------------------------------------------------------
@pytest.mark.parametrize(
    "command,more,needs",
    [
        ("train", ["transfer.mode=none"], "the task loss (cross-entropy of the student's logits)"),
        (
            "convert",
            [
                "teacher.spec=local-dir:/nonexistent",
                "convert.attention=relu_linear",
                "transfer.task_weight=1",
            ],
            "the task loss (cross-entropy of the student's logits)",
        ),
        ("eval", ["eval.metrics=[knn]"], "eval.metrics=knn"),
        ("eval", ["eval.metrics=[top1]"], "eval.metrics=top1"),
    ],
    ids=["train", "convert", "eval-knn", "eval-top1"],
)
def test_work_that_needs_labels_stops_in_one_line_before_it_starts(command, more, needs, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys, command, "data.dataset=labels_raise", "data.labels=false", f"run_dir={run}", *more
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"attnxfer {command}: error: {needs} needs labels"), lines
    assert "data.labels=false" in lines[-1] and not run.exists()
    # a metric that reads labels can also be dropped: the run then scores what needs none
    assert not needs.startswith("eval.metrics=") or lines[-1].endswith(
        f"or drop {needs[13:]} from eval.metrics"
    )


def test_eval_without_labels_or_teacher_has_nothing_to_score(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "data.dataset=labels_raise", "data.labels=false", "transfer.mode=none",
                        f"run_dir={tmp_path / 'run'}")  # fmt: skip
    assert code == 2 and "nothing to score" in err and "Traceback" not in err


@pytest.mark.slow  # a one-generation search: ~11 s of CPU
def test_search_without_labels_never_reads_one(tiny_teacher_dir, tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "search", f"run_dir={tmp_path / 'run'}", f"teacher.spec=local-dir:{tiny_teacher_dir}",
        "data.dataset=labels_raise", "data.labels=false", "data.batch_size=8", "search.population=4",
        "search.offspring=3", "search.generations=1", "search.fit_steps=3", "search.fit_batches=2",
        "search.held_out_images=8", "search.target_tokens=65", "search.speed=flops", "log.progress=false",
    )  # fmt: skip
    assert code == 0, err
    assert "winner:" in out and (tmp_path / "run" / "pareto.md").is_file()
