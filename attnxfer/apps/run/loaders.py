"""The ``data`` and ``aug`` sections as loaders (no teacher, no student), and `attnxfer eval`'s k-NN bank.
A run's settings reach each dataset builder that names them in its signature (`dataset_options`): no
dataset name is compared here."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ...config import AugConfig, DataConfig, TrainConfig
from ...data import (
    DatasetInfo,
    ResumableSampler,
    StreamDataset,
    StreamPosition,
    build_dataset,
    build_loader,
    dataset_info,
)
from ...data.registry import dataset_options
from ...errors import InputError


def data_info(data: DataConfig) -> DatasetInfo:
    """The ``data`` section's dataset as the run reads it (``data.labels: false``: without labels or classes;
    a class count its options set, recall's ``num_classes``, in place of the default's)."""
    info = dataset_info(data.dataset, root=data.root, labels=data.labels, options=data.kwargs)
    classes = data.kwargs.get("num_classes")
    if classes is not None and info.has_labels and classes != info.num_classes:
        info = dataclasses.replace(info, num_classes=int(classes), class_names=None)
    return info


@dataclass
class Loaders:
    """The train loader and its sampler (the engine sets its epoch and position), the val loader."""

    train_loader: Any
    val_loader: Any
    train_sampler: Any
    val_info: DatasetInfo | None = None  # the val split as built (its size, normalisation, resize and crop)


def _accepted(name: str, offered: dict[str, Any]) -> dict[str, Any]:
    accepts = dataset_options(name)
    return {k: v for k, v in offered.items() if k in accepts}


def build_loaders(
    data: DataConfig,
    aug: AugConfig,
    *,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Train and val loaders for ``data``; ``data.kwargs`` (the dataset's own options) win over the run's."""
    d = data
    common = _common(
        d, img_size=img_size, in_chans=in_chans, mean=mean, std=std, num_classes=num_classes, seed=seed
    )
    # a stream sizes its epoch per rank from the run's batch and world size
    common.update(_accepted(d.dataset, {"batch_size": d.batch_size, "world_size": world_size}))
    train_aug = _accepted(
        d.dataset,
        {
            "re_prob": aug.reprob,
            "re_mode": aug.remode,
            "re_count": aug.recount,
            "auto_augment": aug.auto_augment,
        },
    )
    train_set = build_dataset(d.dataset, "train", **{**train_aug, **common})  # data.kwargs win over aug
    val_set = build_dataset(d.dataset, "val", **common)
    # each split on its own: a stream is not indexable (the engine's position shortens the train epoch)
    if isinstance(train_set, StreamDataset):
        sampler = StreamPosition(train_set, world_size)
    else:
        sampler = ResumableSampler(
            len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size, drop_last=True
        )
    val_sampler = None
    if not isinstance(val_set, StreamDataset):
        val_sampler = ResumableSampler(
            len(val_set),
            shuffle=False,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=False,
            exact=True,  # every val image scored once (no padded duplicates), whatever the world size
        )
    pin = d.pin_memory and torch.cuda.is_available()
    train_loader = build_loader(
        train_set,
        batch_size=d.batch_size,
        sampler=None if isinstance(train_set, StreamDataset) else sampler,
        num_workers=d.num_workers,
        pin_memory=pin,
        drop_last=True,
    )
    val_loader = build_loader(
        val_set,
        batch_size=d.eval_batch_size or d.batch_size,
        sampler=val_sampler,
        num_workers=d.num_workers,
        pin_memory=pin,
        drop_last=False,
    )
    return Loaders(train_loader, val_loader, sampler, getattr(val_set, "info", None))


def dataset_size(loader: Any) -> int | None:
    """The size of a loader's dataset (None: a dataset without a length, a stream)."""
    try:
        return len(loader.dataset)
    except TypeError:
        return None


def first_images(loader: Any, count: int | None = None, batches: int | None = None) -> list[torch.Tensor]:
    """The loader's first ``count`` images, or those of its first ``batches`` batches (labels are not read)."""
    out, taken = [], 0
    for i, (x, *_) in enumerate(loader):
        if batches is not None and i >= batches:
            break
        if count is not None:
            x = x[: count - taken]
        out.append(x)
        taken += x.shape[0]
        if count is not None and taken >= count:
            break
    return out


def data_seed(cfg: TrainConfig) -> int:
    """The seed of the data order and augmentation: ``data.seed``, else the run's ``seed``."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed


#: the data section's own keys, passed to every builder: a data.kwargs of the same name would collide
_SECTION_KEYS = ("root", "img_size", "in_chans", "mean", "std", "seed", "labels", "batch_size")


def _common(data: DataConfig, *, img_size, in_chans, mean, std, num_classes: int | None, seed: int) -> dict:
    """What both splits are built with; ``data.kwargs`` (the dataset's own options) win over the run's."""
    section = [k for k in data.kwargs if k in _SECTION_KEYS]
    if section:
        raise InputError(
            f"data.kwargs sets {', '.join(section)}: write data.{section[0]} (data.kwargs holds the dataset's "
            "own options, beside the data section's keys)"
        )
    common = dict(
        root=data.root,
        img_size=img_size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        seed=seed,
        labels=data.labels,
        **data.kwargs,
    )
    if num_classes:  # a run without labels has none: a dataset that needs a count keeps its own default
        for key, value in _accepted(data.dataset, {"num_classes": num_classes}).items():
            common.setdefault(key, value)
    return common


def build_bank_loader(cfg: TrainConfig, like: Dataset) -> DataLoader:
    """The training split as a k-NN memory bank: built with ``like``'s (a val split's) image settings, with no
    augmentation, in order, whole on every rank; ``eval.knn_bank_size``: that many images evenly spaced
    through it (a folder is sorted by class, so its first images would be a few classes). A curriculum
    (recall's) is left out: the bank holds the task the val split holds, not the easier stage its first
    epoch would give (other sizes, fewer pairs: its embeddings are no neighbours for the val images')."""
    data, seed, size, info = cfg.data, data_seed(cfg), cfg.eval.knn_bank_size, like.info
    common = _common(
        data,
        img_size=info.img_size,
        in_chans=info.in_chans,
        mean=info.mean,
        std=info.std,
        num_classes=info.num_classes,
        seed=seed,
    )
    common.update(
        _accepted(data.dataset, {"augment": False, "batch_size": 1, "world_size": 1, "curriculum": None})
    )
    bank = build_dataset(data.dataset, "train", **common)
    if isinstance(bank, StreamDataset):
        if size is not None:
            bank.remaining = min(size, bank.remaining or size)
    elif size is not None and size < len(bank):
        bank = Subset(bank, torch.linspace(0, len(bank) - 1, size).round().long().tolist())
    return build_loader(
        bank,
        batch_size=data.eval_batch_size or data.batch_size,
        sampler=None,
        num_workers=data.num_workers,
        drop_last=False,
        seed=seed,
    )
