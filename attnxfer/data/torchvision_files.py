"""``torch/NAME``: the small datasets torchvision downloads, by timm's names (``torch/cifar10``,
``torch/cifar100``, ``torch/mnist``, ``torch/fashion_mnist``, ``torch/kmnist``), read from the folder
torchvision wrote under ``data.root`` and held in memory. torchvision reads MNIST's IDX files itself;
CIFAR's batches are pickles, which torchvision unpickles whole, so they are read numpy-only here. Nothing is
downloaded.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, MissingPathError
from ..run_layout import missing_path
from .in_memory import InMemoryImageDataset
from .registry import DatasetInfo, built_info, register_prefix
from .safe_pickle import NumpyOnlyUnpickler, UnsafePickleError

#: torchvision's class of each name
_CLASSES = {
    **dict(cifar10="CIFAR10", cifar100="CIFAR100"),
    **dict(mnist="MNIST", fashion_mnist="FashionMNIST", kmnist="KMNIST"),
}
#: the label key of CIFAR's batches (the MNISTs are read by torchvision itself)
_CIFAR_LABELS = {"cifar10": "labels", "cifar100": "fine_labels"}


def _fill_command(name: str, root: str) -> str:
    """The command that downloads ``name`` into ``root``, where there is a network."""
    return f"python -c \"import torchvision; torchvision.datasets.{_CLASSES[name]}('{root}', download=True)\""


def _refuse_unknown(name: str, root: str | None) -> None:
    known = ", ".join(f"torch/{n}" for n in _CLASSES)
    if name not in _CLASSES:
        other = {"image_folder": "folder", "folder": "folder", "imagenet": "folder"}.get(name.lower())
        instead = (
            f"data.dataset={other} reads an ImageNet-style folder of class folders"
            if other
            else "another torchvision dataset: save its images as class folders and read them with "
            "data.dataset=folder"
        )
        raise InputError(f"data.dataset=torch/{name}: attnxfer reads {known} from their files; {instead}")
    if root is None:
        raise InputError(
            f"data.dataset=torch/{name} reads the folder torchvision downloads it into: set data.root=PATH "
            "(the root given to torchvision.datasets)"
        )


def _folder(name: str, root: str, cls: type) -> Path:
    """The dataset's folder under ``root`` (absolute), as torchvision's ``cls`` lays it out; a missing one says
    how to fill it."""
    inside = cls.base_folder if name in _CIFAR_LABELS else f"{cls.__name__}/raw"
    folder = Path(root) / inside
    if above := next((p for p in Path(root).parents[:2] if (p / inside).is_dir()), None):
        raise MissingPathError(  # data.root=.../cifar-10-batches-py: the dataset's own folder
            f"data.dataset=torch/{name}: data.root={root} is a folder of the dataset's own ({inside}/); give the "
            f"folder torchvision downloaded into: data.root={above}"
        )
    if not folder.is_dir():
        raise MissingPathError(
            f"data.dataset=torch/{name}: {missing_path(folder)}: download it there where there is a network "
            f"({_fill_command(name, root)}) and copy data.root here"
        )
    return folder


@functools.lru_cache(maxsize=2)
def _read(name: str, root: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], DatasetInfo]:
    """Each split's uint8 images (N, C, H, W) and int64 labels, and the dataset's info (its classes, size,
    channels and the pixel statistics of its training split), read once a process (``root``: absolute)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _CLASSES[name])
    folder = _folder(name, root, cls)
    if name not in _CIFAR_LABELS:  # torchvision's own reader of the MNISTs' IDX files
        needed = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
        if missing := [file for file in needed if not (folder / file).is_file()]:
            zipped = [file for file in missing if (folder / f"{file}.gz").is_file()]
            raise MissingPathError(
                f"data.dataset=torch/{name}: '{folder}' lacks {', '.join(missing)}"
                + (
                    f" (gunzip {' '.join(f + '.gz' for f in zipped)}: torchvision reads them unpacked)"
                    if zipped
                    else ""
                )
            )
        splits = {}
        for split in ("train", "val"):
            data = cls(root, train=split == "train", download=False)
            splits[split] = (data.data.numpy()[:, None], data.targets.numpy().astype(np.int64))
        return splits, _info(name, splits["train"][0], tuple(cls.classes))

    def unpickled(file: str) -> dict:
        path = folder / file
        if not path.is_file():
            raise MissingPathError(f"data.dataset=torch/{name}: {missing_path(path)}")
        loaded = NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), source=str(path), encoding="latin1").load()
        if not isinstance(loaded, dict):
            raise UnsafePickleError(f"'{path}' holds a {type(loaded).__name__}, not CIFAR's batch (a dict)")
        return loaded

    classes = tuple(unpickled(cls.meta["filename"])[cls.meta["key"]])
    splits = {}
    for split, files in (("train", cls.train_list), ("val", cls.test_list)):
        batches = [unpickled(file) for file, _ in files]
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[_CIFAR_LABELS[name]], dtype=np.int64) for b in batches])
        splits[split] = (images.reshape(-1, 3, 32, 32), labels)
    return splits, _info(name, splits["train"][0], classes)


def _info(name: str, images: np.ndarray, classes: tuple[str, ...]) -> DatasetInfo:
    # each channel's mean and std (of pixel/255) from its histogram of 256 values: exact, without a float copy
    counts = [np.bincount(images[:, c].ravel(), minlength=256) for c in range(images.shape[1])]
    values = np.arange(256) / 255.0
    mean = [float(n @ values / n.sum()) for n in counts]
    std = [float(n @ values**2 / n.sum() - m**2) ** 0.5 for n, m in zip(counts, mean, strict=True)]
    return DatasetInfo(
        name=f"torch/{name}",
        num_classes=len(classes),
        class_names=classes,
        mean=tuple(round(m, 4) for m in mean),
        std=tuple(round(s, 4) for s in std),
        in_chans=images.shape[1],
        img_size=images.shape[-1],
    )


def _grey(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 as PIL's convert("L") makes it: ITU-R 601-2 luma with its rounding, (N, 1, H, W)."""
    r, g, b = (images[:, c].astype(np.uint32) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]


def torch_info(name: str, root: str | None) -> DatasetInfo:
    """Its classes, size and channels, and the pixel statistics (of pixel/255) of its training split."""
    _refuse_unknown(name, root)
    return _read(name, os.path.abspath(root))[1]  # the registry expanded a ~


@register_prefix("torch", info=torch_info, names=tuple(_CLASSES))
def build_torch(
    name: str,
    split: str,
    *,
    root: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    augment: bool | None = None,
    crop_padding: int | None = None,
    hflip: float | None = None,
    download: bool = False,
) -> InMemoryImageDataset:
    """The split (val: the test files) in memory; ``augment`` (default: train) shifts by up to ``crop_padding``
    pixels (CIFAR's 4, MNIST's 2) and flips with probability ``hflip`` (CIFAR's 0.5; digits and letters are
    not flipped: 0). ``in_chans=1`` makes CIFAR grey as PIL does; MNIST's grey is repeated for 3 channels.
    ``download`` (timm's ``--dataset-download``) is refused: a run reads the files it is given."""
    _refuse_unknown(name, root)
    if download:
        raise InputError(
            "data.kwargs.download: torch/ datasets are read from data.root, never downloaded by a run; fill it "
            f"where there is a network ({_fill_command(name, root)}) and drop the option"
        )
    splits, default = _read(name, os.path.abspath(root))  # the registry expanded a ~
    images, labels = splits[split]
    if in_chans == 1 and images.shape[1] == 3:  # its mean and std those of the grey training split
        images = _grey(images)
        default = _info(name, images if split == "train" else _grey(splits["train"][0]), default.class_names)
    info = built_info(f"torch/{name}", default, img_size, in_chans, mean, std, grayscale_or_rgb=True)
    cifar = name in _CIFAR_LABELS
    return InMemoryImageDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        info,
        augment=split == "train" if augment is None else augment,
        seed=seed,
        crop_padding=(4 if cifar else 2) if crop_padding is None else crop_padding,
        hflip=(0.5 if cifar else 0.0) if hflip is None else hflip,
    )
