"""Animal-MNIST: 10,000 real 28x28 grayscale animal silhouettes (10 classes x 1,000) from the
``animal-mnist`` package (MIT), whose gzipped pickles are read once, numpy-only, into a cached .npz.

The val split (100 per class) is chosen by a hash of the image bytes, not an RNG whose stream could change,
so it never changes; the 284 images that occur twice (always within a class) keep both copies on one side,
so val never contains a training image.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, MissingPathError
from .cache import cache_dir, save_npz_atomic
from .in_memory import InMemoryImageDataset
from .registry import DatasetInfo, built_info, register_dataset
from .safe_pickle import load_numpy_pickle

CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
VAL_PER_CLASS = 100
# Training-split pixel statistics (of pixel/255), pinned like MNIST's (0.1307, 0.3081); a test
# recomputes them from the data.
ANIMAL_MNIST_INFO = DatasetInfo(
    name="animal_mnist",
    num_classes=10,
    class_names=CLASS_NAMES,
    mean=(0.2727,),
    std=(0.4056,),
    in_chans=1,
    img_size=28,
)

_PACKAGE = "animal_mnist"
_DATA_FILE = "animal_data_version_3.gz"
_LABEL_FILE = "animal_label_version_3.gz"
_SPLIT_SALT = b"attnxfer/animal_mnist/val-split/v1"
_CACHE_FORMAT = 1  # bump when the cached content (arrays, split) changes


@dataclass(frozen=True)
class AnimalMnistArrays:
    images: np.ndarray  # (10000, 28, 28) uint8
    labels: np.ndarray  # (10000,) int64, class index into CLASS_NAMES
    train_idx: np.ndarray  # sorted int64 indices
    val_idx: np.ndarray  # sorted int64 indices


def find_animal_mnist_files() -> tuple[Path, Path]:
    """The package's (images, labels) files, found without importing it (it imports tensorflow)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"dataset 'animal_mnist' needs the animal-mnist package's data files: run `{INSTALL_HINT}` "
            f"(--no-deps: its declared dependencies include tensorflow, which attnxfer does not use)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    files = folder / _DATA_FILE, folder / _LABEL_FILE
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"animal-mnist is installed but {missing} is missing (expected version 0.4); reinstall with `{INSTALL_HINT}`"
        )
    return files


def _val_split(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """VAL_PER_CLASS images per class in order of a salted hash of their bytes, duplicates kept together."""
    val = []
    for c in range(len(CLASS_NAMES)):
        groups: dict[bytes, list[int]] = {}
        for i in np.flatnonzero(labels == c):
            groups.setdefault(images[i].tobytes(), []).append(int(i))
        order = sorted(groups, key=lambda b: hashlib.blake2b(_SPLIT_SALT + b, digest_size=16).digest())
        chosen: list[int] = []
        for content in order:
            if len(chosen) + len(groups[content]) <= VAL_PER_CLASS:
                chosen += groups[content]
            if len(chosen) == VAL_PER_CLASS:
                break
        if len(chosen) != VAL_PER_CLASS:
            raise RuntimeError(
                f"animal_mnist: could not pick {VAL_PER_CLASS} val images for class {CLASS_NAMES[c]}"
            )
        val += chosen
    return np.sort(np.asarray(val, dtype=np.int64))


def _convert(data_file: Path, label_file: Path) -> dict[str, np.ndarray]:
    images = load_numpy_pickle(data_file)
    labels = load_numpy_pickle(label_file)
    n = len(CLASS_NAMES)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise ValueError(
            f"unexpected animal-mnist layout: images {images.dtype}{images.shape}, labels {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= n:
        raise ValueError(f"animal-mnist labels outside [0, {n}): {np.unique(labels)}")
    labels = labels.astype(np.int64)
    val_idx = _val_split(images, labels)
    train_idx = np.setdiff1d(np.arange(len(images), dtype=np.int64), val_idx)
    return dict(
        images=np.ascontiguousarray(images),
        labels=labels,
        train_idx=train_idx,
        val_idx=val_idx,
        class_names=np.asarray(CLASS_NAMES),
    )


def cache_path(data_file: Path, label_file: Path, root: Path | None = None) -> Path:
    """Cache file named by the source files' content hash: another package version converts anew."""
    h = hashlib.sha256()
    for f in (data_file, label_file):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return (root or cache_dir()) / "animal_mnist" / f"animal_mnist-v{_CACHE_FORMAT}-{h.hexdigest()[:16]}.npz"


def load_animal_mnist_arrays(cache_root: Path | None = None) -> AnimalMnistArrays:
    """The dataset as numpy arrays, converting the package's pickles to the cache on first use."""
    data_file, label_file = find_animal_mnist_files()
    path = cache_path(data_file, label_file, cache_root)
    if not path.is_file():
        save_npz_atomic(path, **_convert(data_file, label_file))
    with np.load(path, allow_pickle=False) as z:
        if tuple(z["class_names"].tolist()) != CLASS_NAMES:
            raise InputError(f"cache '{path}' has classes {z['class_names'].tolist()}; delete it to rebuild")
        return AnimalMnistArrays(z["images"], z["labels"], z["train_idx"], z["val_idx"])


@register_dataset("animal_mnist", info=ANIMAL_MNIST_INFO)
def build_animal_mnist(
    split: str,
    *,
    root: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    augment: bool | None = None,
    crop_padding: int = 2,
    hflip: float = 0.5,
) -> InMemoryImageDataset:
    """Animal-MNIST split (``root``: another cache dir); ``augment`` (default: train) shifts by up to
    ``crop_padding`` pixels and flips with probability ``hflip``."""
    info = built_info("animal_mnist", ANIMAL_MNIST_INFO, img_size, in_chans, mean, std)
    cache = None if root is None else Path(root).expanduser()
    if cache is not None and not cache.parent.is_dir():  # a cache folder: made, but never down a typo'd path
        raise MissingPathError(
            f"data.root='{cache}' is the folder animal_mnist caches its arrays in, and '{cache.parent}' does not "
            f"exist: create it, or drop data.root to cache in {cache_dir()}"
        )
    arrays = load_animal_mnist_arrays(cache)
    idx = arrays.train_idx if split == "train" else arrays.val_idx
    return InMemoryImageDataset(
        torch.from_numpy(arrays.images[idx]),
        torch.from_numpy(arrays.labels[idx]),
        info,
        augment=split == "train" if augment is None else augment,
        seed=seed,
        crop_padding=crop_padding,
        hflip=hflip,
    )
