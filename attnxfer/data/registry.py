"""Dataset registry: name -> builder, plus the facts a model needs (classes, mean/std, input shape). An
installed distribution adds its datasets through an ``attnxfer.datasets`` entry point (no fork needed)."""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from ..errors import InputError, OptionError, did_you_mean
from ..plugins import DATASET_GROUP, load_entry_points
from .label_free import images_only, without_labels
from .seeding import seeded_global_rngs

SPLITS = ("train", "val")
_BUILDER_ARGS = ("split", "root", "img_size", "in_chans", "mean", "std", "seed")
#: a builder option's annotation part -> the values it takes and how a user says them
_SCALARS = {
    "bool": ((bool,), "true/false"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "None": ((type(None),), "null"),
}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset. ``has_labels``: False where samples are
    ``(x,)``. ``crop_pct``, ``crop_mode``, ``interpolation``: how its eval split resizes and crops decoded
    images, in timm's pretrained_cfg terms (what an export declares, so timm prepares images the way the run
    validated them); None for tensor datasets."""

    name: str
    num_classes: int | None
    class_names: tuple[str, ...] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    img_size: int
    has_labels: bool = True
    crop_pct: float | None = None
    crop_mode: str | None = None
    interpolation: str | None = None

    def eval_preprocessing(self) -> dict[str, float | str]:
        """The eval transform's resize and crop as pretrained_cfg entries ({} where none is recorded)."""
        keys = ("crop_pct", "crop_mode", "interpolation")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


InfoSource = DatasetInfo | Callable[[str | None], DatasetInfo]


def statistics_differ(own: Sequence[float], theirs: Sequence[float]) -> bool:
    """Whether two per-channel normalisation statistics differ; one value is that value on every channel (a
    run of 1-channel data made 3-channel records [0.5], its export [0.5, 0.5, 0.5])."""
    if len(own) != len(theirs) and 1 not in (len(own), len(theirs)):
        return True
    n = max(len(own), len(theirs))
    return any(
        abs(a - b) > 1e-4 for a, b in zip(list(own) * (n // len(own)), list(theirs) * (n // len(theirs)))
    )


def require_labels(info: DatasetInfo, why: str, fix: str = "use labelled data with data.labels=true") -> None:
    """Stop with one line when ``why`` (what needs them, e.g. "the task loss") would read labels that ``info``'s
    dataset does not hand out; ``fix`` says what to do instead. Apps call it before any work."""
    if not info.has_labels:
        raise InputError(
            f"{why} needs labels, but data.dataset={info.name} is read without labels (data.labels=false, or "
            f"a dataset that has none); {fix}"
        )


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., Dataset]
    info: InfoSource
    reads_root: bool = True
    # a prefix's names where it knows them (torch/cifar10): what a bare name (cifar10) meant
    names: tuple[str, ...] = ()


_DATASETS: dict[str, _Entry] = {}
#: prefix -> builder(name, split, ...) and info(name, root): a family of datasets named ``prefix/NAME``
_PREFIXES: dict[str, _Entry] = {}


def register_prefix(
    prefix: str, *, info: Callable[[str, str | None], DatasetInfo], names: Sequence[str] = ()
) -> Callable:
    """Register ``builder(name, split, *, root, img_size, ...)`` for every dataset called ``prefix/NAME``
    (``info(NAME, root)`` gives its defaults; it may take ``labels=`` too, as builders may; ``names``: the
    NAMEs it reads, where they are few and known)."""

    def decorator(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _PREFIXES[prefix] = _Entry(builder, info, names=tuple(names))
        return builder

    return decorator


def register_dataset(name: str, *, info: InfoSource, reads_root: bool = True) -> Callable:
    """Register ``builder(split, *, root, img_size, in_chans, mean, std, seed, **options)`` as ``name``;
    ``info``: its default `DatasetInfo`, or ``info(root)`` where the classes are only known from its files;
    ``reads_root`` False: a generated dataset that ignores ``root`` (a run then shows no data.root for it).
    A builder (or info) that names a ``labels`` parameter is told when the run reads none, so it can read
    images without touching them; `build_dataset` drops the labels of every other dataset's samples."""

    def decorator(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _DATASETS:
            raise InputError(
                f"dataset '{name}' is already registered (by {_DATASETS[name].builder.__qualname__})"
            )
        params = inspect.signature(builder).parameters
        missing = [a for a in _BUILDER_ARGS if a not in params]
        if missing:
            raise TypeError(
                f"dataset builder '{name}' must accept {', '.join(_BUILDER_ARGS)}; missing {missing}"
            )
        _DATASETS[name] = _Entry(builder, info, reads_root)
        return builder

    return decorator


def list_datasets() -> list[str]:
    """Registered names (entry points included) and the prefix families as ``prefix/NAME``."""
    load_entry_points(DATASET_GROUP)
    return sorted(_DATASETS) + [f"{p}/NAME" for p in sorted(_PREFIXES)]


def _entry(name: str) -> _Entry:
    # even for a built-in's name: a package registering that name is then said, not silently passed over
    load_entry_points(DATASET_GROUP)
    if name in _DATASETS:
        return _DATASETS[name]
    prefix, sep, rest = name.partition("/")
    if sep and prefix.lower() in _PREFIXES and rest:
        entry = _PREFIXES[prefix.lower()]
        return _Entry(functools.partial(entry.builder, rest), functools.partial(entry.info, rest))
    prefixed = [f"{prefix}/{name}" for prefix, entry in _PREFIXES.items() for name in entry.names]
    meant = did_you_mean(name, [*_DATASETS, *prefixed])
    raise InputError(
        f"unknown dataset '{name}'{meant} (known datasets: {', '.join(list_datasets())}; "
        f"a dataset of your own: @register_dataset in a module named by an '{DATASET_GROUP}' entry point)"
    )


def _options(builder: Callable) -> list[str]:
    return [
        name
        for name, p in inspect.signature(builder).parameters.items()
        if name not in (*_BUILDER_ARGS, "labels") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _annotation_parts(hint: str) -> list[str]:
    """The parts of an option's annotation as written: ``int | None``, ``Optional[int]`` and ``Union[int, None]``
    (``typing.``-qualified, as a class annotation prints, or not) are each ``['int', 'None']``."""
    hint = hint.replace(" ", "").replace("typing.", "")
    for wrapper, also in (("Optional[", ["None"]), ("Union[", [])):
        if hint.startswith(wrapper) and hint.endswith("]"):
            return [*hint[len(wrapper) : -1].split(","), *also]
    return hint.split("|")


def dataset_reads_root(name: str) -> bool:
    """Whether ``name``'s builder reads anything under ``root`` (False: generated data, ``root`` ignored)."""
    return _entry(name).reads_root


def dataset_options(name: str) -> frozenset[str]:
    """The options ``name``'s builder names beyond the common arguments: a run passes its own settings
    (augmentation, the class count, the per-rank batch) to the builders that name them."""
    return frozenset(_options(_entry(name).builder))


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    labels: bool = True,
    **kwargs,
) -> Dataset:
    """Split ``'train'`` or ``'val'`` of a registered dataset; ``None`` arguments take the dataset's
    defaults, ``seed`` fixes augmentation (and generated content), ``labels=False`` gives ``(x,)`` samples.
    Extra keyword arguments are dataset options; unknown ones are an error that lists the valid ones."""
    entry = _entry(name)
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    options, params = _options(entry.builder), inspect.signature(entry.builder).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [] if open_ended else sorted(set(kwargs) - set(options))
    if unknown:
        raise OptionError(
            f"dataset '{name}' has no option(s) {', '.join(unknown)} (data.kwargs); "
            f"its options are: {', '.join(options) or '(none)'}"
        )
    for key, value in kwargs.items():  # a value of another type: a traceback deep in the builder otherwise
        hint = params[key].annotation if key in params else None  # the class `int` unless annotations defer
        if hint is inspect.Parameter.empty:  # unannotated: the kind of its default (an int default: a number)
            default = params[key].default
            hint = "float" if type(default) in (int, float) else type(default).__name__
        hint = hint.__name__ if isinstance(hint, type) else str(hint)
        spelled = _annotation_parts(hint) if key in params else []
        if spelled and all(part in _SCALARS for part in spelled):
            takes = tuple(t for part in spelled for t in _SCALARS[part][0])
            if not isinstance(value, takes) or (isinstance(value, bool) and bool not in takes):
                said = " or ".join(_SCALARS[part][1] for part in spelled)
                raise InputError(f"dataset '{name}': data.kwargs.{key} takes {said}, got {value!r}")
    if not labels and "labels" in inspect.signature(entry.builder).parameters:
        kwargs["labels"] = False  # the builder reads images alone
    # ~ as the home folder for every dataset: timm's shard reader and the shard check would take it literally
    root = None if root is None else os.path.expanduser(root)
    dataset = entry.builder(
        split, root=root, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed, **kwargs
    )
    fn = entry.builder
    builder = f"its builder {getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    if not isinstance(dataset, Dataset) and not (
        hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    ):
        raise InputError(
            f"dataset '{name}': {builder} returned {type(dataset).__name__}; it must return a torch Dataset "
            "of (image, label) samples"
        )
    dataset = dataset if labels else images_only(dataset)
    # a builder that ignores the run's size stopped it in timm: its val split's first image says so (a train
    # split may vary its size on purpose, recall's curriculum; a stream has no index), global RNGs untouched
    if split == "val" and img_size and in_chans and not isinstance(dataset, IterableDataset) and len(dataset):
        with seeded_global_rngs(seed):
            sample = dataset[0]
        if not isinstance(sample, (tuple, list)) or len(sample) != (2 if labels else 1):
            raise InputError(
                f"dataset '{name}': {builder} gives {type(sample).__name__} samples; each must be an "
                "(image, label) pair"
            )
        image = sample[0]
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise InputError(
                f"dataset '{name}': {builder} gives {getattr(image, 'dtype', type(image).__name__)} images; "
                "they must be float tensors normalised by the mean/std it is given (InMemoryImageDataset makes "
                "them from uint8 images)"
            )
        if labels and not _is_class_index(sample[1]):
            raise InputError(
                f"dataset '{name}': {builder} gives the label {sample[1]!r}; a label must be an integer class "
                "index"
            )
        info = getattr(dataset, "info", entry.info)  # a callable info (classes from root): not read again
        if (
            labels
            and isinstance(info, DatasetInfo)
            and info.num_classes
            and not 0 <= sample[1] < info.num_classes
        ):
            raise InputError(
                f"dataset '{name}': {builder} gives the label {int(sample[1])}, outside its "
                f"{info.num_classes} classes (DatasetInfo.num_classes): labels must be 0 to {info.num_classes - 1}"
            )
        shape = tuple(image.shape)
        if shape != (in_chans, img_size, img_size):
            raise InputError(
                f"dataset '{name}' gives {'x'.join(map(str, shape))} images; the run asked for "
                f"{in_chans}x{img_size}x{img_size} (data.img_size / data.in_chans): its builder must make "
                "images at the img_size and in_chans it is given"
            )
    return dataset


def _is_class_index(label) -> bool:
    if isinstance(label, torch.Tensor):
        return label.ndim == 0 and not label.is_floating_point() and label.dtype != torch.bool
    return isinstance(label, numbers.Integral) and not isinstance(label, bool)  # numpy's integers too


def dataset_info(
    name_or_dataset: str | Dataset,
    *,
    root: str | Path | None = None,
    labels: bool = True,
    options: Mapping[str, Any] | None = None,
) -> DatasetInfo:
    """Defaults of a registered dataset (``root`` needed for class names of folder datasets; ``labels=False``
    as a run that reads no labels sees it; ``options``, the run's ``data.kwargs``, those its info function
    names: a Hugging Face dataset's split and column names), or the actual settings of a built dataset."""
    if not isinstance(name_or_dataset, str):
        info = getattr(name_or_dataset, "info", None)
        if not isinstance(info, DatasetInfo):
            raise TypeError(
                f"{type(name_or_dataset).__name__} has no DatasetInfo; pass a registered name or a "
                f"dataset made by build_dataset"
            )
        return info
    source = _entry(name_or_dataset).info
    if isinstance(source, DatasetInfo):
        info = source
    else:
        where = None if root is None else os.path.expanduser(root)
        named = inspect.signature(source).parameters
        given = {k: v for k, v in (options or {}).items() if k in named and k not in ("root", "labels")}
        info = (
            source(where, labels=False, **given)
            if not labels and "labels" in named
            else source(where, **given)
        )
    return info if labels else without_labels(info)


def built_info(
    name: str,
    default: DatasetInfo,
    img_size: int | None,
    in_chans: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    grayscale_or_rgb: bool = False,
    **changes,
) -> DatasetInfo:
    """``default`` with a builder's common arguments filled in where None and checked (``mean``/``std``
    broadcast from one value per channel; ``grayscale_or_rgb``: decoded images, 1 or 3 channels)."""
    img_size = default.img_size if img_size is None else img_size
    in_chans = default.in_chans if in_chans is None else in_chans
    if not isinstance(img_size, int) or img_size <= 0:
        raise InputError(f"{name}: img_size must be a positive int (square images), got {img_size!r}")
    if not isinstance(in_chans, int) or in_chans <= 0:
        raise InputError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
    if grayscale_or_rgb and in_chans not in (1, 3):
        raise InputError(f"{name}: in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")

    def per_channel(values, fallback, what):
        values = tuple(float(v) for v in (fallback if values is None else values))
        if len(values) == 1:
            values = values * in_chans
        if len(values) != in_chans:
            raise InputError(
                f"{what} (data.{what}) has {len(values)} values but in_chans={in_chans}: give one value per "
                "channel, or one for all"
            )
        return values

    mean = per_channel(mean, default.mean, "mean")
    std = per_channel(std, default.std, "std")
    if any(s <= 0 for s in std):
        raise InputError(f"std must be positive, got {std}")
    return replace(default, img_size=img_size, in_chans=in_chans, mean=mean, std=std, **changes)
