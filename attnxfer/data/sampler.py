"""A distributed sampler that can resume in the middle of an epoch, at the same or another world size.

The resume point is a *global* count, ``position`` = samples of this epoch consumed by all ranks together,
so the rest of the epoch's order can be re-strided over however many ranks there are now.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from ..errors import InputError
from .seeding import SampleKey

_CONFIG_KEYS = ("length", "shuffle", "seed", "drop_last")


class ResumableSampler(Sampler[int]):
    """Yields `SampleKey` indices (ints carrying the epoch) for one rank; at ``position == 0`` exactly
    torch's ``DistributedSampler``'s (``drop_last`` is its: the tail that does not divide over ranks).

    The caller reports what was consumed with `set_position` (DataLoader workers prefetch ahead, so the
    sampler cannot see it). ``exact=True`` (evaluation): each rank ``order[rank::world_size]``, every
    sample once; ranks' lengths may differ by one, so their loops must not run collectives per batch.
    """

    def __init__(
        self,
        length: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        exact: bool = False,
    ):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.length = int(length)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.exact = bool(exact)
        if self.exact and self.drop_last:
            raise ValueError(
                "exact=True scores every sample once: it cannot drop_last (pass drop_last=False)"
            )
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; moving to another epoch restarts at position 0."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = int(epoch)

    def set_position(self, position: int) -> None:
        """Samples of the current epoch all ranks consumed; the next iterator starts after them."""
        self._check_position(position, self.world_size)
        self.position = int(position)

    def _check_position(self, position: int, world_size: int) -> None:
        # A padded epoch has up to world_size - 1 repeated samples beyond `length`.
        if not 0 <= position <= self.length + world_size - 1:
            raise ValueError(
                f"position {position} is outside epoch {self.epoch} ({self.length} samples over {world_size} ranks); "
                f"it counts samples consumed in the current epoch by all ranks together"
            )

    def _per_rank(self, remaining: int) -> int:
        if self.exact:  # this rank's share of order[rank::world_size]
            return max(0, math.ceil((remaining - self.rank) / self.world_size))
        if self.drop_last:
            return remaining // self.world_size
        return math.ceil(remaining / self.world_size)

    def __len__(self) -> int:
        return self._per_rank(max(0, self.length - self.position))

    def epoch_order(self) -> list[int]:
        """The epoch's full global order (before padding/truncation), the same on every rank."""
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def indices(self) -> list[int]:
        """This rank's remaining indices for the current epoch and position."""
        order = self.epoch_order()
        rest = order[self.position :]
        if self.exact:
            return rest[self.rank :: self.world_size]
        total = self._per_rank(len(rest)) * self.world_size
        if total > len(rest):  # pad by repeating the epoch's order from its start
            pad = total - len(rest)
            rest += (order * math.ceil(pad / len(order)))[:pad]
        return rest[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter([SampleKey(i, self.epoch) for i in self.indices()])

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable progress (epoch, position) plus the settings that define the order."""
        return {k: getattr(self, k) for k in ("epoch", "position", *_CONFIG_KEYS, "world_size")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch and position; the order's settings must match (another order makes the position
        meaningless), the world size may differ."""
        missing = [k for k in ("epoch", "position", *_CONFIG_KEYS) if k not in state]
        if missing:
            raise ValueError(
                f"sampler state is missing {missing}; expected the dict from ResumableSampler.state_dict()"
            )
        changed = {k: (state[k], getattr(self, k)) for k in _CONFIG_KEYS if state[k] != getattr(self, k)}
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise InputError(
                f"cannot resume the sampler: {detail}. Resume with the same dataset and data seed, "
                f"or start a fresh epoch."
            )
        self.epoch = int(state["epoch"])
        self._check_position(state["position"], max(self.world_size, int(state.get("world_size", 1))))
        self.position = int(state["position"])
