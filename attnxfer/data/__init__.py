"""Datasets, a resumable distributed sampler and loaders, every sample a function of (seed, epoch, index)."""

from . import animal_mnist, folder, recall, synthetic, timm_sources  # noqa: F401  registers the built-in datasets
from .cache import cache_dir
from .identity import data_identity
from .in_memory import InMemoryImageDataset
from .label_free import LabelFree, dataset_has_labels, images_only, split_batch
from .loader import build_loader
from .registry import (
    DatasetInfo,
    build_dataset,
    dataset_info,
    list_datasets,
    register_dataset,
    require_labels,
)
from .safe_pickle import NumpyOnlyUnpickler, UnsafePickleError, load_numpy_pickle
from .sampler import ResumableSampler
from .seeding import SampleKey, sample_seed
from .timm_sources import STREAM_PREFIXES, StreamDataset, StreamPosition

__all__ = [
    "STREAM_PREFIXES",
    "DatasetInfo",
    "InMemoryImageDataset",
    "LabelFree",
    "NumpyOnlyUnpickler",
    "ResumableSampler",
    "SampleKey",
    "StreamDataset",
    "StreamPosition",
    "UnsafePickleError",
    "build_dataset",
    "build_loader",
    "cache_dir",
    "data_identity",
    "dataset_has_labels",
    "dataset_info",
    "images_only",
    "list_datasets",
    "load_numpy_pickle",
    "register_dataset",
    "require_labels",
    "sample_seed",
    "split_batch",
]
