"""timm's dataset prefixes as data.dataset (a Hugging Face dataset saved here as parquet, webdataset tar
shards written from animal-mnist) against timm's own transforms, training and resuming on them, and a
dataset registered by an installed distribution's entry point."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET, assert_same_tensors, torchrun_attnxfer
from PIL import Image
from safetensors.torch import load_file

from attnxfer.apps.run.loaders import data_info
from attnxfer.apps.run.parts import build_run_parts, num_classes_of
from attnxfer.apps.run.pretrain import pretrain
from attnxfer.apps.run.training import build_engine, train
from attnxfer.config import load_config
from attnxfer.data import (
    ResumableSampler,
    StreamPosition,
    build_dataset,
    dataset_info,
    list_datasets,
    register_dataset,
    registry,
)
from attnxfer.data.animal_mnist import CLASS_NAMES, load_animal_mnist_arrays
from attnxfer.data.identity import data_identity
from attnxfer.data.timm_sources import ReadAs, StreamDataset
from attnxfer.errors import InputError, MissingPathError, OptionError
from attnxfer.launch.cli import main as cli_main
from attnxfer.train.metrics import read_summary

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
N_TRAIN, N_VAL = 48, 16
NORM = dict(img_size=28, in_chans=1, mean=[0.5], std=[0.25])


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def animals():
    """64 animal-mnist images as PNG bytes with their labels, the classes taken in turn (the arrays are sorted
    by class): 48 train, 16 val, each split holding most classes."""
    arr = load_animal_mnist_arrays()
    order = np.stack([np.flatnonzero(arr.labels == c)[:7] for c in range(10)], axis=1).ravel()
    pngs = [_png(arr.images[i]) for i in order[: N_TRAIN + N_VAL]]
    labels = [int(arr.labels[i]) for i in order[: N_TRAIN + N_VAL]]
    return {"train": (pngs[:N_TRAIN], labels[:N_TRAIN]), "val": (pngs[N_TRAIN:], labels[N_TRAIN:])}


def _timm_eval(png: bytes) -> torch.Tensor:
    """timm's own eval transform with folder's defaults (bicubic, crop_pct 0.875), which the timm sources
    share: the reference for what a source hands the model."""
    from timm.data import create_transform

    t = create_transform(
        (1, 28, 28), is_training=False, mean=(0.5,), std=(0.25,), crop_pct=0.875, interpolation="bicubic"
    )
    return t(Image.open(io.BytesIO(png)).convert("L"))


# -- Hugging Face datasets (hfds/): a local folder of parquet files, read offline -------------------------
@pytest.fixture(scope="module")
def hf_dir(animals, tmp_path_factory) -> Path:
    import datasets

    root = tmp_path_factory.mktemp("hf") / "animals"
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    for split, name in (("train", "train"), ("val", "validation")):
        pngs, labels = animals[split]
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}, features=features
        )
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return root


def test_hfds_reads_a_local_hugging_face_dataset_with_timms_transforms(hf_dir, animals, tmp_path):
    name = f"hfds/{hf_dir}"
    cache = tmp_path / "cache"
    info = dataset_info(name, root=cache)
    assert info.num_classes == 10 and info.class_names == CLASS_NAMES
    val = build_dataset(name, "val", root=cache, **NORM)
    assert len(val) == N_VAL
    for i, (png, label) in enumerate(zip(*animals["val"])):
        x, y = val[i]
        assert y == label
        torch.testing.assert_close(x, _timm_eval(png), rtol=0, atol=0)


def test_an_hfds_val_image_pil_cannot_open_is_refused_not_replaced_by_the_next_one(animals, tmp_path):
    """As folder's: timm's ImageDataset would hand out the next row's sample for an image PIL cannot open,
    with or without the label column (timm's reader or attnxfer's `HfImages`); in the val split, an error."""
    import datasets

    pngs, labels = animals["val"][0][:2], animals["val"][1][:2]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    for split in ("train", "validation"):
        rows = [  # the second image: the first is read at start-up, where the run checks its size
            {"bytes": pngs[0], "path": None},
            {"bytes": b"not an image" if split == "validation" else pngs[1], "path": None},
        ]
        ds = datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)
        ds.to_parquet(str(tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet"))
    for with_labels in (True, False):
        val = build_dataset(
            f"hfds/{tmp_path / 'hf'}", "val", root=tmp_path / "cache", labels=with_labels, **NORM
        )
        with pytest.raises(
            InputError, match=r"image number 1 cannot be read as an image \(PIL cannot identify"
        ):
            val[1]
        assert val[0][0].shape == (1, 28, 28)


def test_an_hfds_val_split_whose_files_order_the_classes_otherwise_is_refused(animals, tmp_path):
    """datasets reads every split of a parquet folder with the first split's ClassLabel: a val split written
    with its own order of the names (each split's folder listing) had its labels read as other classes."""
    import datasets

    pngs, labels = animals["val"][0][:3], [0, 1, 2]
    for split, names in (("train", ["cat", "dog", "fish"]), ("validation", ["fish", "cat", "dog"])):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}, features
        )
        ds.to_parquet(str(tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet"))
    name = f"hfds/{tmp_path / 'hf'}"
    assert len(build_dataset(name, "train", root=tmp_path / "cache", **NORM)) == 3  # the train split is read
    with pytest.raises(
        InputError,
        match=r"its 'validation' files name the classes of 'label' \['fish', 'cat', 'dog'\], its 'train' files "
        r"\['cat', 'dog', 'fish'\]; datasets reads every split in the first order",
    ):
        build_dataset(name, "val", root=tmp_path / "cache", **NORM)


def test_hfds_trains_through_the_resumable_sampler(hf_dir, tmp_path):
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.dataset=hfds/{hf_dir}",
            f"data.root={tmp_path / 'cache'}",
            "data.img_size=28",
            "data.in_chans=1",
            "data.mean=[0.5]",
            "data.std=[0.25]",
            "data.batch_size=8",
            "model.kwargs={depth: 1, embed_dim: 48}",
            "transfer.mode=none",
            *QUIET,
            "log.attention_images=0",
            "schedule.epochs=1",
            "device=cpu",
        ],
    )
    parts = build_run_parts(cfg)
    assert isinstance(parts.train_sampler, ResumableSampler) and parts.train_sampler.length == N_TRAIN
    x, y = next(iter(parts.train_loader))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    result = train(cfg)
    assert result.steps == N_TRAIN // 8


def test_hfids_streams_the_same_dataset(hf_dir, animals, tmp_path):
    name, cache = f"hfids/{hf_dir}", tmp_path / "cache"
    val = build_dataset(name, "val", root=cache, **NORM, val_samples=N_VAL)
    got = list(val)
    assert [y for _, y in got] == animals["val"][1]
    for (x, _), png in zip(got, animals["val"][0]):
        torch.testing.assert_close(x, _timm_eval(png), rtol=0, atol=0)
    train_set = build_dataset(name, "train", root=cache, **NORM, train_samples=N_TRAIN, batch_size=8)
    assert len(train_set) == N_TRAIN
    assert sorted(int(y) for _, y in train_set) == sorted(animals["train"][1])


def test_a_16_bit_grey_png_streams_as_its_top_8_bits_not_as_white(tmp_path):
    """timm's stream readers convert to L or RGB by clipping a 16-bit grey image's values to 255 (white):
    hfids/ and wds/ shards, with labels or without, read it as its top 8 bits, in one channel or three."""
    import datasets

    grey = np.random.default_rng(1).integers(0, 65536, (28, 28), dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    png = buf.getvalue()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    (tmp_path / "hf" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}], "label": [0]}, features).to_parquet(
        str(tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet")
    )
    with tarfile.open(tmp_path / "val-000000.tar", "w") as tar:
        for ext, data in (("png", png), ("cls", b"0")):
            member = tarfile.TarInfo(f"000000.{ext}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    want = torch.from_numpy((grey >> 8).astype(np.float32) / 255)  # ToTensor's scaling; mean 0, std 1
    for name, where in (
        (f"hfids/{tmp_path / 'hf'}", dict(root=tmp_path / "cache", val_samples=1)),
        ("wds/grey", dict(root=str(tmp_path), val_split="val-000000.tar|1")),
    ):
        for labels, chans in ((True, 3), (False, 1)):
            norm = dict(img_size=28, in_chans=chans, mean=[0.0] * chans, std=[1.0] * chans, crop_pct=1.0)
            ((x, *_),) = build_dataset(name, "val", labels=labels, **norm, **where)
            assert torch.equal(x, want.expand(chans, 28, 28)), (name, labels)


# -- webdataset tar shards (wds/) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(animals, tmp_path_factory) -> Path:
    """webdataset's format: a tar per shard, one ``KEY.png`` + ``KEY.cls`` (the label as text) per sample."""
    root = tmp_path_factory.mktemp("wds")

    def write(path: Path, pngs, labels, start: int) -> None:
        with tarfile.open(path, "w") as tar:
            for i, (png, label) in enumerate(zip(pngs, labels), start):
                for ext, data in (("png", png), ("cls", str(label).encode())):
                    member = tarfile.TarInfo(f"{i:06d}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))

    pngs, labels = animals["train"]
    half = N_TRAIN // 2
    write(root / "train-000000.tar", pngs[:half], labels[:half], 0)
    write(root / "train-000001.tar", pngs[half:], labels[half:], half)
    write(root / "val-000000.tar", *animals["val"], N_TRAIN)
    return root


WDS = [
    "data.dataset=wds/animals",
    "data.img_size=28",
    "data.in_chans=1",
    "data.mean=[0.5]",
    "data.std=[0.25]",
    "data.batch_size=8",
    f"data.kwargs={{train_split: 'train-{{000000..000001}}.tar|{N_TRAIN}', val_split: 'val-000000.tar|{N_VAL}'}}",
    "model.num_classes=10",
    "model.kwargs={depth: 1, embed_dim: 48}",
    "transfer.mode=none",
    *QUIET,
    "log.every_steps=1",
    "log.attention_images=0",
    "checkpoint.every_epoch=false",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=20",
    "schedule.epochs=2",
    "device=cpu",
]


def test_wds_streams_tar_shards_with_timms_transforms(shards, animals):
    options = {
        "train_split": f"train-{{000000..000001}}.tar|{N_TRAIN}",
        "val_split": f"val-000000.tar|{N_VAL}",
    }
    val = build_dataset("wds/animals", "val", root=str(shards), **NORM, **options)
    got = list(val)
    assert len(got) == N_VAL
    for (x, y), png, label in zip(got, *animals["val"]):
        assert y == label
        torch.testing.assert_close(x, _timm_eval(png), rtol=0, atol=0)
    train_set = build_dataset("wds/animals", "train", root=str(shards), **NORM, **options, batch_size=8)
    labels = sorted(int(y) for _, y in train_set)  # one epoch: every training image once, shuffled
    assert labels == sorted(animals["train"][1])


def test_shards_under_a_root_written_with_a_tilde_are_read_from_the_home_folder(shards, monkeypatch):
    """A shell leaves data.root=~/wds as it is: timm's reader and the shard check took '~' for a folder's name,
    and every shard was said to be missing."""
    monkeypatch.setenv("HOME", str(shards.parent))
    options = {"val_split": f"val-000000.tar|{N_VAL}"}
    assert len(list(build_dataset("wds/animals", "val", root=f"~/{shards.name}", **NORM, **options))) == N_VAL


def test_a_label_the_students_head_does_not_have_is_one_message_naming_it(hf_dir, shards, animals, tmp_path):
    """Shards and tables need not say their class count: a label past ``model.num_classes`` would otherwise
    be an IndexError at the loss (a device-side assert on CUDA)."""
    options = {"val_split": f"val-000000.tar|{N_VAL}"}
    stream = build_dataset("wds/animals", "val", root=str(shards), **NORM, **options, num_classes=9)
    table = build_dataset(f"hfds/{hf_dir}", "val", root=tmp_path / "cache", **NORM, num_classes=9)
    labels = animals["val"][1]
    inside, past = (next(i for i, y in enumerate(labels) if (y >= 9) == out) for out in (False, True))
    assert table[inside][1] == labels[inside]  # a label the head has passes
    for read in (lambda: list(stream), lambda: table[past]):
        with pytest.raises(InputError, match=r"has the label 9, outside the 9 classes of the student's head"):
            read()


def test_streams_and_hugging_face_tables_identify_themselves_without_being_read(hf_dir, shards, tmp_path):
    """Listing a stream's files reads every sample (a label-free wds stream, or an hfids one without a file-name
    column, cannot list them at all), and a Hugging Face table's every row: each says what it holds instead."""
    options = {"train_split": f"train-{{000000..000001}}.tar|{N_TRAIN}", "batch_size": 8}
    for labels in (True, False):
        wds = build_dataset("wds/animals", "train", root=str(shards), **NORM, **options, labels=labels)
        assert data_identity(wds)["of"] == "shard list"
    hfids = build_dataset(f"hfids/{hf_dir}", "train", root=tmp_path / "a", **NORM, train_samples=N_TRAIN)
    assert {k: v for k, v in data_identity(hfids).items() if k != "fingerprint"} == {
        "samples": N_TRAIN,
        "of": "dataset, split and files",
    }
    here, moved = (
        data_identity(build_dataset(f"hfds/{hf_dir}", "train", root=tmp_path / c, **NORM)) for c in "ab"
    )
    assert here == moved and here["of"] == "datasets fingerprint"  # another cache folder: the same data
    assert data_identity(build_dataset(f"hfds/{hf_dir}", "val", root=tmp_path / "a", **NORM)) != here


@pytest.mark.parametrize("labels", [True, False])
def test_a_hugging_face_datasets_own_column_and_split_names_are_given_as_timm_names_them(
    hf_dir, tmp_path, labels
):
    """CIFAR-100 on the Hub names its columns 'img' and 'fine_label' (timm's reader cast an 'image' column,
    which datasets adds, empty: a TypeError traceback at the first image). The refusal names both, as timm's
    --input-key and --target-key; so named, the dataset is read as the one with timm's names, and a train split
    named otherwise (data.kwargs.train_split, which the refusal of a missing 'train' asks for) is read too: it
    was refused again, the class count being read from 'train' whatever the option said."""
    import datasets

    root = tmp_path / "cifar_like"
    for split, named in (("train", "trn"), ("validation", "validation")):
        table = datasets.load_dataset(str(hf_dir), split=split, cache_dir=tmp_path / "a")
        table = table.rename_columns({"image": "img", "label": "fine_label"})
        table.to_parquet(str(root / "data" / f"{named}-00000-of-00001.parquet"))
    name, options = f"hfds/{root}", {"train_split": "trn"}
    named = r"data.kwargs=\{input_key: img" + (", target_key: fine_label" if labels else "") + r"\}$"
    with pytest.raises(
        InputError, match=r"no 'image' column \(it has \['img', 'fine_label'\]\); name its .*" + named
    ):
        build_dataset(name, "val", root=tmp_path / "b", **NORM, **options, labels=labels)
    if labels:
        with pytest.raises(
            InputError, match=r"no 'image' column \(it has \['img', 'fine_label'\]\); .*" + named
        ):
            dataset_info(name, root=tmp_path / "b", options=options)
    options |= {"input_key": "img", "target_key": "fine_label"}
    info = dataset_info(name, root=tmp_path / "b", labels=labels, options=options)
    assert info == replace(dataset_info(f"hfds/{hf_dir}", root=tmp_path / "a", labels=labels), name=name)
    given = "data.kwargs={train_split: trn, input_key: img, target_key: fine_label}"
    cfg = load_config(
        None, [f"data.dataset={name}", f"data.root={tmp_path / 'b'}", f"data.labels={labels}", given]
    )
    assert data_info(cfg.data) == info  # as a run reads its data section
    for split in ("train", "val"):
        ours = build_dataset(
            name, split, root=tmp_path / "b", **NORM, **options, labels=labels, augment=False
        )
        timms = build_dataset(
            f"hfds/{hf_dir}", split, root=tmp_path / "a", **NORM, labels=labels, augment=False
        )
        assert len(ours) == len(timms)
        for a, b in zip(ours[0], timms[0], strict=True):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_a_hugging_face_dataset_with_plain_integer_labels_asks_for_the_class_count(hf_dir, tmp_path):
    """A label column of integers (no ClassLabel) says no class count: model.num_classes does, and data.root
    (the dataset's cache, optional) is not what is missing."""
    import datasets

    root = tmp_path / "int_labels"
    for split in ("train", "validation"):
        table = datasets.load_dataset(str(hf_dir), split=split, cache_dir=tmp_path / "a")
        table.cast_column("label", datasets.Value("int64")).to_parquet(
            str(root / "data" / f"{split}.parquet")
        )
    cfg = load_config(None, [f"data.dataset=hfds/{root}"])
    with pytest.raises(InputError, match=r"does not say how many classes it has; set model.num_classes$"):
        num_classes_of(cfg, data_info(cfg.data))


@pytest.mark.parametrize(
    "prefix,options", [("hfds", {}), ("hfds", {"labels": False}), ("hfids", {"val_samples": N_VAL})]
)
def test_a_split_the_hugging_face_dataset_lacks_is_refused_with_the_key_that_names_another(
    hf_dir, tmp_path, prefix, options
):
    """Hub datasets name their splits differently (train/test, train/validation): a stream would fail only
    once read."""
    val = r"no split 'test' \(it has \['train', 'validation'\]\): name its val split with data.kwargs.val_split="
    with pytest.raises(InputError, match=val):
        build_dataset(f"{prefix}/{hf_dir}", "val", root=tmp_path, **NORM, val_split="test", **options)
    with pytest.raises(InputError, match="no split 'training'.*data.kwargs.train_split=NAME"):
        build_dataset(f"{prefix}/{hf_dir}", "train", root=tmp_path, **NORM, train_split="training", **options)


def test_data_not_at_hand_is_one_line_that_says_what_to_set(shards, tmp_path, monkeypatch, caplog):
    """A Hub dataset neither cached nor reachable, a local folder that is not there, and shards without an
    _info.json to name their split: each a line saying what to set, not datasets' or timm's traceback."""
    import datasets
    import huggingface_hub.constants

    for config in (datasets.config, huggingface_hub.constants):  # what HF_HUB_OFFLINE=1 sets at import
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", True)
    hub = (
        r"hfds/acme/none: not in the cache and cannot be downloaded: HF_HUB_OFFLINE=1 is set\. .*"
        r"load_dataset\('acme/none', cache_dir=DIR\), then set data.root=DIR; nor is there a folder acme/none "
        r"here \(from .*\)$"  # a local folder's name misspelt reads as a Hub id: not one of the user's either
    )
    with pytest.raises(MissingPathError, match=hub):
        build_dataset("hfds/acme/none", "train", root=tmp_path, **NORM)
    # a folder of the user's by its path: no Hub advice (datasets read ./NAME as a malformed Hub id)
    for path in (tmp_path / "nowhere", "./nowhere"):
        with pytest.raises(
            MissingPathError, match=rf"no folder {re.escape(str(path))} \(from .*\); a dataset on"
        ):
            build_dataset(f"hfds/{path}", "train", root=tmp_path, **NORM)
    with pytest.raises(InputError, match=r"split train not found in info.*data.kwargs.train_split='NAME-"):
        build_dataset("wds/animals", "train", root=str(shards), **NORM, batch_size=8)
    assert "Dataset info file not found" not in caplog.text  # timm's line before attnxfer's own, dropped
    with pytest.raises(
        InputError, match=r"wds/animals reads webdataset tar shards under data.root: set data.root="
    ):
        build_dataset("wds/animals", "train", **NORM, batch_size=8)  # no root: not timm's TypeError
    # a streamed Hub dataset has no class count; its root is a cache, which would not give one
    cfg = load_config(None, ["data.dataset=hfids/acme/none"])
    with pytest.raises(
        InputError, match=r"'hfids/acme/none' does not say how many classes it has; set model.num_"
    ):
        num_classes_of(cfg, data_info(cfg.data))


def test_a_hub_dataset_where_the_hub_cannot_be_reached_is_read_from_its_cache_at_once(
    hf_dir, tmp_path, monkeypatch, caplog
):
    """With no Hub to reach and no HF_HUB_OFFLINE set (a compute node without internet), a Hub dataset is not
    asked of the Hub: one in datasets' cache is read from it, one not cached is refused saying so, each without
    huggingface_hub's ~25 s of retries a read and their lines; the offline mode is the read's alone."""
    import datasets
    import huggingface_hub.constants

    refused = socket.socket()  # a port nothing listens on: the endpoint refuses at once
    refused.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{refused.getsockname()[1]}"
    refused.close()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    for config in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
    with pytest.raises(
        MissingPathError,
        match=f"hfds/acme/none: not in the cache and cannot be downloaded: "
        f"{re.escape(endpoint)} cannot be reached\\. ",
    ):
        build_dataset("hfds/acme/none", "train", root=tmp_path, **NORM)
    # acme/animals as datasets caches a Hub dataset it read (NAMESPACE___NAME/CONFIG/VERSION/HASH), made
    # here from its cache of the local copy (a folder of the same name)
    cache = tmp_path / "cache"
    datasets.load_dataset(str(hf_dir), cache_dir=str(cache))
    [built] = [d for d in (cache / hf_dir.name / "default" / "0.0.0").iterdir() if d.is_dir()]
    shutil.copytree(built, cache / "acme___animals" / "default" / "0.0.0" / built.name)
    assert dataset_info("hfds/acme/animals", root=cache).class_names == CLASS_NAMES
    assert len(build_dataset("hfds/acme/animals", "val", root=cache, **NORM)) == N_VAL
    assert "Retrying" not in caplog.text and "thrown while requesting" not in caplog.text, caplog.text
    assert not datasets.config.HF_HUB_OFFLINE and not huggingface_hub.constants.HF_HUB_OFFLINE


def test_a_shard_the_split_names_that_is_not_under_the_root_is_refused_naming_it(shards):
    """webdataset skips a shard it cannot open with a log line: the run would end its epoch early, or fail
    with a traceback at its first validation on a val split of no images."""
    split = f"train-{{000000..000002}}.tar|{N_TRAIN}"  # 000002 is not there
    with pytest.raises(
        MissingPathError, match=r"1 of the train split's 3 shards are not under .*: train-000002.tar$"
    ):
        build_dataset("wds/animals", "train", root=str(shards), **NORM, batch_size=8, train_split=split)


def test_mae_pretrains_on_labelled_shards_without_a_class_count(shards, tmp_path):
    """MAE reads no label: a stream that does not count its classes needs no model.num_classes (which pretrain
    refuses, its encoder being headless)."""
    mae = [
        "model.name=vit_tiny_patch16_224",
        "model.kwargs={img_size: 28, patch_size: 7, depth: 1, embed_dim: 32, num_heads: 2}",
        "mae.decoder_dim=16",
        "mae.decoder_heads=2",
        "mae.decoder_depth=1",
        "mae.pictures=0",
        "schedule.max_steps=1",
    ]
    shared = [o for o in WDS if o.startswith(("data.", "log.", "checkpoint.every_epoch", "device"))]
    cfg = load_config(None, [*shared, *mae, f"data.root={shards}", f"run_dir={tmp_path / 'mae'}"])
    assert pretrain(cfg).steps == 1


def test_an_option_neither_hfds_nor_timms_transform_takes_is_refused_by_name(hf_dir, tmp_path):
    with pytest.raises(OptionError, match="has no option\\(s\\) train_samples \\(data.kwargs\\)"):
        build_dataset(f"hfds/{hf_dir}", "train", root=tmp_path, **NORM, train_samples=N_TRAIN)


def test_an_indexable_train_split_beside_a_streamed_val_split_trains_and_validates(
    hf_dir, shards, tmp_path, monkeypatch
):
    """A dataset whose train split is a folder (indexable, a resumable sampler) and whose val split is
    webdataset shards (a stream, no sampler): each split gets what it can take, and every val image is read."""
    cache = tmp_path / "cache"
    val_split = f"val-000000.tar|{N_VAL}"

    def folder_train_shards_val(split, *, root, img_size, in_chans, mean, std, seed):
        common = dict(img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed)
        if split == "train":
            return build_dataset(f"hfds/{hf_dir}", split, root=cache, **common)
        return build_dataset("wds/animals", split, root=str(shards), val_split=val_split, **common)

    monkeypatch.setattr(registry, "_DATASETS", dict(registry._DATASETS))
    info = dataset_info(f"hfds/{hf_dir}", root=cache)
    register_dataset("folder_train_shards_val", info=info)(folder_train_shards_val)
    overrides = [o for o in WDS if not o.startswith(("data.dataset", "data.kwargs"))]
    cfg = load_config(
        None, [f"run_dir={tmp_path / 'run'}", "data.dataset=folder_train_shards_val", *overrides]
    )
    parts = build_run_parts(cfg)
    assert isinstance(parts.train_sampler, ResumableSampler) and parts.train_sampler.length == N_TRAIN
    assert sum(len(y) for _, y in parts.val_loader) == N_VAL
    result = train(cfg)
    assert result.steps == 2 * N_TRAIN // 8


def test_a_streams_augmentation_in_the_main_process_draws_from_its_own_streams_not_the_trainings():
    """timm's transforms draw from the global RNGs: a stream read without DataLoader workers augmented its
    images from the training's streams (and advanced them), so its augmentation depended on the model's seed
    and, in a study, on which student loaded the batch. Now it depends on the data's seed alone."""
    draw = lambda img: torch.rand(2)  # a transform that draws, as timm's random crop and flip do
    image = Image.new("L", (4, 4))
    torch.manual_seed(1)
    drawn = ReadAs("L", draw, seed=3)(image)
    assert torch.equal(
        torch.get_rng_state(), torch.manual_seed(1).get_state()
    )  # the training's: not advanced
    torch.manual_seed(2)
    again = ReadAs("L", draw, seed=3)
    assert torch.equal(again(image), drawn)  # the same draw whatever the training's streams hold
    assert not torch.equal(again(image), drawn)  # its own stream goes on
    assert not torch.equal(ReadAs("L", draw, seed=4)(image), drawn)


@pytest.mark.slow  # a study of two students on the shards and each trained alone
def test_each_student_of_a_study_on_a_stream_ends_where_it_ends_alone(shards, tmp_path):
    """Without workers the stream's augmentation drew from the training's streams: the study's batches were
    augmented from the first student's, so the second (another seed, drop path on) ended elsewhere than alone."""
    args = [f"data.root={shards}", *WDS, "schedule.epochs=1", "model.drop_path_rate=0.1"]
    assert cli_main(["study", *args, f"run_dir={tmp_path / 's'}", "--vary", "seed=1,2"]) == 0
    last = "checkpoints/step-00000006/model.safetensors"
    for name in ("seed=1", "seed=2"):
        student, alone = tmp_path / "s" / name, tmp_path / "alone" / name
        assert cli_main(["train", "-c", str(student / "config.yaml"), f"run_dir={alone}"]) == 0
        assert_same_tensors(load_file(str(student / last)), load_file(str(alone / last)), name)


def test_wds_resumed_mid_epoch_keeps_the_epoch_length_and_schedule(shards, tmp_path):
    """Stopped after step 9 (mid epoch 2 of 6 steps), resumed from the step-9 checkpoint: the stream gives
    the 3 batches left, so the run ends at step 12 with every step logged once."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.root={shards}", *WDS])
    engine = build_engine(cfg)
    assert isinstance(engine.train_sampler, StreamPosition) and engine.steps_per_epoch == N_TRAIN // 8
    for step in engine.steps():
        if step == 9:
            break
    result = train(cfg)
    assert (result.steps, result.epochs_done) == (12, 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))
    lrs = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    ref = load_config(None, [f"run_dir={tmp_path / 'ref'}", f"data.root={shards}", *WDS])
    train(ref)  # the uninterrupted run: the same learning rate at every step
    ref_recs = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == {r["step"]: r["lr"] for r in ref_recs if r["split"] == "train"}
    assert [r["epoch"] for r in read_summary(tmp_path / "run")] == [0, 1]


def test_ranks_sharing_a_stream_read_whole_keep_every_sample_once():
    """A val stream of 7 samples that 3 ranks each read whole: rank r keeps samples r, r + 3, ... (the val
    sampler's order, which top-1's per-image hits restore), the shares' lengths say so, none is kept twice."""
    info = dataset_info("synthetic")
    samples = [(torch.tensor(i), i) for i in range(7)]
    shares = [StreamDataset(samples, info, None, share=(r, 3)) for r in range(3)]
    kept = [[y for _, y in share] for share in shares]
    assert kept == [[0, 3, 6], [1, 4], [2, 5]] and [len(s) for s in shares] == [3, 2, 2]
    assert [[len(x) for x in s.without_labels()] for s in shares] == [[1] * 3, [1] * 2, [1] * 2]


@pytest.mark.slow  # a run and an eval on 2 torchrun ranks
def test_a_streamed_val_split_on_two_ranks_scores_every_image_once(animals, tmp_path):
    """The 16 val images in two shards of 10 and 6: timm's reader would give rank 0 the first shard cut to 8
    and rank 1 the second read again to 8 (2 images missed, 2 scored twice). Trained on 2 ranks (the train
    split still shared out by timm), scored on 2 ranks and in one process: every image once, the same top-1
    and k-NN top-1 (its bank, the train split, whole on each rank)."""
    root = tmp_path / "shards"
    root.mkdir()
    pngs, labels = animals["val"]

    def write(path: Path, pairs, start: int) -> None:
        with tarfile.open(path, "w") as tar:
            for i, (png, label) in enumerate(pairs, start):
                for ext, data in (("png", png), ("cls", str(label).encode())):
                    member = tarfile.TarInfo(f"{i:06d}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))

    train_pngs, train_labels = animals["train"]
    write(root / "train-000000.tar", zip(train_pngs[:24], train_labels[:24]), 0)
    write(root / "train-000001.tar", zip(train_pngs[24:], train_labels[24:]), 24)
    write(root / "val-000000.tar", zip(pngs[:10], labels[:10]), 100)
    write(root / "val-000001.tar", zip(pngs[10:], labels[10:]), 110)
    splits = f"{{train_split: 'train-{{000000..000001}}.tar|{N_TRAIN}', val_split: 'val-{{000000..000001}}.tar|{N_VAL}'}}"
    keys = [*WDS, f"data.kwargs={splits}", "data.batch_size=4", "schedule.max_steps=2", f"data.root={root}"]
    run = tmp_path / "run"
    torchrun_attnxfer("train", *keys, f"run_dir={run}", timeout=400)
    (val,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val["val_count"] == N_VAL
    scores = {}
    for ranks in (1, 2):
        if ranks == 1:
            assert cli_main(["eval", *keys, f"run_dir={run}"]) == 0
        else:
            torchrun_attnxfer("eval", *keys, f"run_dir={run}", timeout=400)
        (path,) = run.glob("eval-*.json")
        scores[ranks] = json.loads(path.read_text())["metrics"]
        path.unlink()
    one, two = scores[1], scores[2]
    assert one["val_count"] == two["val_count"] == one["knn_count"] == two["knn_count"] == N_VAL
    assert two["val_top1"] == one["val_top1"] == val["val_top1"] and two["knn_top1"] == one["knn_top1"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)


# -- a lab's dataset through an installed distribution's entry point -------------------------------------
def test_register_dataset_through_an_installed_entry_point(install_package):
    install_package(
        {
            "labpkg/__init__.py": "from attnxfer.data import register_dataset\n"
            "from attnxfer.data.synthetic import SYNTHETIC_INFO, build_synthetic\n\n"
            "@register_dataset('lab_patterns', info=SYNTHETIC_INFO)\n"
            "def build(split, *, root=None, img_size=None, in_chans=None, mean=None, std=None, seed=0):\n"
            "    return build_synthetic(split, root=root, img_size=img_size, in_chans=in_chans, mean=mean,\n"
            "                           std=std, seed=seed, length=5)\n"
        },
        "[attnxfer.datasets]\nlab_patterns = labpkg\n",
    )
    ds = build_dataset("lab_patterns", "train", img_size=16)
    assert len(ds) == 5 and ds[0][0].shape == (3, 16, 16)
    assert "lab_patterns" in list_datasets()


def test_the_timm_prefixes_take_folders_transform_defaults_not_timms(hf_dir, shards, tmp_path):
    """Bicubic resizing and no colour jitter, as folder (timm's create_transform would give bilinear and a
    0.4 colour jitter), recorded as what the val split did."""
    options = {
        "train_split": f"train-{{000000..000001}}.tar|{N_TRAIN}",
        "val_split": f"val-000000.tar|{N_VAL}",
    }
    for split in ("train", "val"):
        hfds = build_dataset(f"hfds/{hf_dir}", split, root=tmp_path / "cache", **NORM)
        wds = build_dataset("wds/animals", split, root=str(shards), **NORM, **options, batch_size=8)
        for dataset in (hfds, wds):
            assert (dataset.info.interpolation, dataset.info.crop_pct) == ("bicubic", 0.875)
    train = repr(
        build_dataset(f"hfds/{hf_dir}", "train", root=tmp_path / "cache", **NORM).image_dataset.transform
    )
    assert "interpolation=bicubic" in train and "brightness=None" in train
