"""Images without labels: what a run with ``data.labels: false`` reads.

The batch format. A label-free dataset's samples are 1-tuples ``(x,)``, so its loader's batches are ``[x]``:
``for x, y in loader`` fails on the first batch (``not enough values to unpack``) instead of reading a
made-up label, and a label can never be read by accident. Loops that need only images take ``x, *_`` (they
work on labelled batches too); the training loop splits a batch with `split_batch` (labels ``None``), and an
app that needs labels stops before any work with `attnxfer.data.registry.require_labels`.

No label is read. Builders that can read images alone are told so (``labels=False``: `folder` lists every
image under its split folders, class folders optional; ``hfds/`` reads only the image column; ``wds/`` never
decodes ``.cls``); any other dataset is wrapped in `LabelFree`, which asks it for ``image(index)`` (the
in-memory and synthetic datasets have one that never touches a label) or else drops the label of
``dataset[index]``. A stream (`StreamDataset`) drops its labels through its own ``without_labels()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import is_dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset


def without_labels(info: Any) -> Any:
    """A `DatasetInfo` as a run that reads no labels sees it: no labels, hence no classes."""
    return replace(info, has_labels=False, num_classes=None, class_names=None)


def image_of(dataset: Dataset, index: int) -> torch.Tensor:
    """Sample ``index``'s image: ``dataset.image(index)`` where it has one (never reads a label), else the
    first item of ``dataset[index]``."""
    image = getattr(dataset, "image", None)
    return image(index) if callable(image) else dataset[index][0]


class LabelFree(Dataset):
    """``dataset``'s images as ``(x,)`` samples (see the module docstring); epoch and info pass through."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        info = getattr(dataset, "info", None)
        self.info = without_labels(info) if is_dataclass(info) else info

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> torch.Tensor:
        return image_of(self.dataset, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (image_of(self.dataset, index),)


def images_only(dataset: Dataset) -> Dataset:
    """``dataset`` yielding ``(x,)``: a stream's own ``without_labels()``, else `LabelFree` around it."""
    if isinstance(dataset, LabelFree):
        return dataset
    own = getattr(dataset, "without_labels", None)
    return own() if callable(own) else LabelFree(dataset)


def dataset_has_labels(dataset: Dataset) -> bool:
    """Whether ``dataset``'s samples carry labels (its `DatasetInfo` says; a dataset without one is taken
    to be a classic ``(x, y)`` dataset)."""
    return bool(getattr(getattr(dataset, "info", None), "has_labels", True))


def split_batch(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader's batch as ``(images, labels)``; labels ``None`` for a label-free batch ``[x]``."""
    if len(batch) == 1:
        return batch[0], None
    x, y = batch
    return x, y
