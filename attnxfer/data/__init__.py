"""Datasets, a resumable distributed sampler and loaders, every sample a function of (seed, epoch, index)."""

from . import animal_mnist, folder, recall, synthetic, timm_sources  # noqa: F401  registers the built-in datasets
from .cache import cache_dir as cache_dir
from .identity import data_identity as data_identity
from .in_memory import InMemoryImageDataset as InMemoryImageDataset
from .label_free import (
    LabelFree as LabelFree,
    dataset_has_labels as dataset_has_labels,
    images_only as images_only,
    split_batch as split_batch,
)
from .loader import build_loader as build_loader
from .registry import (
    DatasetInfo as DatasetInfo,
    build_dataset as build_dataset,
    dataset_info as dataset_info,
    list_datasets as list_datasets,
    register_dataset as register_dataset,
    require_labels as require_labels,
)
from .safe_pickle import (
    NumpyOnlyUnpickler as NumpyOnlyUnpickler,
    UnsafePickleError as UnsafePickleError,
    load_numpy_pickle as load_numpy_pickle,
)
from .sampler import ResumableSampler as ResumableSampler
from .seeding import SampleKey as SampleKey, sample_seed as sample_seed
from .timm_sources import (
    STREAM_PREFIXES as STREAM_PREFIXES,
    StreamDataset as StreamDataset,
    StreamPosition as StreamPosition,
)
