"""timm's ``torch/NAME`` datasets read from the files torchvision downloads, held to torchvision's own readers."""

import gzip
import io
import json
import os
import pickle
import re
import struct
import typing

import numpy as np
import pytest
import torch
import torchvision.datasets
from helpers import QUIET, run_cli
from PIL import Image

from attnxfer.data import build_dataset, dataset_info
from attnxfer.data.safe_pickle import UnsafePickleError
from attnxfer.errors import InputError, MissingPathError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Python2Pickler(pickle._Pickler):
    """Python 2's protocol-2 pickles, as CIFAR's files are: its byte strings (str) as BINSTRING opcodes, read
    back by Python 3 as text with encoding latin1 (numpy's array data too)."""

    dispatch: typing.ClassVar = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        size = len(obj)
        opcode = (
            pickle.SHORT_BINSTRING + bytes([size])
            if size < 256
            else pickle.BINSTRING + struct.pack("<i", size)
        )
        self.write(opcode + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _python2_pickle(obj) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _write_cifar10(root, per_batch=4, seed=0):
    """CIFAR-10 in torchvision's layout: five training batches, a test batch and the class names, pickled."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": file.encode(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / file).write_bytes(_python2_pickle(batch))
    names = [name.encode() for name in CIFAR10_NAMES]
    (folder / "batches.meta").write_bytes(_python2_pickle({b"label_names": names}))
    return folder


class _CIFAR10Unhashed(torchvision.datasets.CIFAR10):
    """torchvision's reader without its check of the real files' MD5 sums, for files these tests write."""

    meta: typing.ClassVar = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    def _check_integrity(self):
        return True


def _write_idx(path, array):
    """An IDX file (MNIST's format): a magic number naming uint8 data and the rank, each size, the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root, cls="MNIST", n=(12, 4)):
    rng = np.random.default_rng(1)
    raw = root / cls / "raw"
    raw.mkdir(parents=True)
    for prefix, count in zip(("train", "t10k"), n, strict=True):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count))


def test_cifar10_is_torchvisions_images_labels_and_classes_with_the_training_splits_statistics(tmp_path):
    _write_cifar10(tmp_path)
    for split, train in (("train", True), ("val", False)):
        ours = build_dataset("torch/cifar10", split, root=str(tmp_path), augment=False)
        theirs = _CIFAR10Unhashed(str(tmp_path), train=train)
        assert len(ours) == len(theirs) == (20 if train else 4)
        assert torch.equal(ours.images, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == theirs.targets
    info = dataset_info("torch/cifar10", root=str(tmp_path))
    assert info.class_names == tuple(theirs.classes) == tuple(CIFAR10_NAMES)
    pixels = _CIFAR10Unhashed(str(tmp_path), train=True).data / 255.0
    assert info.mean == pytest.approx(pixels.mean((0, 1, 2)), abs=1e-4)
    assert info.std == pytest.approx(pixels.std((0, 1, 2)), abs=1e-4)
    assert (info.in_chans, info.img_size, info.num_classes) == (3, 32, 10)


def test_a_cifar_batch_that_would_run_code_when_unpickled_is_refused_and_runs_nothing(tmp_path):
    """torchvision's CIFAR reader calls pickle.load on the batches: a planted one would run its code."""
    folder = _write_cifar10(tmp_path)
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Planted()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="data_batch_3.*references the global"):
        build_dataset("torch/cifar10", "train", root=str(tmp_path))
    assert not marker.exists()


def test_cifar_made_grey_is_pils_grey_and_mnist_is_torchvisions_at_any_channel_count(tmp_path):
    _write_cifar10(tmp_path)
    grey = build_dataset("torch/cifar10", "val", root=str(tmp_path), in_chans=1, augment=False)
    rgb = build_dataset("torch/cifar10", "val", root=str(tmp_path), augment=False)
    for image, colour in zip(grey.images, rgb.images, strict=True):
        pil = Image.fromarray(colour.permute(1, 2, 0).numpy()).convert("L")
        assert torch.equal(image[0], torch.from_numpy(np.array(pil)))
    # normalised by the grey training split's own statistics (luma weights, not a plain average of channels)
    train = np.stack(
        [np.array(Image.fromarray(c).convert("L")) for c in _CIFAR10Unhashed(str(tmp_path)).data]
    )
    assert grey.info.mean == pytest.approx((train.mean() / 255,), abs=1e-4)
    assert grey.info.std == pytest.approx((train.std() / 255,), abs=1e-4)
    _write_mnist(tmp_path)
    theirs = torchvision.datasets.MNIST(str(tmp_path), train=True)
    for chans in (1, 3):
        ours = build_dataset("torch/mnist", "train", root=str(tmp_path), in_chans=chans, img_size=28)
        assert torch.equal(ours.images[:, 0], theirs.data) and ours.labels.tolist() == theirs.targets.tolist()
        x, label = ours[0]
        assert x.shape == (chans, 28, 28) and label == theirs.targets[0]
    assert ours.hflip == 0.0 and ours.crop_padding == 2  # digits are not flipped
    assert dataset_info("torch/mnist", root=str(tmp_path)).class_names == tuple(theirs.classes)


def test_torch_datasets_say_what_to_change_where_they_cannot_be_read(tmp_path):
    with pytest.raises(InputError, match="set data.root=PATH"):
        dataset_info("torch/cifar10")
    with pytest.raises(
        MissingPathError,
        match=re.escape("torchvision.datasets.CIFAR100('" + str(tmp_path) + "', download=True)"),
    ):
        dataset_info("torch/cifar100", root=str(tmp_path))
    with pytest.raises(InputError, match="unknown dataset 'cifar10'; did you mean 'torch/cifar10'"):
        dataset_info("cifar10")  # timm's name for it is torch/cifar10
    with pytest.raises(InputError, match="torch/cifar10, torch/cifar100, torch/mnist, .*data.dataset=folder"):
        dataset_info("torch/svhn", root=str(tmp_path))
    folder = _write_cifar10(tmp_path)
    with pytest.raises(
        MissingPathError,
        match=rf"a folder of the dataset's own \(cifar-10-batches-py/\); .*={re.escape(str(tmp_path))}$",
    ):
        dataset_info("torch/cifar10", root=str(folder))  # torchvision's root is the folder above
    with pytest.raises(
        InputError, match=r"download: torch/ datasets are read from data.root, never downloaded"
    ):
        build_dataset(
            "torch/cifar10", "train", root=str(tmp_path), download=True
        )  # timm's --dataset-download
    (folder / "data_batch_2").unlink()
    with pytest.raises(MissingPathError, match="data_batch_2 does not exist"):
        build_dataset("torch/cifar10", "train", root=str(tmp_path))
    _write_mnist(tmp_path, "FashionMNIST")
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MissingPathError, match="torch/fashion_mnist: '.*raw' lacks t10k-labels-idx1-ubyte$"):
        build_dataset("torch/fashion_mnist", "val", root=str(tmp_path))


@pytest.mark.slow
def test_a_run_trains_resumes_and_evaluates_on_torch_cifar10(tmp_path, capsys):
    _write_cifar10(tmp_path / "data", per_batch=8)
    run = tmp_path / "run"
    common = [
        "data.dataset=torch/cifar10",
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=8",
        "data.img_size=32",
        "transfer.mode=none",
        "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2, patch_size: 8}",
        f"run_dir={run}",
        *QUIET,
    ]
    assert run_cli(capsys, "train", *common, "schedule.max_steps=2")[0] == 0
    code, out, err = run_cli(capsys, "train", *common, "schedule.max_steps=4")  # resumed: the same data
    assert code == 0 and "resumed from checkpoint step 2" in out + err, out + err
    record = json.loads((run / "run.json").read_text())
    assert record["class_names"] == CIFAR10_NAMES and record["data"]["samples"] == 40  # its training split
    code, out, err = run_cli(capsys, "eval", str(run))
    assert code == 0 and "val_top1 (%) [95% Wilson interval, 8 images]" in out + err, out + err


def test_idx_files_left_gzipped_are_told_to_be_unpacked(tmp_path):
    """torchvision reads the IDX files its download unpacks beside the .gz: the .gz alone is told to gunzip."""
    _write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress((raw / "t10k-images-idx3-ubyte").read_bytes())
    )
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(
        MissingPathError, match=r"lacks t10k-images-idx3-ubyte \(gunzip t10k-images-idx3-ubyte.gz"
    ):
        dataset_info("torch/mnist", root=str(tmp_path))
