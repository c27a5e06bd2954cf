"""attnxfer.data: datasets (animal_mnist, synthetic, folder), safe unpickling, the resumable sampler."""

import gzip
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import shutil
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET, image_folder, run_cli
from torch.utils.data import DistributedSampler

from attnxfer.data import (
    DatasetInfo,
    ResumableSampler,
    SampleKey,
    UnsafePickleError,
    build_dataset,
    build_loader,
    dataset_info,
    list_datasets,
    load_numpy_pickle,
    register_dataset,
)
from attnxfer.data.animal_mnist import CLASS_NAMES, load_animal_mnist_arrays
from attnxfer.errors import InputError, MissingPathError
from attnxfer.launch import cli

# sha256 of the val indices (int64 little-endian): the split must never change.
ANIMAL_MNIST_VAL_SHA256 = "4c7b5dfefd4fb4ece57758c74a08b01658fe95557f340ba5545db4e8d7f464b7"


@pytest.fixture(scope="module")
def animal_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("ATTNXFER_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def animal_train(animal_cache):
    return build_dataset("animal_mnist", "train", seed=7)


@pytest.fixture(scope="module")
def animal_val(animal_cache):
    return build_dataset("animal_mnist", "val")


# ----------------------------------------------------------------------------------------- animal_mnist


def test_animal_mnist_counts_and_split(animal_train, animal_val):
    assert len(animal_train) == 9000 and len(animal_val) == 1000
    assert np.bincount(animal_train.labels.numpy(), minlength=10).tolist() == [900] * 10
    assert np.bincount(animal_val.labels.numpy(), minlength=10).tolist() == [100] * 10
    info = dataset_info(animal_train)
    assert (
        info.num_classes == 10 and info.class_names == CLASS_NAMES == dataset_info("animal_mnist").class_names
    )
    assert (info.in_chans, info.img_size) == (1, 28)

    arrays = load_animal_mnist_arrays()
    assert arrays.images.shape == (10000, 28, 28) and arrays.images.dtype == np.uint8
    assert len(np.intersect1d(arrays.train_idx, arrays.val_idx)) == 0
    assert np.array_equal(np.union1d(arrays.train_idx, arrays.val_idx), np.arange(10000))
    assert hashlib.sha256(arrays.val_idx.astype("<i8").tobytes()).hexdigest() == ANIMAL_MNIST_VAL_SHA256
    # The package holds exact duplicates; no val image may also be a training image.
    train_bytes = {arrays.images[i].tobytes() for i in arrays.train_idx}
    assert not any(arrays.images[i].tobytes() in train_bytes for i in arrays.val_idx)


def test_animal_mnist_is_real_and_normalised(animal_train, animal_val):
    raw = animal_train.images[:, 0].double() / 255
    labels = animal_train.labels
    # Pinned default mean/std are the training split's pixel statistics.
    assert animal_train.info.mean[0] == pytest.approx(raw.mean().item(), abs=1e-4)
    assert animal_train.info.std[0] == pytest.approx(raw.std().item(), abs=1e-4)
    # Eval samples are exactly (pixel/255 - mean) / std.
    x, y = animal_val[5]
    expected = (animal_val.images[5].float() / 255 - 0.2727) / 0.4056
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(animal_val.labels[5])
    torch.testing.assert_close(x, expected)
    # Real, class-dependent images: per-class mean images are far apart.
    means = torch.stack([raw[labels == c].mean(0) for c in range(10)])
    dists = torch.cdist(means.flatten(1), means.flatten(1))
    assert dists[~torch.eye(10, dtype=torch.bool)].min() > 1.0
    # Class order: giraffes are by far the tallest shapes, zebras the only striped (mid-grey) ones.
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    w = means / means.sum((1, 2), keepdim=True)

    def spread(coord):
        mu = (w * coord).sum((1, 2), keepdim=True)
        return (w * (coord - mu) ** 2).sum((1, 2))

    assert CLASS_NAMES[int((spread(ys) / spread(xs)).argmax())] == "giraffe"
    grey = ((animal_train.images > 51) & (animal_train.images < 204)).flatten(1).double().mean(1)
    mid_grey = torch.stack([grey[labels == c].mean() for c in range(10)])
    assert CLASS_NAMES[int(mid_grey.argmax())] == "zebra"


def test_animal_mnist_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNXFER_CACHE", str(tmp_path))
    first = build_dataset("animal_mnist", "val")
    files = list(tmp_path.rglob("*"))
    npz = [f for f in files if f.suffix == ".npz"]
    assert len(npz) == 1 and not [f for f in files if f.suffix == ".tmp"]
    # Rewrite the cache with inverted images: a second build must show them (it read the cache).
    with np.load(npz[0], allow_pickle=False) as z:
        arrays = dict(z)
    arrays["images"] = 255 - arrays["images"]
    np.savez(npz[0], **arrays)
    second = build_dataset("animal_mnist", "val")
    assert torch.equal(second.images, 255 - first.images)


def test_an_animal_mnist_root_under_a_missing_folder_is_refused_not_created(tmp_path):
    """data.root is where animal_mnist caches its arrays: a new folder in an existing one is made, but a
    typo'd path is refused, naming the missing folder, instead of being created silently."""
    typo = tmp_path / "dtaa" / "animal"
    with pytest.raises(MissingPathError, match=f"data.root='{typo}'.*'{typo.parent}' does not exist"):
        build_dataset("animal_mnist", "val", root=str(typo))
    assert not typo.parent.exists()
    build_dataset("animal_mnist", "val", root=str(tmp_path / "cache"))
    assert list((tmp_path / "cache").rglob("*.npz"))


def test_animal_mnist_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNXFER_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "animal_mnist", None)  # how Python marks a module as unavailable
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps animal-mnist==0\.4"):
        build_dataset("animal_mnist", "train")


def test_animal_mnist_resize_and_channels(animal_cache):
    ds = build_dataset("animal_mnist", "val", img_size=32, in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.25,))
    x, _ = ds[0]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert dataset_info(ds).std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="in_chans=3"):
        build_dataset("animal_mnist", "val", in_chans=3, mean=(0.1, 0.2))


@pytest.mark.parametrize(
    ("option", "said"),
    [(dict(hflip=2), "hflip is a probability"), (dict(crop_padding=-1), "crop_padding must be >= 0")],
)
def test_an_animal_mnist_augmentation_option_out_of_range_is_one_line_naming_data_kwargs(
    animal_cache, option, said
):
    """hflip: 2 or crop_padding: -1 in data.kwargs stop the run with a line naming the key, not a traceback."""
    with pytest.raises(InputError, match=f"{said}.*data.kwargs.{next(iter(option))}"):
        build_dataset("animal_mnist", "train", **option)


# ------------------------------------------------------------------------------------------ augmentation


def _shifts_and_flips(img: torch.Tensor, pad: int):
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[-2:]
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[..., top : top + h, left : left + w]
            yield crop
            yield crop.flip(-1)


def test_augmentation_is_a_function_of_seed_epoch_index(animal_train, animal_cache):
    a, _ = animal_train[SampleKey(11, epoch=3)]
    b, _ = animal_train[SampleKey(11, epoch=3)]
    assert torch.equal(a, b)
    changed_epoch = sum(
        not torch.equal(animal_train[SampleKey(i, 3)][0], animal_train[SampleKey(i, 4)][0]) for i in range(20)
    )
    assert changed_epoch >= 15  # 50 shift/flip outcomes: an unchanged draw has chance 1/50
    other_seed = build_dataset("animal_mnist", "train", seed=8)
    assert (
        sum(
            not torch.equal(animal_train[SampleKey(i, 3)][0], other_seed[SampleKey(i, 3)][0])
            for i in range(20)
        )
        >= 15
    )
    # A plain int index uses the dataset's epoch.
    animal_train.set_epoch(3)
    assert torch.equal(animal_train[11][0], a)
    animal_train.set_epoch(0)
    # The augmented sample is a <=2 px shift (zero fill), possibly flipped, of the clean image.
    clean = animal_train.images[11].float() / 255
    pixels = a[0] * 0.4056 + 0.2727
    assert any(torch.allclose(pixels, cand, atol=1e-5) for cand in _shifts_and_flips(clean, 2))
    # Val is not augmented.
    val = build_dataset("animal_mnist", "val")
    assert torch.equal(val[SampleKey(3, 0)][0], val[SampleKey(3, 9)][0])


def _epoch_batches(loader, sampler, epoch, position=0):
    sampler.set_epoch(epoch)
    sampler.set_position(position)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_batches_identical_across_worker_counts_and_resume(animal_cache):
    # Not a torch Subset: Subset indexes its own index list with the key and so drops the epoch.
    ds = build_dataset("animal_mnist", "val", augment=True, seed=3)
    runs = {}
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), shuffle=True, seed=5)
        loader = build_loader(ds, batch_size=100, sampler=sampler, num_workers=workers, drop_last=True)
        runs[workers] = [_epoch_batches(loader, sampler, e) for e in (0, 1)]
        # Persistent workers saw epoch 1: the batch is the epoch-1 augmentation of its indices.
        first = list(sampler)[:100]
        assert torch.equal(runs[workers][1][0][0], torch.stack([ds[SampleKey(i, 1)][0] for i in first]))
    for e in (0, 1):
        for (x0, y0), (x2, y2) in zip(runs[0][e], runs[2][e], strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)
    # Resume epoch 1 after 3 of its 10 steps (persistent workers): exactly the remaining batches.
    sampler = ResumableSampler(len(ds), shuffle=True, seed=5)
    loader = build_loader(ds, batch_size=100, sampler=sampler, num_workers=2, drop_last=True)
    resumed = _epoch_batches(loader, sampler, 1, position=3 * 100)
    assert len(resumed) == 7
    for (xr, yr), (xf, yf) in zip(resumed, runs[0][1][3:], strict=True):
        assert torch.equal(xr, xf) and torch.equal(yr, yf)


# --------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize(
    "length,world_size,drop_last,shuffle",
    [
        (10, 1, True, True),
        (10, 3, True, True),
        (10, 3, False, True),
        (10, 4, False, False),
        (2, 5, False, True),
        (97, 8, True, True),
    ],
)
def test_sampler_matches_distributed_sampler_and_covers_epoch(length, world_size, drop_last, shuffle):
    shares = []
    for rank in range(world_size):
        ours = ResumableSampler(
            length, shuffle=shuffle, seed=3, rank=rank, world_size=world_size, drop_last=drop_last
        )
        ref = DistributedSampler(
            range(length), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=3, drop_last=drop_last
        )
        ours.set_epoch(4)
        ref.set_epoch(4)
        got = list(ours)
        assert got == list(ref) and len(ours) == len(ref)
        assert all(isinstance(k, SampleKey) and k.epoch == 4 for k in got)
        shares.append(got)
    union = [i for share in shares for i in share]
    assert len({len(s) for s in shares}) == 1
    if drop_last:
        assert len(union) == len(set(union)) == (length // world_size) * world_size
    else:
        assert set(union) == set(range(length)) and len(union) == math.ceil(length / world_size) * world_size


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_position_resumes_exactly(drop_last):
    length, world, batch = 103, 3, 4
    full = [
        list(ResumableSampler(length, shuffle=True, seed=1, rank=r, world_size=world, drop_last=drop_last))
        for r in range(world)
    ]
    for steps in (0, 1, 5, len(full[0]) // batch):
        for r in range(world):
            s = ResumableSampler(length, shuffle=True, seed=1, rank=r, world_size=world, drop_last=drop_last)
            s.set_position(steps * batch * world)
            assert list(s) == full[r][steps * batch :] and len(s) == len(full[r]) - steps * batch
    # Epoch fully consumed (padded end included): nothing left.
    s = ResumableSampler(length, shuffle=True, seed=1, world_size=world, drop_last=drop_last)
    s.set_position(len(full[0]) * world)
    assert list(s) == [] and len(s) == 0


def test_sampler_resume_on_another_world_size_yields_the_rest():
    before = [
        ResumableSampler(50, shuffle=True, seed=2, rank=r, world_size=2, drop_last=False) for r in range(2)
    ]
    for s in before:
        s.set_epoch(1)
        s.set_position(3 * 2 * 2)  # three steps of per-rank batch 2 on 2 ranks
    consumed = set()
    for r in range(2):  # each old rank's first three batches of epoch 1
        fresh = ResumableSampler(50, shuffle=True, seed=2, rank=r, world_size=2, drop_last=False)
        fresh.set_epoch(1)
        consumed |= set(list(fresh)[:6])
    state = json.loads(json.dumps(before[0].state_dict()))
    after = []
    for r in range(3):
        s = ResumableSampler(50, shuffle=True, seed=2, rank=r, world_size=3, drop_last=False)
        s.load_state_dict(state)
        after.append(list(s))
    order = before[0].epoch_order()
    rest = [i for share in after for i in share]
    assert state["epoch"] == 1 and state["position"] == 12
    # The rest of the order, padded to 39 = 3 x 13 by repeating the epoch's order from its start.
    assert sorted(rest) == sorted(order[12:] + order[:1])
    assert consumed == set(order[:12]) and not consumed & set(order[12:])
    assert after[0][:2] == [order[12], order[15]]  # strided over the new ranks


@pytest.mark.parametrize("length,world_size", [(61, 2), (10, 3), (2, 5), (0, 2), (97, 8)])
def test_exact_sampler_scores_every_sample_once_at_every_world_size(length, world_size):
    """Evaluation's sampler: rank r holds exactly order[r::world] (no padded copies, no dropped tail)."""
    shares = [
        list(
            ResumableSampler(
                length, shuffle=False, rank=r, world_size=world_size, drop_last=False, exact=True
            )
        )
        for r in range(world_size)
    ]
    for r, share in enumerate(shares):
        assert share == list(range(length))[r::world_size]
    union = [i for share in shares for i in share]
    assert sorted(union) == list(range(length))  # each index exactly once
    lens = [len(ResumableSampler(length, shuffle=False, rank=r, world_size=world_size, drop_last=False,
                                 exact=True)) for r in range(world_size)]  # fmt: skip
    assert lens == [len(s) for s in shares]
    with pytest.raises(ValueError, match="cannot drop_last"):
        ResumableSampler(4, shuffle=False, drop_last=True, exact=True)


def test_a_sampler_state_survives_json_and_refuses_another_seed_or_a_position_past_the_epoch():
    s = ResumableSampler(20, shuffle=True, seed=0)
    s.set_epoch(2)
    s.set_position(8)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    other = ResumableSampler(20, shuffle=True, seed=1)
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="consumed in the current epoch"):
        s.set_position(500)
    s.set_epoch(3)  # a new epoch restarts at 0; setting the same epoch keeps the position
    assert s.position == 0
    s.set_position(s.position + 4)
    s.set_epoch(3)
    assert s.position == 4


def test_sample_key_is_an_int_that_survives_pickling():
    key = SampleKey(7, epoch=2)
    assert key == 7 and [10, 11, 12, 13, 14, 15, 16, 17][key] == 17
    back = pickle.loads(pickle.dumps(key))
    assert type(back) is SampleKey and back == 7 and back.epoch == 2


# ----------------------------------------------------------------------------------------- safe pickle


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(_Exploit(marker))))
    with pytest.raises(UnsafePickleError, match=r"references the global '(posix|os|nt)\.system'.*numpy"):
        load_numpy_pickle(evil)
    assert not marker.exists()
    # An object array holds arbitrary objects: refused as well.
    obj = tmp_path / "obj.pkl"
    obj.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(UnsafePickleError, match="object array"):
        load_numpy_pickle(obj)


def test_unpickler_reads_plain_numpy_arrays(tmp_path):
    for arr in (
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.linspace(0, 1, 5, dtype=np.float32),
        np.array(["cat", "dog"]),
    ):
        f = tmp_path / "a.gz"
        f.write_bytes(gzip.compress(pickle.dumps(arr, protocol=4)))
        out = load_numpy_pickle(f)
        assert out.dtype == arr.dtype and np.array_equal(out, arr)


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    kw = dict(img_size=16, in_chans=3, num_classes=4, length=200, seed=3)
    a = build_dataset("synthetic", "train", **kw)
    b = build_dataset("synthetic", "train", **kw)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(0, 200, 17))
    c = build_dataset("synthetic", "train", **{**kw, "seed": 4})
    assert not torch.equal(a[0][0], c[0][0])
    val = build_dataset("synthetic", "val", **{**kw, "length": 100})
    assert not torch.equal(a[0][0], val[0][0])
    # Learnable: class means of the train split classify the val split.
    xs = torch.stack([a[i][0] for i in range(len(a))]).flatten(1)
    ys = torch.tensor([a[i][1] for i in range(len(a))])
    centroids = torch.stack([xs[ys == k].mean(0) for k in range(4)])
    vx = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    vy = torch.tensor([val[i][1] for i in range(len(val))])
    assert (torch.cdist(vx, centroids).argmin(1) == vy).float().mean() > 0.95
    assert np.bincount(ys.numpy()).tolist() == [50] * 4


@pytest.mark.parametrize(
    "in_chans,img_size,num_classes,length", [(1, 8, 3, 7), (3, 28, 10, 20), (4, 5, 2, 1)]
)
def test_synthetic_images_have_the_requested_channels_size_classes_and_length(
    in_chans, img_size, num_classes, length
):
    ds = build_dataset(
        "synthetic", "train", in_chans=in_chans, img_size=img_size, num_classes=num_classes, length=length
    )
    x, y = ds[length - 1]
    assert len(ds) == length and x.shape == (in_chans, img_size, img_size) and 0 <= y < num_classes
    assert dataset_info(ds).num_classes == num_classes


# --------------------------------------------------------------------------------------------- folder


def _make_folder(root: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 3)):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                root / "train" / cls / f"{i}.png"
            )
    (root / "val" / "dog").mkdir(parents=True)  # val lacks 'cat': 'dog' must keep train's index 1
    for i, color in enumerate([(200, 100, 50), (10, 20, 30)]):
        Image.new("RGB", (40, 48), color).save(root / "val" / "dog" / f"{i}.png")


def test_folder_classes_are_its_subfolders_val_is_normalised_and_train_augments_per_epoch(tmp_path):
    _make_folder(tmp_path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    val = build_dataset("folder", "val", root=tmp_path, img_size=32, mean=mean, std=std)
    assert (
        dataset_info("folder", root=tmp_path).class_names == ("cat", "dog") == dataset_info(val).class_names
    )
    assert len(val) == 2 and [val[i][1] for i in range(2)] == [1, 1]
    x, _ = val[0]
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)

    train = build_dataset("folder", "train", root=tmp_path, img_size=24, seed=1)
    assert len(train) == 6 and sorted(train[i][1] for i in range(6)) == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _ = train[SampleKey(2, epoch=0)]
    assert torch.equal(torch.rand(3), before)  # the transform's seeding left the global RNG alone
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, train[SampleKey(2, epoch=0)][0])
    assert not torch.equal(a, train[SampleKey(2, epoch=1)][0])


def test_folder_missing_paths_are_explained(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"'{missing}' does not exist.*root/train/<class>/"):
        build_dataset("folder", "train", root=missing)
    (tmp_path / "a.png").write_bytes(b"")  # an image's path given as the root
    with pytest.raises(FileNotFoundError, match=r"a.png' is a file, not a folder; expected the layout"):
        build_dataset("folder", "train", root=tmp_path / "a.png")
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no val/ or validation/ sub-folder.*root/val/<class>/"):
        build_dataset("folder", "val", root=tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset("folder", "train", root=tmp_path / "ds")
    with pytest.raises(ValueError, match="needs root=PATH"):
        build_dataset("folder", "train")
    # the train folder given as the dataset's: its classes are no split, and its parent is the dataset
    _make_folder(tmp_path / "ok")
    said = (
        rf"\(it has cat/, dog/: train/ is a split's folder, not the dataset's: data.root={tmp_path / 'ok'}\)"
    )
    with pytest.raises(FileNotFoundError, match=said):
        build_dataset("folder", "train", root=tmp_path / "ok" / "train")


def test_a_folder_whose_val_split_is_named_test_is_read_through_val_split_which_its_refusal_names(tmp_path):
    """Many folders ship train/ and test/ (timm's train.py: --val-split test): the refusal of the missing val/
    lists the folders there and the option; ``val_split`` then validates on that folder with train's classes."""
    _make_folder(tmp_path)
    (tmp_path / "val").rename(tmp_path / "test")
    said = r"has no val/ or validation/ sub-folder for split 'val' \(it has test/, train/\); data.kwargs=\{val_split: test\}"
    with pytest.raises(FileNotFoundError, match=said):
        build_dataset("folder", "val", root=tmp_path, img_size=16)
    val = build_dataset("folder", "val", root=tmp_path, img_size=16, val_split="test")
    assert len(val) == 2 and [val[i][1] for i in range(2)] == [1, 1]  # dog: train's index
    assert val.image_dataset.reader.filename(0, absolute=True) == str(tmp_path / "test" / "dog" / "0.png")
    assert len(build_dataset("folder", "train", root=tmp_path, img_size=16, val_split="test")) == 6
    with pytest.raises(FileNotFoundError, match=r"has no tset/ \(data.kwargs val_split\) for split 'val'"):
        build_dataset("folder", "val", root=tmp_path, img_size=16, val_split="tset")


def test_a_class_map_reads_the_classes_it_names_in_its_order_and_no_other(tmp_path):
    """timm's --class-map: a subset of the class folders (ImageNet-100's list), indexed in the file's order; the
    images of the classes it leaves out are read in neither split, and their folders are not refused as
    classes train lacks. As a file (found under data.root too, as timm looks) or as a list."""
    image_folder(tmp_path / "data", classes=4, per_class={"train": 3, "val": 2})
    (tmp_path / "data" / "val" / "class9").mkdir()  # a val class train lacks: outside the map, not read
    (tmp_path / "data" / "val" / "class9" / "0.png").write_bytes(
        (tmp_path / "data/val/class0/0.png").read_bytes()
    )
    (tmp_path / "data" / "subset.txt").write_text("class2\n\nclass0\n")  # a blank line is no class
    root = str(tmp_path / "data")
    for class_map in ("subset.txt", str(tmp_path / "data" / "subset.txt"), ["class2", "class0"]):
        info = dataset_info("folder", root=root, options={"class_map": class_map})
        assert info.class_names == ("class2", "class0") and info.num_classes == 2
        for split, per_class in (("train", 3), ("val", 2)):
            ds = build_dataset("folder", split, root=root, img_size=16, class_map=class_map, augment=False)
            reader = ds.image_dataset.reader
            files = [reader.filename(i) for i in range(len(ds))]
            assert [f.split("/")[0] for f in files] == ["class0"] * per_class + ["class2"] * per_class
            assert [ds[i][1] for i in range(len(ds))] == [1] * per_class + [0] * per_class
    # read without labels (a label-free conversion on the subset), the same images
    unlabelled = build_dataset(
        "folder", "train", root=root, img_size=16, class_map="subset.txt", labels=False
    )
    reader = getattr(unlabelled, "dataset", unlabelled).image_dataset.reader
    folders = [reader.filename(i).split("/")[0] for i in range(len(unlabelled))]
    assert folders == ["class0"] * 3 + ["class2"] * 3
    with pytest.raises(
        InputError, match=r"names 1 class\(es\) that '.*train' has no folder for \(e.g. 'yak'\)"
    ):
        dataset_info("folder", root=root, options={"class_map": ["class1", "yak"]})
    with pytest.raises(InputError, match=r"names 'class1' more than once"):
        build_dataset("folder", "train", root=root, class_map=["class1", "class1"])
    with pytest.raises(FileNotFoundError, match=r"class_map=nope.txt: cannot be read as a text file"):
        build_dataset("folder", "train", root=root, class_map="nope.txt")


def test_a_train_class_folder_without_images_is_refused_not_a_class_nothing_teaches(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "emu").mkdir()  # a class the head would get and no image would teach
    (tmp_path / "train" / "emu" / "notes.txt").write_text("to do")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['emu'\] of .* hold no images"):
        build_dataset("folder", "train", root=tmp_path)
    (tmp_path / "val" / "emu").mkdir()  # val may lack a class's images: its folder is no error
    assert len(build_dataset("folder", "val", root=tmp_path)) == 2


def test_a_folder_image_is_its_class_folders_at_any_depth_and_one_outside_every_class_is_refused(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "2024" / "05").mkdir(parents=True)  # timm would call these class '05'
    (tmp_path / "train" / "dog" / "0.png").rename(tmp_path / "train" / "cat" / "2024" / "05" / "x.png")
    (tmp_path / "train" / "dog" / "cat").mkdir()  # ... and these class 'cat'
    (tmp_path / "train" / "dog" / "1.png").rename(tmp_path / "train" / "dog" / "cat" / "y.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden: no class, its images none
    (tmp_path / "train" / "cat" / "0.png").replace(tmp_path / "train" / ".ipynb_checkpoints" / "0.png")
    train = build_dataset("folder", "train", root=tmp_path, img_size=24)
    assert dataset_info("folder", root=tmp_path).class_names == ("cat", "dog")
    labelled = dict(zip(train.image_dataset.filenames(), (train[i][1] for i in range(len(train)))))
    assert labelled == {
        "cat/1.png": 0,
        "cat/2.png": 0,
        "cat/2024/05/x.png": 0,
        "dog/2.png": 1,
        "dog/cat/y.png": 1,
    }
    (tmp_path / "val" / "stray.png").write_bytes((tmp_path / "val" / "dog" / "0.png").read_bytes())
    with pytest.raises(
        ValueError,
        match=r"lie outside any class folder \(e.g. 'stray.png'\).*data.labels=false reads them all",
    ):  # MAE pre-training reads no label: unlabelled images need no class folders
        build_dataset("folder", "val", root=tmp_path)


def test_imagenets_val_split_as_distributed_in_one_folder_is_told_where_its_classes_are(tmp_path):
    """ImageNet's val images come in one folder, their classes in a list beside them: the refusal of images
    outside class folders names the list where the files and classes are ImageNet's, and only there."""
    _make_folder(tmp_path)
    for old, wnid in (("cat", "n01440764"), ("dog", "n01443537")):
        (tmp_path / "train" / old).rename(tmp_path / "train" / wnid)
    shutil.rmtree(tmp_path / "val")
    (tmp_path / "val").mkdir()
    image = tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"
    image.write_bytes(next((tmp_path / "train" / "n01440764").iterdir()).read_bytes())
    said = r"\(e.g. 'ILSVRC2012_val_00000001.JPEG'\): move them into their class's folder \(ImageNet's val images: "
    with pytest.raises(
        InputError, match=said + "the first word of each row of Kaggle's LOC_val_solution.csv"
    ):
        build_dataset("folder", "val", root=tmp_path)
    image.rename(tmp_path / "val" / "photo.JPEG")
    with pytest.raises(InputError, match=r"move them into their class's folder \(data.labels=false"):
        build_dataset("folder", "val", root=tmp_path)


def test_a_task_loss_over_a_folder_of_one_class_stops_before_the_run_starts(tmp_path, capsys):
    """Softmax over one class: the cross-entropy is 0 whatever the student does, and top-1 is 100 %."""
    _make_folder(tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "train" / "cat")
    run = ["train", "data.dataset=folder", f"data.root={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}"]
    code, _, err = run_cli(capsys, *run, "transfer.mode=none")
    assert (
        code == 2
        and "error: data.dataset=folder has one class (task loss 0): add one, or set transfer.task" in err
    )
    assert not (tmp_path / "run").exists()


def test_a_symlinked_class_folder_and_a_symlinked_folder_inside_one_are_read_as_folders(tmp_path):
    """A class folder linked in from elsewhere holds images (not 'no images'), and so does a linked folder
    below a class folder (not skipped without a word): as torchvision's and timm's folder readers walk them."""
    _make_folder(tmp_path / "data")
    train = tmp_path / "data" / "train"
    (train / "cat").rename(tmp_path / "cats")
    (train / "cat").symlink_to(tmp_path / "cats")
    (tmp_path / "more").mkdir()
    (train / "dog" / "0.png").rename(tmp_path / "more" / "x.png")
    (train / "dog" / "more").symlink_to(tmp_path / "more")
    names = build_dataset("folder", "train", root=tmp_path / "data", img_size=16).image_dataset.filenames()
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png", "dog/more/x.png"]


def test_files_of_formats_timm_does_not_read_are_named_not_left_out_in_silence(tmp_path, capsys):
    """timm reads .jpeg, .jpg and .png alone: a .webp beside a class's PNGs is no training image, and the
    run says so (the count and one of them) instead of training on fewer images without a word."""
    from PIL import Image

    _make_folder(tmp_path)
    Image.new("RGB", (40, 48)).save(tmp_path / "train" / "cat" / "3.webp")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("taken on 2024-05-01")
    train = build_dataset("folder", "train", root=tmp_path, img_size=16)
    assert len(train) == 6
    said = (
        f"2 file(s) under '{tmp_path / 'train'}' are not read (1 .webp, 1 .txt; e.g. 'cat/3.webp'), as timm"
    )
    assert f"{said} reads only .jpeg, .jpg, .png images" in capsys.readouterr().err  # each kind counted
    build_dataset("folder", "val", root=tmp_path, img_size=16)
    assert "not read" not in capsys.readouterr().err  # a split of images alone: no line


def test_a_run_folder_inside_a_split_folder_is_refused_not_read_as_its_images(tmp_path):
    """run_dir=data/train/cat/run: its curves and attention pictures were read as images of 'cat' (with labels,
    or as unlabelled ones), or its folder refused as a class without images."""
    from PIL import Image

    _make_folder(tmp_path)
    run = tmp_path / "train" / "cat" / "run"
    run.mkdir()
    (run / "attnxfer.lock").touch()
    Image.new("RGB", (40, 48)).save(run / "curves.png")
    for labels in (True, False):
        with pytest.raises(
            InputError, match=f"'{re.escape(str(run))}' is an attnxfer run's folder .* put run_dir"
        ):
            build_dataset("folder", "train", root=tmp_path, labels=labels)


@pytest.mark.parametrize(
    "keep, reason",
    [(None, "PIL cannot identify its format"), (20, "Truncated File Read"), (-40, "image file is truncated")],
)
def test_a_val_image_pil_cannot_decode_is_refused_by_name_not_replaced_by_the_next_one(
    tmp_path, caplog, keep, reason
):
    """timm's ImageDataset hands out the next sample for an image PIL cannot decode: in the val split, which an
    evaluation counts, that would count one image twice, so it is an InputError naming the file, whether its
    header is unreadable or its pixels are cut short (it opens; a partial copy); the train split, augmented or
    not (the k-NN bank), keeps timm's convention (the next image, and timm's warning, which names the file)."""
    _make_folder(tmp_path)
    bad = tmp_path / "val" / "dog" / "0.png"
    content = b"not an image" if keep is None else bad.read_bytes()[:keep]  # text, or a PNG cut short
    bad.write_bytes(content)
    said = rf"image '{re.escape(str(bad))}' cannot be read as an image \({reason}\): replace or remove it"
    for labels in (True, False):
        val = build_dataset("folder", "val", root=tmp_path, img_size=16, labels=labels)
        with pytest.raises(InputError, match=said):
            val[0]
        assert val[1][0].shape == (3, 16, 16)  # the others read as before
    cut = tmp_path / "train" / "cat" / "2.png"
    cut.write_bytes(content)
    for augment in (True, False):
        train = build_dataset("folder", "train", root=tmp_path, img_size=16, augment=augment)
        caplog.clear()
        assert train[2][1] == 1  # cat/2.png's place taken by the next image, dog/0.png
        # named whether its header or its pixels are cut short (timm's own decode would log index 2 alone)
        named = f"image '{cut}' cannot be read as an image ({reason}); the next image stands in"
        assert f"Skipped sample (index 2). {named}" in caplog.text


@pytest.mark.parametrize("in_chans", [3, 1])
def test_the_val_split_decoded_ahead_of_timm_reads_each_image_mode_as_pil_converts_it(tmp_path, in_chans):
    """The val split decodes each image before timm's ImageDataset (to refuse a cut one) and hands it on as
    raw pixels: every file mode (RGB, grey, RGBA, palette, CMYK JPEG) reads as PIL's own convert of the file
    through the split's transform."""
    from PIL import Image

    _make_folder(tmp_path)
    pixels = np.random.default_rng(2).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    files = []
    for mode, suffix in (("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg")):
        files.append(tmp_path / "val" / "dog" / f"{mode}.{suffix}")
        Image.fromarray(pixels).convert(mode).save(files[-1])
    one = dict(mean=[0.5], std=[0.25]) if in_chans == 1 else {}
    val = build_dataset("folder", "val", root=tmp_path, img_size=24, in_chans=in_chans, **one)
    transform = val.image_dataset.transform
    names = val.image_dataset.reader.filenames(absolute=True)
    for file in files:
        expected = transform(Image.open(file).convert("RGB" if in_chans == 3 else "L"))
        assert torch.equal(val[names.index(str(file))][0], expected), file.name


@pytest.mark.parametrize("opens_as", ["I;16", "I"])
def test_a_16_bit_grey_png_reads_as_its_top_8_bits_not_as_white(tmp_path, monkeypatch, opens_as):
    """PIL's convert to RGB or L clips a 16-bit grey PNG's values to 255 (a white image): the folder dataset
    (train and val) reads it as the 8-bit PNG of its top 8 bits reads (streams: test_data_sources), also
    where PIL opens it as I (Pillow before 10.3, whose PNG table this installs)."""
    from PIL import Image, PngImagePlugin

    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), (opens_as, "I;16B"))
    _make_folder(tmp_path)
    grey = np.random.default_rng(1).integers(0, 256, (48, 40), dtype=np.uint16)
    for image in (tmp_path / "train" / "cat", tmp_path / "val" / "dog"):
        Image.fromarray(grey.astype(np.uint8)).save(image / "0.png")
        Image.fromarray(grey << 8 | 0x7F).save(image / "1.png")
        assert Image.open(image / "1.png").mode == opens_as
    train = build_dataset("folder", "train", root=tmp_path, img_size=16, augment=False)
    val = build_dataset("folder", "val", root=tmp_path, img_size=16)
    for images in (train, val):
        assert torch.equal(images[0][0], images[1][0]) and images[1][0].std() > 0


@pytest.mark.slow
def test_a_run_stopped_by_an_unreadable_val_image_keeps_the_epoch_it_trained(tmp_path, capsys):
    """The refusal comes at the first evaluation, after a whole epoch of training: that epoch is saved, so the
    run resumes from it once the file is fixed instead of starting over."""
    _make_folder(tmp_path / "data")
    # not the first val image: that one is read at start-up, where the run checks its size
    bad = tmp_path / "data" / "val" / "dog" / "1.png"
    image = bad.read_bytes()
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    data = ["data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.batch_size=2", "data.img_size=32"]
    model = "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2, patch_size: 8}"
    args = ["train", *data, *QUIET, "transfer.mode=none", model, "schedule.max_steps=6", f"run_dir={run}"]
    assert cli.main(args) == 2
    assert f"error: image '{bad}' cannot be read as an image" in capsys.readouterr().err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]  # 6 images, batch 2
    bad.write_bytes(image)
    assert cli.main(args) == 0
    assert "resumed from checkpoint step 3" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_on_class_folders_other_than_those_the_run_learned_is_refused_not_scored(tmp_path, capsys):
    """A label is an index into the classes the run's head learned: a class folder renamed since ('cat' now
    'zebra' sorts after 'dog', so dog's images get label 0) would score with swapped labels, a class added
    would stop in cross_entropy with a traceback."""
    _make_folder(tmp_path / "data")
    run = tmp_path / "run"
    data = ["data.dataset=folder", f"data.root={tmp_path / 'data'}", "data.batch_size=3", "data.img_size=16"]
    model = "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2, patch_size: 8}"
    train = ["train", *data, *QUIET, "transfer.mode=none", model, "schedule.max_steps=1"]
    assert cli.main([*train, f"run_dir={run}"]) == 0
    (tmp_path / "data" / "train" / "cat").rename(tmp_path / "data" / "train" / "zebra")
    code, _, err = run_cli(capsys, "eval", "-c", str(run / "config.yaml"))
    said = f"has the classes ['dog', 'zebra'], but {run} learned ['cat', 'dog'] (label index -> class)"
    assert code == 2 and said in err, err


def test_a_crop_pct_of_zero_is_refused_not_taken_as_timms_default(tmp_path):
    _make_folder(tmp_path)
    with pytest.raises(ValueError, match=r"crop_pct must be > 0 \(data.kwargs\), got 0"):
        build_dataset("folder", "val", root=tmp_path, crop_pct=0)
    with pytest.raises(InputError, match=r"data.kwargs.crop_pct takes a number, got 'big'"):  # no TypeError
        build_dataset("folder", "val", root=tmp_path, crop_pct="big")


def test_color_jitter_takes_timms_number_or_brightness_contrast_saturation_and_hue(tmp_path):
    """As timm's create_transform: one number for brightness, contrast and saturation, or a list of 3 or 4
    (hue); another length or a negative value is one line naming the option, not timm's bare assertion."""
    _make_folder(tmp_path)
    for given, hue in (([0.1, 0.2, 0.3], None), ([0.1, 0.2, 0.3, 0.05], (-0.05, 0.05))):
        train = build_dataset("folder", "train", root=tmp_path, img_size=16, color_jitter=given)
        (jitter,) = [t for t in train.image_dataset.transform.transforms if type(t).__name__ == "ColorJitter"]
        assert (jitter.brightness, jitter.saturation, jitter.hue) == ((0.9, 1.1), (0.7, 1.3), hue)
    for bad in ([0.4, 0.4], [0.4, -0.1, 0.4], -0.4, "strong"):
        with pytest.raises(
            InputError, match=r"^dataset 'folder': data.kwargs.color_jitter takes a number >= 0"
        ):
            build_dataset("folder", "train", root=tmp_path, color_jitter=bad)


def test_an_unknown_random_erasing_mode_is_one_line_naming_the_option_even_where_erasing_is_off(tmp_path):
    """timm asserts re_mode with an empty message, and only builds random erasing where re_prob > 0: a typo
    trained silently where erasing was off."""
    _make_folder(tmp_path)
    for bad in ("pixels", ""):
        with pytest.raises(
            InputError, match=r"^dataset 'folder': data.kwargs.re_mode is one of const, rand, pix"
        ):
            build_dataset("folder", "train", root=tmp_path, re_mode=bad)


def test_random_erasing_options_out_of_range_are_one_line_not_taken_as_timm_takes_them(tmp_path):
    """timm takes any re_prob (1.5 erases every image) and any re_count (0 is read as 1); aug.reprob and
    aug.recount are range-checked as the config loads, and data.kwargs' own spellings are held to the same."""
    _make_folder(tmp_path)
    for option, said in (
        (dict(re_prob=1.5), "re_prob must be between 0 and 1"),
        (dict(re_count=0), "re_count must be >= 1"),
        (dict(hflip=2), "hflip must be between 0 and 1"),  # a probability: 2 flipped every image
        (
            dict(crop_mode="sqash"),
            "crop_mode is one of center, squash, border",
        ),  # read as center, recorded as given
    ):
        with pytest.raises(InputError, match=rf"^dataset 'folder': data.kwargs.{said}, got"):
            build_dataset("folder", "train", root=tmp_path, **option)


@pytest.mark.parametrize("option", [dict(interpolation="linear"), dict(scale=[0.5]), dict(auto_augment="x")])
def test_a_transform_option_value_timm_cannot_take_is_one_line_naming_data_kwargs_and_aug(tmp_path, option):
    """timm answers a KeyError (an unknown interpolation), an IndexError (one number) or an AssertionError (a
    policy it lacks: aug.auto_augment reaches it too, so the line names the aug section as well)."""
    _make_folder(tmp_path)
    with pytest.raises(
        ValueError,
        match="timm's create_transform cannot build from these options.*data.kwargs and the aug sec",
    ):
        build_dataset("folder", "train", root=tmp_path, **option)


# -------------------------------------------------------------------------------------------- registry


def test_registry_errors_name_the_choices():
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'animal_mnst'; did you mean 'animal_mnist'.*animal_mnist, folder, recall, synthetic",
    ):
        build_dataset("animal_mnst", "train")
    with pytest.raises(
        ValueError, match=r"'SYNTHETIC'; did you mean 'synthetic'"
    ):  # the wrong case: its own name
        build_dataset("SYNTHETIC", "train")
    with pytest.raises(TypeError, match=r"no option\(s\) lenght.*length"):
        build_dataset("synthetic", "train", lenght=5)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("synthetic", "test")


def test_a_registered_dataset_is_listed_built_with_its_options_and_refused_twice():
    info = DatasetInfo(
        name="ones", num_classes=2, class_names=("a", "b"), mean=(0.0,), std=(1.0,), in_chans=1, img_size=4
    )

    @register_dataset("test_ones", info=info)
    def build_ones(split, *, root, img_size, in_chans, mean, std, seed, length=3):
        return torch.utils.data.TensorDataset(
            torch.ones(length, 1, 4, 4), torch.zeros(length, dtype=torch.long)
        )

    assert "test_ones" in list_datasets() and dataset_info("test_ones") is info
    assert len(build_dataset("test_ones", "val", length=5)) == 5
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("test_ones", info=info)(build_ones)


def test_a_registered_builder_that_ignores_the_runs_size_is_refused_when_built_from_one_image(
    registries_kept,
):
    """Its 28 px images stopped a 32 px run in timm (``Input height (28) doesn't match model (32)``) at its
    first batch; now its val split's first sample says so, in one line, and no other sample is read."""
    read = []

    class Cells(torch.utils.data.TensorDataset):
        def __getitem__(self, index):
            read.append(index)
            return super().__getitem__(index)

    def build_cells(split, *, root, img_size, in_chans, mean, std, seed):
        return Cells(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))

    register_dataset("lab_cells", info=DatasetInfo("lab_cells", 2, None, (0.5,), (0.25,), 1, 28))(build_cells)
    said = (
        r"^dataset 'lab_cells' gives 1x28x28 images; the run asked for 3x32x32 \(data.img_size / "
        r"data.in_chans\): its builder must make images at the img_size and in_chans it is given$"
    )
    for labels in (True, False):  # a label-free run's samples are (x,)
        with pytest.raises(InputError, match=said):
            build_dataset("lab_cells", "val", img_size=32, in_chans=3, labels=labels)
    assert read == [0, 0]
    build_dataset("lab_cells", "train", img_size=32, in_chans=3)  # a train split may vary its size (recall)
    assert len(build_dataset("lab_cells", "val", img_size=28, in_chans=1)) == 4 and read == [0, 0, 0]


def test_a_plugin_option_annotated_with_a_class_refuses_a_value_of_another_type(registries_kept):
    """A plug-in module without ``from __future__ import annotations`` annotates ``length: int`` with the class
    ``int``, whose text is ``<class 'int'>``: its option went unchecked, and ``length: many`` ended in a torch
    traceback inside the builder instead of one line naming data.kwargs.length."""

    def build_typed(split, *, root, img_size, in_chans, mean, std, seed, length: int = 3, scale: float = 1.0):
        return torch.utils.data.TensorDataset(
            torch.ones(length, 1, 4, 4), torch.zeros(length, dtype=torch.long)
        )

    assert not isinstance(inspect.signature(build_typed).parameters["length"].annotation, str)
    register_dataset("typed", info=DatasetInfo("typed", 2, None, (0.0,), (1.0,), 1, 4))(build_typed)
    with pytest.raises(
        InputError, match=r"^dataset 'typed': data.kwargs.length takes an integer, got 'many'$"
    ):
        build_dataset("typed", "train", length="many")
    with pytest.raises(InputError, match=r"data.kwargs.scale takes a number, got True"):
        build_dataset("typed", "train", scale=True)
    assert len(build_dataset("typed", "train", length=2, scale=2)) == 2


def test_a_plugin_option_annotated_optional_refuses_a_value_of_another_type_and_takes_null(registries_kept):
    """``Optional[int]`` and ``Union[int, None]``, as classes or as strings, were not read as ``int | None``: a
    string reached the builder where it takes an integer."""

    def build_optional(
        split,
        *,
        root,
        img_size,
        in_chans,
        mean,
        std,
        seed,
        a: typing.Optional[int] = None,  # noqa: UP045  (a plug-in may write it so)
        b: "Optional[int]" = None,  # noqa: F821  (as a module deferring annotations has it)
        c: "typing.Union[int, None]" = None,  # noqa: UP007
        d: int | None = None,
    ):
        return torch.utils.data.TensorDataset(torch.ones(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))

    register_dataset("optional", info=DatasetInfo("optional", 2, None, (0.0,), (1.0,), 1, 4))(build_optional)
    for key in "abcd":
        with pytest.raises(
            InputError, match=f"^dataset 'optional': data.kwargs.{key} takes an integer or null, got '5'$"
        ):
            build_dataset("optional", "train", **{key: "5"})
        assert len(build_dataset("optional", "train", **{key: 5})) == 2
        assert len(build_dataset("optional", "train", **{key: None})) == 2


@pytest.mark.parametrize(
    "made, said",
    [
        (lambda: None, r"returned NoneType; it must return a torch Dataset"),
        (
            lambda: [torch.zeros(1, 4, 4)],
            r"gives Tensor samples; each must be an \(image",
        ),
        (
            lambda: [(torch.zeros(1, 4, 4, dtype=torch.uint8), 0)],
            r"gives torch.uint8 images; they must be float",
        ),
        (
            lambda: [(torch.zeros(1, 4, 4), torch.tensor(1.0))],
            r"gives the label tensor\(1.\); a label must be an int",
        ),
        (
            lambda: [(torch.zeros(1, 4, 4), 7)],
            r"gives the label 7, outside its 2 classes .*labels must be 0 to 1$",
        ),
    ],
)
def test_a_builder_breaking_its_contract_is_one_line_naming_it_not_a_traceback_at_the_first_batch(
    registries_kept, made, said
):
    """A builder returning None, image-only samples, uint8 images, float labels or a label past its classes
    ended in a TypeError, a misleading '4x4 images' line, or torch errors at the loss (``Target 7 is out of
    bounds``); the val split's first sample now names the builder and what to change."""

    def build_wrong(split, *, root, img_size, in_chans, mean, std, seed):
        return made()

    register_dataset("wrong", info=DatasetInfo("wrong", 2, None, (0.0,), (1.0,), 1, 4))(build_wrong)
    with pytest.raises(InputError, match=r"^dataset 'wrong': its builder \S*build_wrong " + said):
        build_dataset("wrong", "val", img_size=4, in_chans=1)


def test_a_builder_whose_labels_are_numpy_integers_keeps_to_the_contract(registries_kept):
    """default_collate batches numpy's integer labels (a builder reading them from an array's column): the
    first-sample check must not refuse them as not a class index."""

    def build_numpy(split, *, root, img_size, in_chans, mean, std, seed):
        return [(torch.zeros(1, 4, 4), np.int64(1))]

    register_dataset("numpy_labels", info=DatasetInfo("numpy_labels", 2, None, (0.0,), (1.0,), 1, 4))(
        build_numpy
    )
    assert len(build_dataset("numpy_labels", "val", img_size=4, in_chans=1)) == 1


def test_a_plugin_option_without_an_annotation_is_checked_by_its_defaults_kind(registries_kept):
    """An option a plug-in left unannotated (``length=3``) was not checked at all: ``length: many`` ended in a
    torch traceback inside the builder. Its default says the kind; an int default takes any number (a builder
    may write ``scale=1`` and mean a float), and an option whose default is None stays the builder's to check."""

    def build_bare(
        split,
        *,
        root,
        img_size,
        in_chans,
        mean,
        std,
        seed,
        length=3,
        scale=1,
        label="x",
        flip=False,
        extra=None,
    ):
        return torch.utils.data.TensorDataset(
            torch.ones(int(length), 1, 4, 4), torch.zeros(int(length), dtype=torch.long)
        )

    register_dataset("bare", info=DatasetInfo("bare", 2, None, (0.0,), (1.0,), 1, 4))(build_bare)
    for key, value, said in (
        ("length", "many", "a number"),
        ("label", 5, "a string"),
        ("flip", "yes", "true/false"),
        ("scale", True, "a number"),
    ):
        with pytest.raises(
            InputError, match=f"^dataset 'bare': data.kwargs.{key} takes {said}, got {value!r}$"
        ):
            build_dataset("bare", "train", **{key: value})
    assert len(build_dataset("bare", "train", length=2, scale=0.5, label="y", flip=True, extra=[1])) == 2
