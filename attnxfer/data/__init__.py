"""Datasets, a resumable distributed sampler and loaders for attnxfer.

Built-in datasets: ``animal_mnist`` (real 28x28 silhouettes from the animal-mnist package),
``synthetic`` (learnable random patterns of any shape) and ``folder`` (ImageNet-style folders via
timm). Build them with :func:`build_dataset`; add more with :func:`register_dataset`.
"""
from .cache import cache_dir
from .registry import DatasetInfo, build_dataset, dataset_info, list_datasets, register_dataset
from .safe_pickle import NumpyOnlyUnpickler, UnsafePickleError, load_numpy_pickle
from .sampler import ResumableSampler
from .seeding import SampleKey, sample_seed
from .loader import build_loader
from .in_memory import InMemoryImageDataset
from . import animal_mnist, folder, synthetic  # noqa: F401  registers the built-in datasets

__all__ = [
    'DatasetInfo', 'build_dataset', 'dataset_info', 'list_datasets', 'register_dataset',
    'ResumableSampler', 'SampleKey', 'sample_seed', 'build_loader', 'InMemoryImageDataset',
    'NumpyOnlyUnpickler', 'UnsafePickleError', 'load_numpy_pickle', 'cache_dir',
]
