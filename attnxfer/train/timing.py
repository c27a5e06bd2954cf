"""The one clock of every speed figure: calls timed in interleaved rounds, each calling every function once in
an order rotated each round (so a machine whose load drifts slows them alike), CUDA synchronised around each
call, medians reported; with each call's process CPU seconds, which other programs distort less.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

Name = TypeVar("Name", bound=Hashable)


@dataclass
class Timing:
    """Seconds per call of one function: ``times`` wall-clock, ``cpu_times`` the process's CPU seconds in the
    same calls."""

    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def spread(self) -> float:
        """Half the interquartile range over the median (0.05 = ±5 %): how far one round strays."""
        if len(self.times) < 4:
            return (max(self.times) - min(self.times)) / (2 * self.median)
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return (q3 - q1) / (2 * self.median)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(
    fns: Mapping[Name, Callable[[], Any]],
    *,
    device: torch.device | str | None = None,
    warmup: int = 1,
    repeats: int = 5,
) -> dict[Name, Timing]:
    """Time every function of ``fns`` in ``repeats`` rounds after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    out = {name: Timing() for name in names}
    for rounds in range(repeats):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            out[name].times.append(time.perf_counter() - wall)
            out[name].cpu_times.append(time.process_time() - cpu)
    return out
