"""Per-sample seeds and the sample key that carries the epoch to the dataset.

Augmentation draws its randomness from a generator seeded by (seed, epoch, index) alone, so a
sample's pixels never depend on which worker loaded it, how many workers there are, or what was
loaded before it: a resumed epoch reproduces the interrupted one bit for bit.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


class SampleKey(int):
    """A dataset index (an ``int``) that also carries the epoch it was drawn in: carried with the index,
    not in dataset state, the epoch stays in step in persistent DataLoader workers (each has its own copy
    of the dataset)."""

    def __new__(cls, index: int, epoch: int = 0) -> SampleKey:
        key = super().__new__(cls, index)
        key.epoch = int(epoch)
        return key

    def __reduce__(self):
        return SampleKey, (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, epoch={self.epoch})"


def key_epoch(key: int, default: int) -> int:
    """The epoch a key was drawn in, or ``default`` for a plain int index."""
    return getattr(key, "epoch", default)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed of (seed, epoch, index): a cryptographic hash, so no two triples collide in practice
    and the value is the same on every platform and library version."""
    packed = struct.pack("<QQQ", seed & _MASK64, epoch & _MASK64, index & _MASK64)
    digest = hashlib.blake2b(packed, digest_size=8, person=b"attnxfer").digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A private CPU generator for one sample's augmentation."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's global RNGs for one call, then restore them: third-party
    transforms (timm) draw from them, and the caller's streams (dropout, init) stay untouched."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class OwnGlobalRngs:
    """Python's, numpy's and torch's global RNG states kept apart from the process's, seeded by ``seed``:
    a transform that draws from the global RNGs (timm's) run in the main process (no DataLoader workers, whose
    streams are their own) draws from these under `active`, so its draws depend on the data's seed alone and
    the training's streams (initialisation, dropout, drop path) are neither read nor advanced by it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        # (python, numpy, torch CPU) after the last call; None: not yet drawn
        self.states: tuple | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            if self.states is None:
                random.seed(self.seed)
                np.random.seed(self.seed & 0xFFFF_FFFF)
                torch.manual_seed(self.seed)
            else:
                random.setstate(self.states[0])
                np.random.set_state(self.states[1])
                torch.set_rng_state(self.states[2])
            try:
                yield
            finally:
                self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
                random.setstate(py_state)
                np.random.set_state(np_state)
