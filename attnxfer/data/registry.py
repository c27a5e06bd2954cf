"""Dataset registry: name -> builder, plus the facts a model needs (classes, mean/std, input shape)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import Dataset

__all__ = [
    "SPLITS",
    "DatasetInfo",
    "build_dataset",
    "dataset_info",
    "list_datasets",
    "register_dataset",
    "resolve_norm",
]

SPLITS = ("train", "val")
_BUILDER_ARGS = ("split", "root", "img_size", "in_chans", "mean", "std", "seed")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset."""

    name: str
    num_classes: int | None
    class_names: tuple[str, ...] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    img_size: int


InfoSource = DatasetInfo | Callable[[str | None], DatasetInfo]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., Dataset]
    info: InfoSource


_DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, *, info: InfoSource) -> Callable:
    """Register ``builder(split, *, root, img_size, in_chans, mean, std, seed, **options)`` as ``name``.

    ``info`` is the dataset's default :class:`DatasetInfo`, or a callable ``info(root)`` for datasets
    whose classes are only known from their files. The builder fills in ``None`` arguments from it.
    """

    def decorator(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _DATASETS:
            raise ValueError(
                f"dataset '{name}' is already registered (by {_DATASETS[name].builder.__qualname__})"
            )
        params = inspect.signature(builder).parameters
        missing = [a for a in _BUILDER_ARGS if a not in params]
        if missing:
            raise TypeError(
                f"dataset builder '{name}' must accept {', '.join(_BUILDER_ARGS)}; missing {missing}"
            )
        _DATASETS[name] = _Entry(builder, info)
        return builder

    return decorator


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def _entry(name: str) -> _Entry:
    try:
        return _DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _DATASETS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown dataset '{name}'; known datasets: {', '.join(list_datasets())}.{hint}"
        ) from None


def _options(builder: Callable) -> list[str]:
    return [p for p in inspect.signature(builder).parameters if p not in _BUILDER_ARGS]


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
    **kwargs,
) -> Dataset:
    """Build split ``'train'`` or ``'val'`` of a registered dataset.

    ``img_size``/``in_chans``/``mean``/``std`` left as ``None`` take the dataset's defaults
    (see :func:`dataset_info`); ``seed`` fixes the augmentation (and synthetic content).
    Extra keyword arguments are dataset options; unknown ones are an error that lists the valid ones.
    """
    entry = _entry(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    options = _options(entry.builder)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"dataset '{name}' has no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(options) or '(none)'}"
        )
    return entry.builder(
        split, root=root, img_size=img_size, in_chans=in_chans, mean=mean, std=std, seed=seed, **kwargs
    )


def dataset_info(name_or_dataset: str | Dataset, *, root: str | Path | None = None) -> DatasetInfo:
    """Defaults of a registered dataset (``root`` needed for class names of folder datasets),
    or the actual settings of a built dataset."""
    if not isinstance(name_or_dataset, str):
        info = getattr(name_or_dataset, "info", None)
        if not isinstance(info, DatasetInfo):
            raise TypeError(
                f"{type(name_or_dataset).__name__} has no DatasetInfo; pass a registered name or a "
                f"dataset made by build_dataset"
            )
        return info
    source = _entry(name_or_dataset).info
    return source if isinstance(source, DatasetInfo) else source(None if root is None else str(root))


def resolve_norm(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    in_chans: int,
    default: DatasetInfo,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std: given or the dataset's default, broadcast from one value to ``in_chans``."""

    def one(values, fallback, what):
        values = tuple(float(v) for v in (fallback if values is None else values))
        if len(values) == 1:
            values = values * in_chans
        if len(values) != in_chans:
            raise ValueError(
                f"{what} has {len(values)} values but in_chans={in_chans}; give 1 or {in_chans} values"
            )
        return values

    mean_t = one(mean, default.mean, "mean")
    std_t = one(std, default.std, "std")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std must be positive, got {std_t}")
    return mean_t, std_t


def with_settings(info: DatasetInfo, **changes) -> DatasetInfo:
    """A copy of ``info`` describing a built dataset (its real size, channels, mean/std)."""
    return replace(info, **changes)


def check_image_args(
    name: str, img_size: int | None, in_chans: int | None, default: DatasetInfo
) -> tuple[int, int]:
    img_size = default.img_size if img_size is None else img_size
    in_chans = default.in_chans if in_chans is None else in_chans
    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"{name}: img_size must be a positive int (square images), got {img_size!r}")
    if not isinstance(in_chans, int) or in_chans <= 0:
        raise ValueError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
    return img_size, in_chans
