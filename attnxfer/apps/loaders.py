"""The ``data`` and ``aug`` sections as loaders: the train and val datasets, their resumable samplers and
DataLoaders, on their own (no teacher, no student).

A run's own settings reach each dataset builder that names them in its signature (`dataset_options`):
timm's augmentation options (``aug.reprob``, ...) for the train split, the class count and length of
synthetic data, the per-rank batch and world size of a stream. No dataset name is compared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AugConfig, DataConfig
from ..data import ResumableSampler, StreamDataset, StreamPosition, build_dataset, build_loader
from ..data.registry import dataset_options

__all__ = ["Loaders", "build_loaders"]


@dataclass
class Loaders:
    """What a run iterates: the train loader and its sampler (the engine sets its epoch and position), the
    val loader."""

    train_loader: Any
    val_loader: Any
    train_sampler: Any


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
    common = dict(
        root=d.root, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed, **d.kwargs
    )
    for key, value in _accepted(
        d.dataset, {"num_classes": num_classes, "length": d.synthetic_length}
    ).items():
        common.setdefault(key, value)  # the dataset's own options (data.kwargs) win
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
    train_set = build_dataset(d.dataset, "train", **common, **train_aug)
    val_set = build_dataset(d.dataset, "val", **common)
    if isinstance(train_set, StreamDataset):  # not indexable: the engine's position shortens the epoch
        sampler, val_sampler = StreamPosition(train_set, world_size), None
    else:
        sampler = ResumableSampler(
            len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size, drop_last=True
        )
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
    return Loaders(train_loader, val_loader, sampler)
