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

import contextlib
import functools
import io
import json
import math
import os
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import InputError, MissingPathError
from ..hub_reach import cache_only_while_unreachable, offline_reason
from ..speak import lines_dropped
from .folder import FolderDataset, decoded_image_info, eight_bit, timm_transform
from .label_free import without_labels
from .registry import SPLITS, DatasetInfo, built_info, register_prefix
from .seeding import OwnGlobalRngs, sample_seed

#: timm's prefixes whose datasets are streams (no index): a run sizes their epoch per rank
STREAM_PREFIXES = ("wds", "hfids")


def _missing_extra(dataset: str, e: ImportError) -> ImportError:
    """What to install for ``dataset`` (``prefix/NAME``) when reading it raised ``e``."""
    extra = "wds" if dataset.startswith("wds/") else "hfds"
    return ImportError(f"data.dataset={dataset} needs {e.name or e}: pip install 'attnxfer[{extra}]'")


def _require_split(dataset: str, root: str | None, split: str, which: str) -> None:
    """Refuse a split the Hugging Face dataset (``hfds/NAME``, ``hfids/NAME``) does not have, naming those it
    has and the key that picks one; a stream would otherwise fail only once read. ``which``: train or val."""
    try:
        import datasets
    except ImportError as e:
        raise _missing_extra(dataset, e) from e
    name = dataset.split("/", 1)[1]
    if not _on_the_hub(name) and not Path(name).expanduser().is_dir():  # datasets would read it as a Hub id
        raise MissingPathError(
            f"data.dataset={dataset}: no folder {name} (from {Path.cwd()}); a dataset on disk is read from its "
            "folder (save_to_disk's, or one of data files), given by its path"
        )
    try:
        with _hub_reads(name):
            names = datasets.get_dataset_split_names(name, cache_dir=root)
    except (ConnectionError, FileNotFoundError) as e:  # not cached, and no Hub to ask (or none by that name)
        hub = _on_the_hub(name)
        offline = offline_reason() if hub else None  # datasets' own words would blame an offline mode we set
        said = f"not in the cache and cannot be downloaded: {offline}" if offline else str(e).rstrip(".")
        raise MissingPathError(
            f"data.dataset={dataset}: {said}"
            + (
                ". Hugging Face datasets are read from their cache (data.root, else HF_DATASETS_CACHE or "
                f"HF_HOME); on a machine with internet, fill one with datasets.load_dataset({name!r}, "
                "cache_dir=DIR), then set data.root=DIR"
                + ("" if Path(name).exists() else f"; nor is there a folder {name} here (from {Path.cwd()})")
                if hub
                else ""
            )
        ) from e
    if split not in names:
        raise InputError(
            f"data.dataset={dataset} has no split {split!r} (it has {names}): name its {which} split with "
            f"data.kwargs.{which}_split=NAME"
        )


def _on_the_hub(name: str) -> bool:
    """Whether a Hugging Face dataset's name is a Hub id, not a local folder of data files."""
    return not name.startswith((".", "/", "~"))


def _hub_reads(name: str) -> contextlib.AbstractContextManager:
    """A Hub dataset read from its cache at once where the Hub cannot be reached (`cache_only_while_unreachable`)."""
    return cache_only_while_unreachable() if _on_the_hub(name) else contextlib.nullcontext()


def hf_info(
    name: str,
    root: str | None,
    labels: bool = True,
    *,
    train_split: str = "train",
    input_key: str = "image",
    target_key: str = "label",
) -> DatasetInfo:
    """Classes of a Hugging Face dataset from its ``target_key`` feature, read by timm (``labels=False``: none)."""
    if not labels:
        return decoded_image_info(f"hfds/{name}", None, labels=False)
    from timm.data.readers import create_reader

    _require_split(f"hfds/{name}", root, train_split, "train")
    try:
        with _hub_reads(name):
            reader = create_reader(
                f"hfds/{name}", root=root, split=train_split, input_key=input_key, target_key=target_key
            )
    except ImportError as e:
        raise _missing_extra(f"hfds/{name}", e) from e
    # the columns are checked here, where a run asks for its class count first (all splits have them)
    columns = reader.dataset.column_names
    # timm's reader casts its image column, which datasets adds, empty, to a table that lacks it
    images_read = reader.dataset.data.column(input_key)
    if images_read.null_count == len(images_read):
        raise InputError(
            f"hfds/{name} split {train_split!r} has no {input_key!r} column (it has {columns[:-1]}); "
            f"{_hf_columns(reader.dataset.features, input_key, target_key)}"
        )
    if reader.label_key.split("/")[0] not in columns:
        raise InputError(
            f"hfds/{name} split {train_split!r} has no {reader.label_key!r} column (it has {columns}); "
            f"{_hf_columns(reader.dataset.features, input_key, target_key)}, or data.labels=false reads its "
            "images without labels"
        )
    names = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    return decoded_image_info(f"hfds/{name}", tuple(str(n) for n in names) or None)


def stream_info(name: str, root: str | None, labels: bool = True) -> DatasetInfo:
    """A stream does not say its classes: ``model.num_classes`` does."""
    return decoded_image_info(name, None, labels)


def _hf_columns(features, input_key: str, target_key: str | None) -> str:
    """What to do with a Hugging Face dataset whose columns are named otherwise (CIFAR-100's ``img``,
    ``fine_label``): name them, as timm's --input-key and --target-key do, with the columns it has of each kind."""
    import datasets

    images = [k for k, f in features.items() if isinstance(f, datasets.Image) and k != input_key]
    keys = {"input_key": next(iter(images), "COLUMN")}
    if target_key is not None:
        classes = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        keys["target_key"] = next(iter(classes), "COLUMN")
    said = ", ".join(f"{k}: {v}" for k, v in keys.items())
    return f"name its columns, as timm's --input-key and --target-key do: data.kwargs={{{said}}}"


class HfImages:
    """The image column of a Hugging Face dataset alone (no label column needed): a timm reader that hands
    out no target."""

    def __init__(self, name: str, root: str | None, split: str, image_key: str = "image"):
        try:
            import datasets
        except ImportError as e:
            raise _missing_extra(f"hfds/{name}", e) from e
        with _hub_reads(name):
            table = datasets.load_dataset(name, split=split, cache_dir=root)
        if image_key not in table.column_names:
            raise InputError(
                f"hfds/{name} split {split!r} has no {image_key!r} column (it has {table.column_names}); "
                + _hf_columns(table.features, image_key, None)
            )
        self.image_key = image_key
        self.table = table.select_columns([image_key]).cast_column(image_key, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        image = self.table[int(index)][self.image_key]
        if image.get("bytes"):
            return io.BytesIO(image["bytes"]), None
        return open(image["path"], "rb"), None  # an open file, as timm's own readers hand it

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str | None:
        return self.table[int(index)][self.image_key].get("path")


def _decode_image(sample: dict, image_key: str) -> dict:
    """A webdataset sample's image, decoded as timm does (its mode left to `ReadAs`), never reading ``.cls``
    or the json sidecar."""
    from PIL import Image

    data = next((sample[k] for k in image_key.split(";") if k in sample), None)
    if data is None:
        raise KeyError(f"sample {sample.get('__key__')!r} has no image ({image_key})")
    with io.BytesIO(data) as b:
        img = Image.open(b)
        img.load()
    return dict(jpg=img, target=None, json=None)


class ReadAs:
    """A stream's transform, its images converted to ``mode`` (L or RGB) first: the streams are read with no
    mode, as timm's readers would convert a 16-bit image by clipping it to white; it reads as its top 8 bits
    (`eight_bit`), as folder's images do. In the main process (no DataLoader workers) its augmentation draws
    from RNG streams of its own, seeded by ``seed`` (`OwnGlobalRngs`): drawn from the process's, they were the
    training's (a study's batch augmented from whichever student loaded it, not as each student alone)."""

    def __init__(self, mode: str, transform, seed: int | None = 0):
        self.mode, self.transform = mode, transform
        # None: a transform that draws nothing (no augmentation), run as it is
        self.rngs = None if seed is None else OwnGlobalRngs(sample_seed(seed, -1, -1))

    def __call__(self, img):
        img = eight_bit(img).convert(self.mode)
        if self.rngs is None or get_worker_info() is not None:  # a worker's streams are its own, seeded
            return self.transform(img)
        with self.rngs.active():
            return self.transform(img)


class WdsImages:
    """timm's webdataset reader (shards, shuffling, rank and worker splits as timm does them) with its decode
    stage swapped for one that decodes the image alone: a stream of ``(image, None)``, no ``.cls`` read."""

    def __init__(self, reader):
        self.reader = reader

    @property
    def num_samples(self) -> int:
        return self.reader.num_samples

    def set_epoch(self, count: int) -> None:
        self.reader.set_epoch(count)

    def set_loader_cfg(self, num_workers: int | None = None) -> None:
        self.reader.set_loader_cfg(num_workers=num_workers)

    def __len__(self) -> int:
        return len(self.reader)

    def _swap_decode(self) -> None:
        import webdataset as wds
        from timm.data.readers import reader_wds

        stages = self.reader.ds.pipeline
        for i, stage in enumerate(stages):
            args = getattr(stage, "args", ())
            f = args[0] if args else None
            if isinstance(f, functools.partial) and f.func is reader_wds._decode:
                image = functools.partial(_decode_image, image_key=f.keywords["image_key"])
                stages[i] = wds.map(image, handler=reader_wds.log_and_continue)
                return
        raise RuntimeError(
            "timm's webdataset reader has no decode stage where attnxfer looks for it (another timm version?): "
            "wds/ without labels cannot skip the .cls files"
        )

    def __iter__(self):
        if self.reader.ds is None:
            self.reader._lazy_init()  # timm builds its pipeline lazily, in the worker that iterates it
            self._swap_decode()
        for image, _ in self.reader:
            yield image, None


@register_prefix("hfds", info=hf_info)
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
    labels: bool = True,
    num_classes: int | None = None,
    input_key: str = "image",
    target_key: str = "label",
    **aug,
) -> Dataset:
    """A Hugging Face dataset (``datasets.load_dataset(NAME)``: a Hub id or a local folder of parquet/arrow
    files; ``root`` is its cache folder), random access, with folder's transforms (``aug``: timm's
    ``create_transform`` options: ``auto_augment``, ``re_prob``, ``re_mode``, ...); ``input_key`` and
    ``target_key`` name its image and label columns (timm's). ``labels=False``: its image column alone, as
    ``(x,)`` samples (`HfImages`: no label column needed). ``num_classes``: the run's head, which each label
    must fit (`LabelInRange`)."""
    from timm.data import ImageDataset, create_dataset

    hf_split = train_split if split == "train" else val_split
    _require_split(f"hfds/{name}", root, hf_split, split)
    if labels and split == "val":
        _refuse_other_class_order(name, root, train_split, val_split, target_key)
    columns = dict(input_key=input_key, target_key=target_key)
    default = hf_info(name, root, labels=labels, train_split=train_split, **columns)
    info = built_info(f"hfds/{name}", default, img_size, in_chans, mean, std, grayscale_or_rgb=True)
    aug = dict(auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count, **aug)
    augment, transform, info = timm_transform(split, augment, info, **aug)
    mode = "RGB" if info.in_chans == 3 else "L"
    if labels:
        with _hub_reads(name):
            images = create_dataset(
                f"hfds/{name}",
                root=root,
                split=hf_split,
                input_img_mode=mode,
                transform=transform,
                target_transform=LabelInRange(num_classes, f"hfds/{name}") if num_classes else None,
                **columns,
            )
    else:
        images = ImageDataset(
            root, reader=HfImages(name, root, hf_split, input_key), input_img_mode=mode, transform=transform
        )
    return FolderDataset(images, info, seed=seed, deterministic=augment, strict=split == "val")


def _refuse_other_class_order(
    name: str, root: str | None, train_split: str, val_split: str, key: str
) -> None:
    """A local folder of parquet files is read with its first split's features: a val split whose files name
    the classes of ``key`` in another order had its labels read as the train split's names, without a word."""
    if not Path(name).expanduser().is_dir():  # a Hub dataset's splits are written as one
        return
    import datasets
    import pyarrow.parquet as pq

    files = {
        str(k): v
        for k, v in (datasets.load_dataset_builder(name, cache_dir=root).config.data_files or {}).items()
    }

    def class_names(split: str) -> list[str] | None:
        for file in (f for f in files.get(split, ()) if str(f).endswith(".parquet")):
            said = (pq.read_schema(file).metadata or {}).get(b"huggingface")
            feature = json.loads(said).get("info", {}).get("features", {}).get(key, {}) if said else {}
            return feature.get("names")
        return None

    ours, theirs = class_names(train_split), class_names(val_split)
    if ours and theirs and ours != theirs:
        raise InputError(
            f"data.dataset=hfds/{name}: its {val_split!r} files name the classes of {key!r} {theirs}, its "
            f"{train_split!r} files {ours}; datasets reads every split in the first order, so the {val_split} labels "
            f"would name other classes: write both splits with one ClassLabel (val.cast_column({key!r}, "
            f"train.features[{key!r}]))"
        )


class LabelInRange:
    """timm's ``target_transform`` for a dataset that does not say its class count: a label the run's head does
    not have stops the run in one line (else an IndexError at the loss, a device-side assert on CUDA)."""

    def __init__(self, num_classes: int, dataset: str) -> None:
        self.num_classes, self.dataset = num_classes, dataset

    def __call__(self, label: int) -> int:
        if not 0 <= int(label) < self.num_classes:
            raise InputError(
                f"data.dataset={self.dataset} has the label {int(label)}, outside the {self.num_classes} classes "
                "of the student's head: set model.num_classes above its largest label"
            )
        return label


class StreamDataset(IterableDataset):
    """A timm stream limited to the samples this rank has left in the epoch (``remaining``, set by
    `StreamPosition` on a resume mid-epoch); each DataLoader worker yields its share. ``share`` (rank, world):
    a stream every rank reads whole (a val split), of which this rank keeps samples rank, rank + world, ...
    of each worker's sequence, so that the ranks together score every sample exactly once."""

    def __init__(
        self,
        stream,
        info: DatasetInfo,
        per_rank: int | None,
        labels: bool = True,
        share: tuple[int, int] = (0, 1),
    ):
        self.stream, self.info = stream, info if labels else without_labels(info)
        self.per_rank = per_rank
        self.remaining = per_rank
        self.labels = labels
        self.share = share

    def without_labels(self) -> StreamDataset:
        """This stream yielding ``(x,)``: its labels dropped (a reader that reads none is the builder's)."""
        if not self.labels:
            return self
        return StreamDataset(self.stream, self.info, self.per_rank, labels=False, share=self.share)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        if self.remaining is not None:
            return self.remaining
        rank, world = self.share
        return max(0, math.ceil((len(self.stream) - rank) / world))

    def __iter__(self):
        samples = iter(self.stream)
        rank, world = self.share
        if world > 1:
            samples = islice(samples, rank, None, world)
        if not self.labels:
            samples = ((x,) for x, *_ in samples)
        if self.remaining is None:
            return samples
        worker = get_worker_info()
        share = self.remaining if worker is None else math.ceil(self.remaining / worker.num_workers)
        return islice(samples, share)


class StreamPosition:
    """What the engine asks of a sampler, for a stream: a position inside the epoch shortens the epoch's
    stream to the batches left (the samples are read from the epoch's start: see the module docstring)."""

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
        augment: bool | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "const",
        re_count: int = 1,
        labels: bool = True,
        num_classes: int | None = None,
        _prefix: str = _prefix,
        **options,
    ) -> StreamDataset:
        """A stream read by timm (webdataset shards under ``root``; a streamed Hugging Face dataset): options
        ``train_split`` / ``val_split`` (for shards, ``"train-{000000..000099}.tar|N"``: files and sample
        count, or the split names of ``root/_info.json``), ``train_samples`` / ``val_samples`` (a split's
        length where its files do not say it: streamed Hugging Face datasets), ``input_key`` / ``target_key``
        (timm's: a streamed dataset's image and label columns, a shard's extensions), the per-rank ``batch_size``
        and ``world_size`` (set by the run), and folder's transform options. ``labels=False``: ``(x,)``
        samples (wds: decoded without ``.cls``; hfids: the labels timm's reader hands it dropped)."""
        from timm.data import IterableImageDataset, create_dataset

        train_split, val_split = options.pop("train_split", "train"), options.pop("val_split", "validation")
        # timm's names of the image and label columns (hfids) or file extensions (wds), where given
        columns = {k: options.pop(k) for k in ("input_key", "target_key") if k in options}
        num_samples = {s: options.pop(f"{s}_samples", None) for s in SPLITS}[split]
        dataset = f"{_prefix}/{name}"
        if _prefix == "hfids":
            _require_split(dataset, root, train_split if split == "train" else val_split, split)
        elif root is None:  # timm's shard reader would fail on a root of None
            raise InputError(
                f"data.dataset={dataset} reads webdataset tar shards under data.root: set data.root=PATH"
            )
        info = built_info(
            dataset, stream_info(dataset, root), img_size, in_chans, mean, std, grayscale_or_rgb=True
        )
        aug = dict(auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count, **options)
        augment, transform, info = timm_transform(split, augment, info, **aug)
        transform = ReadAs("RGB" if info.in_chans == 3 else "L", transform, seed if augment else None)
        # timm logs that shards without _info.json fall back to the split as given: what was asked for, or a
        # split name no file lists, which the InputError below says in attnxfer's words
        try:
            with lines_dropped("timm.data.readers.reader_wds", "Dataset info file not found"):
                stream = create_dataset(
                    dataset,
                    root=root,
                    split=train_split if split == "train" else val_split,
                    is_training=split == "train",
                    batch_size=batch_size,
                    num_samples=num_samples,
                    seed=seed,
                    input_img_mode="",  # none: `ReadAs` converts (timm takes None for its default, RGB)
                    transform=transform,
                    target_transform=LabelInRange(num_classes, dataset) if labels and num_classes else None,
                    **columns,
                )
            # webdataset skips a shard it cannot open with a log line: an epoch would end early, or be empty
            shards = stream.reader.split_info.filenames if _prefix == "wds" and "://" not in root else ()
            if missing := [f for f in shards if not os.path.isfile(os.path.join(root, f))]:
                raise MissingPathError(
                    f"data.dataset={dataset}: {len(missing)} of the {split} split's {len(shards)} shards are not "
                    f"under data.root={root}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                )
            if _prefix == "wds" and not labels:  # the same shards, decoded without their .cls
                stream = IterableImageDataset(root, reader=WdsImages(stream.reader), transform=transform)
        except ImportError as e:
            raise _missing_extra(dataset, e) from e
        except RuntimeError as e:  # timm's wds reader, for a split name no _info.json under root lists
            if "not found in info" not in str(e):
                raise
            raise InputError(
                f"data.dataset={dataset}: {e}: no _info.json under data.root={root} names it; name the split's "
                f"shards instead: data.kwargs.{split}_split='NAME-{{000000..000099}}.tar|N' (files, samples)"
            ) from e
        per_rank, share = None, (0, 1)
        if split == "train":  # the epoch: whole batches of this rank's equal share (as drop_last)
            per_rank = (int(stream.reader.num_samples) // world_size) // batch_size * batch_size
        reader = getattr(stream.reader, "reader", stream.reader)  # timm's own, under `WdsImages`
        if split != "train" or world_size == 1:
            # timm's reader shares the shards out by rank, and on several ranks pads every rank's share to the
            # same length by reading shards again: some images scored twice, others never (timm's own note).
            # A val split is read whole by every rank's reader and shared out here, each image once; a split
            # read for one process (a k-NN bank, whole on every rank) is read whole.
            if split != "train":
                share = (reader.dist_rank, reader.dist_num_replicas)
            reader.dist_rank, reader.dist_num_replicas = 0, 1
            reader.global_num_workers = reader.num_workers
        return StreamDataset(stream, info, per_rank, labels=labels, share=share)

    register_prefix(_prefix, info=stream_info)(_builder)
