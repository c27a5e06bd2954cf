"""Datasets, a resumable distributed sampler and loaders, every sample a function of (seed, epoch, index).

Importing the package imports every module in it, so a dataset registered in a new file here is found by
name."""

import importlib
import pkgutil

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
    statistics_differ as statistics_differ,
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

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the datasets it defines
