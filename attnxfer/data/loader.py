"""DataLoader construction with the settings a resumable, multi-worker run needs."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler | None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``sampler`` with its own generator seeded with ``seed``: worker seeds are drawn
    from it, not the global torch RNG, so the number of workers never shifts the main process's stream."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
