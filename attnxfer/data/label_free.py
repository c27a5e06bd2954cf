"""Images without labels (``data.labels: false``): samples are 1-tuples ``(x,)``, batches ``[x]``, so
``for x, y in loader`` fails on the first batch instead of reading a made-up label. Builders that can read
images alone are told so; any other dataset is wrapped in `LabelFree`, which asks it for ``image(index)``
(never touching a label) or else drops the label of ``dataset[index]``.
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
        """Sample ``index``'s image: the dataset's own ``image(index)`` where it has one (reads no label)."""
        image = getattr(self.dataset, "image", None)
        return image(index) if callable(image) else self.dataset[index][0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (self.image(index),)


def images_only(dataset: Dataset) -> Dataset:
    """``dataset`` yielding ``(x,)``: a stream's own ``without_labels()``, else `LabelFree` around it."""
    if isinstance(dataset, LabelFree):
        return dataset
    own = getattr(dataset, "without_labels", None)
    return own() if callable(own) else LabelFree(dataset)


def dataset_has_labels(dataset: Dataset) -> bool:
    """Whether ``dataset``'s samples carry labels (one without a `DatasetInfo` is taken to be ``(x, y)``)."""
    return bool(getattr(getattr(dataset, "info", None), "has_labels", True))


def split_batch(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader's batch as ``(images, labels)``; labels ``None`` for a label-free batch ``[x]``."""
    if len(batch) == 1:
        return batch[0], None
    x, y = batch
    return x, y
