"""timm's dataset prefixes as ``data.dataset``: Hugging Face datasets (``hfds/NAME``, random access;
``hfids/NAME``, streaming) and webdataset tar shards (``wds/NAME``), read by timm's readers
(`timm.data.create_dataset`) with the same transforms as ``folder``.

What resumes exactly: ``hfds/`` is indexable, so it goes through the `ResumableSampler` like every other
dataset (a run resumed mid-epoch sees exactly the samples an uninterrupted run would). ``wds/`` and
``hfids/`` are streams: a resumed run keeps its step count, epoch and learning-rate schedule exactly
(the stream yields only the batches left in the epoch), but it re-reads the epoch's stream from its start,
so the samples of a resumed epoch are not those of an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import islice

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import InputError
from .folder import FolderDataset
from .registry import DatasetInfo, check_image_args, register_prefix, resolve_norm, with_settings

__all__ = ["STREAM_PREFIXES", "StreamDataset", "StreamPosition", "hf_info", "stream_info"]

#: timm's prefixes whose datasets are streams (no index): a run sizes their epoch per rank
STREAM_PREFIXES = ("wds", "hfids")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / _STD, as for folders
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLITS = {"train": "train", "val": "validation"}


def _default_info(name: str, classes: tuple[str, ...] | None) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        num_classes=None if classes is None else len(classes),
        class_names=classes,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        in_chans=3,
        img_size=224,
    )


def _reader(prefix: str, name: str, root: str | None, split: str):
    from timm.data.readers import create_reader

    try:
        return create_reader(f"{prefix}/{name}", root=root, split=split)
    except ImportError as e:
        extra = {"hfds": "hfds", "hfids": "hfds", "wds": "wds"}[prefix]
        raise ImportError(
            f"data.dataset={prefix}/{name} needs {e.name or e}: pip install 'attnxfer[{extra}]'"
        ) from e


def hf_info(name: str, root: str | None, split: str = "train") -> DatasetInfo:
    """Classes of a Hugging Face dataset from its ``label`` feature (a ``ClassLabel``), read by timm."""
    reader = _reader("hfds", name, root, split)
    names = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    return _default_info(f"hfds/{name}", tuple(str(n) for n in names) or None)


def stream_info(name: str, root: str | None) -> DatasetInfo:
    """A stream does not say its classes: ``model.num_classes`` does."""
    return _default_info(name, None)


def _transform(split: str, augment: bool | None, img_size: int, in_chans: int, mean, std, **aug):
    from timm.data import create_transform

    augment = split == "train" if augment is None else augment
    return augment, create_transform(
        (in_chans, img_size, img_size), is_training=augment, mean=mean, std=std, **aug
    )


def _settings(name: str, img_size, in_chans, mean, std, default: DatasetInfo):
    img_size, in_chans = check_image_args(name, img_size, in_chans, default)
    if in_chans not in (1, 3):
        raise InputError(f"{name}: in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    mean, std = resolve_norm(mean, std, in_chans, default)
    return img_size, in_chans, mean, std


@register_prefix("hfds", info=lambda name, root: hf_info(name, root))
def build_hfds(
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
    train_split: str = "train",
    val_split: str = "validation",
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "const",
    re_count: int = 1,
    **aug,
) -> Dataset:
    """A Hugging Face dataset (``datasets.load_dataset(NAME)``: a Hub id or a local folder of parquet/arrow
    files; ``root`` is its cache folder), random access, with folder's transforms (``aug``: timm's
    ``create_transform`` options: ``auto_augment``, ``re_prob``, ``re_mode``, ...)."""
    from timm.data import create_dataset

    hf_split = train_split if split == "train" else val_split
    default = hf_info(name, root, train_split)
    img_size, in_chans, mean, std = _settings(f"hfds/{name}", img_size, in_chans, mean, std, default)
    aug = dict(auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count, **aug)
    augment, transform = _transform(split, augment, img_size, in_chans, mean, std, **aug)
    images = create_dataset(
        f"hfds/{name}",
        root=root,
        split=hf_split,
        input_img_mode="RGB" if in_chans == 3 else "L",
        transform=transform,
    )
    info = with_settings(default, img_size=img_size, in_chans=in_chans, mean=mean, std=std)
    return FolderDataset(images, info, seed=seed, deterministic=augment)


class StreamDataset(IterableDataset):
    """A timm stream (``IterableImageDataset``) limited to the samples this rank has left in the epoch.

    ``remaining`` is set by `StreamPosition` (a resume mid-epoch); with DataLoader workers each worker
    yields its share (timm's readers split shards over ranks and workers)."""

    def __init__(self, stream, info: DatasetInfo, per_rank: int | None):
        self.stream, self.info = stream, info
        self.per_rank = per_rank
        self.remaining = per_rank

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.stream) if self.remaining is None else self.remaining

    def __iter__(self):
        if self.remaining is None:
            return iter(self.stream)
        worker = get_worker_info()
        share = self.remaining if worker is None else math.ceil(self.remaining / worker.num_workers)
        return islice(iter(self.stream), share)


class StreamPosition:
    """What the engine asks of a sampler, for a stream: the epoch's global length, the epoch and the
    position (global samples consumed). A position inside the epoch shortens the epoch's stream to the
    batches left; the samples themselves are read from the epoch's start (see the module docstring)."""

    def __init__(self, dataset: StreamDataset, world_size: int = 1):
        self.dataset, self.world_size = dataset, world_size
        self.length = dataset.per_rank * world_size
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(self.epoch)

    def set_position(self, position: int) -> None:
        self.position = int(position)
        self.dataset.remaining = max(0, self.dataset.per_rank - self.position // self.world_size)


def _build_stream(prefix: str, name: str, split: str, *, root, img_size, in_chans, mean, std, seed, **kw):
    from timm.data import create_dataset

    augment = kw.pop("augment", None)
    train_split = kw.pop("train_split", "train")
    val_split = kw.pop("val_split", "validation")
    batch_size = kw.pop("batch_size", 1)
    world_size = kw.pop("world_size", 1)
    train_samples, val_samples = kw.pop("train_samples", None), kw.pop("val_samples", None)
    num_samples = (
        train_samples if split == "train" else val_samples
    )  # a stream's length, when not in its info
    default = stream_info(f"{prefix}/{name}", root)
    img_size, in_chans, mean, std = _settings(f"{prefix}/{name}", img_size, in_chans, mean, std, default)
    augment, transform = _transform(split, augment, img_size, in_chans, mean, std, **kw)
    try:
        stream = create_dataset(
            f"{prefix}/{name}",
            root=root,
            split=train_split if split == "train" else val_split,
            is_training=split == "train",
            batch_size=batch_size,
            num_samples=num_samples,
            seed=seed,
            input_img_mode="RGB" if in_chans == 3 else "L",
            transform=transform,
        )
    except ImportError as e:
        extra = "wds" if prefix == "wds" else "hfds"
        raise ImportError(
            f"data.dataset={prefix}/{name} needs {e.name or e}: pip install 'attnxfer[{extra}]'"
        ) from e
    info = with_settings(default, img_size=img_size, in_chans=in_chans, mean=mean, std=std)
    per_rank = None
    if split == "train":  # the epoch: whole batches of this rank's equal share (as drop_last)
        per_rank = (int(stream.reader.num_samples) // world_size) // batch_size * batch_size
    return StreamDataset(stream, info, per_rank)


for _prefix in STREAM_PREFIXES:

    def _builder(
        name: str,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        in_chans: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 1,
        world_size: int = 1,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "const",
        re_count: int = 1,
        _prefix: str = _prefix,
        **options,
    ) -> StreamDataset:
        """A stream read by timm (webdataset shards under ``root``; a streamed Hugging Face dataset): options
        ``train_split`` / ``val_split`` (for shards, ``"train-{000000..000099}.tar|N"``: files and sample
        count, or the split names of ``root/_info.json``), ``train_samples`` / ``val_samples`` (a split's
        length where its files do not say it: streamed Hugging Face datasets), the per-rank ``batch_size``
        and ``world_size`` (set by the run), and folder's transform options."""
        return _build_stream(
            _prefix, name, split, root=root, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed,
            batch_size=batch_size, world_size=world_size, auto_augment=auto_augment, re_prob=re_prob,
            re_mode=re_mode, re_count=re_count, **options,
        )  # fmt: skip

    register_prefix(_prefix, info=stream_info)(_builder)
