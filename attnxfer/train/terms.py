"""A training step's numbers kept on the device, without host syncs: reading a tensor on the host waits for
every queued kernel, so the host could not queue the next step. `TermWindow` sums the logged terms until a
record is written; `NonFiniteGuard` keeps the first non-finite step, read at log steps and before any save or
evaluation, so a NaN still stops the run before anything is written over the last good checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import UserError
from .distributed import min_over_ranks, rank_and_world, sum_over_ranks

#: what `NonFiniteGuard.earliest` holds while every watched term was finite (larger than any step)
NO_STEP = 2**62


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN/inf; nothing was saved over the last good checkpoint."""


def _stacked(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The scalar tensors of ``values`` as one float64 vector on their device (no sync)."""
    return torch.stack([v.detach().reshape(()).float() for v in values.values()]).double()


class TermWindow:
    """Means of logged scalar terms since the last `means` call, summed on the device; a term counts over
    the steps it was logged in (per-layer KL appears on log steps only)."""

    def __init__(self) -> None:
        # keys of a step's terms, in order -> (their running sums, how many steps added them)
        self._sums: dict[tuple[str, ...], tuple[torch.Tensor, float]] = {}

    def add(self, values: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """``values`` of one step, or of one of its micro-batches with ``weight`` 1 / their number: a record
        is the mean over steps also where a resume changed how many micro-batches a step has."""
        if not values:
            return
        key = tuple(values)
        vec = _stacked(values) * weight
        if key in self._sums:
            sums, n = self._sums[key]
            self._sums[key] = (sums.add_(vec), n + weight)
        else:
            self._sums[key] = (vec, weight)

    def state(self) -> list[list]:
        """The window as JSON for a checkpoint: each key set with its sums (the mean over ranks; every rank
        calls it, a collective under DDP) and step count, so a run resumed between two log steps writes the
        record an uninterrupted run writes."""
        if not self._sums:
            return []
        sums, world = torch.cat([s for s, _ in self._sums.values()]), rank_and_world()[1]
        values = iter(v / world for v in sum_over_ranks(sums.tolist(), sums.device))
        return [[list(key), [next(values) for _ in key], n] for key, (_, n) in self._sums.items()]

    @classmethod
    def restored(cls, state: list[list], device: torch.device) -> TermWindow:
        """A window holding `state`'s sums on every rank (as a resumed epoch's loss: a resumed part is every
        rank's)."""
        window = cls()
        for names, sums, n in state:
            window._sums[tuple(names)] = (torch.tensor(sums, dtype=torch.float64, device=device), float(n))
        return window

    def means(self) -> dict[str, float]:
        """Each term's mean over the window and over ranks (each sums its own share of equal batches) as Python
        floats; empties the window. Every rank calls it (a collective under DDP)."""
        totals: dict[str, float] = {}
        counts: dict[str, float] = {}
        for key, sums, n in self.state():
            for name, value in zip(key, sums, strict=True):
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + n
        self._sums = {}
        return {name: totals[name] / counts[name] for name in totals}


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite loss term: its name, value, and the step (steps done before it) and epoch."""

    term: str
    value: float
    step: int
    epoch: int


class NonFiniteGuard:
    """Remembers, on the device, the first step whose watched loss terms were not all finite: `watch` costs
    no sync, `earliest` is that step as a device tensor, `first` reads the details (a sync)."""

    def __init__(self) -> None:
        # names of the watched terms -> (first bad step or NO_STEP, its epoch, the terms' values then)
        self._records: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def watch(self, terms: Mapping[str, torch.Tensor], step: int, epoch: int) -> None:
        """Record ``terms`` (scalar loss tensors) of ``step`` if no earlier step had a non-finite one."""
        if not terms:
            return
        names = tuple(terms)
        vec = _stacked(terms)
        if names not in self._records:
            full = lambda v: torch.full((), v, dtype=torch.int64, device=vec.device)
            self._records[names] = (full(NO_STEP), full(-1), torch.zeros_like(vec))
        first, first_epoch, values = self._records[names]
        newly = (~torch.isfinite(vec).all()) & (first == NO_STEP)
        first.masked_fill_(newly, step)
        first_epoch.masked_fill_(newly, epoch)
        values.copy_(torch.where(newly, vec, values))

    def tripped(self) -> torch.Tensor | None:
        """Whether any watched step was non-finite, as a 0-d float32 device tensor: a fused optimiser's
        ``found_inf``. None before any `watch`."""
        earliest = self.earliest
        return None if earliest is None else (earliest != NO_STEP).float()

    def any_rank_tripped(self) -> bool:
        """Whether a watched term was non-finite on any rank: one read, and a collective under DDP."""
        earliest = self.earliest
        return earliest is not None and min_over_ranks(earliest) != NO_STEP

    @property
    def earliest(self) -> torch.Tensor | None:
        """The first bad step as a 0-d int64 device tensor (`NO_STEP` if none); None before any `watch`."""
        if not self._records:
            return None
        firsts = [r[0] for r in self._records.values()]
        return firsts[0].clone() if len(firsts) == 1 else torch.stack(firsts).min()

    def first(self) -> NonFinite | None:
        """The first non-finite term (one device-to-host copy), or None while every term was finite."""
        if not self._records:
            return None
        keys = list(self._records)
        head = torch.stack([t for k in keys for t in self._records[k][:2]]).tolist()
        found = [(head[2 * i], head[2 * i + 1], k) for i, k in enumerate(keys) if head[2 * i] != NO_STEP]
        if not found:
            return None
        step, epoch, names = min(found, key=lambda f: f[0])
        values = self._records[names][2].tolist()
        name, value = next(
            ((n, v) for n, v in zip(names, values) if not math.isfinite(v)), (names[0], values[0])
        )
        return NonFinite(name, value, step, epoch)
