"""What varies between the loops one `Engine` runs, handed to it whole when it is built (`Drive`): the feed (a
batch as the objective takes it), the stop check and the random streams. Alone, the defaults; a study
(`attnxfer.train.lockstep`) shares the feed and the teacher's pass, reads the stop signal once a round
(`never_stop`), and swaps each student's own streams in around its steps.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .stop import stop_signal

Prepare = Callable[[torch.Tensor, "torch.Tensor | None", int], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class BatchPlace:
    """What a feed needs for one batch: its device, its seed (from its epoch and place in the data: the same in
    every run that reads it) and the objective's preparation (mixup)."""

    device: torch.device
    seed: int
    prepare: Prepare


#: a loaded batch as the objective takes it: ``(x, y, handover)``, ``handover`` the teacher's pass where the
#: feed computed one (None: the objective runs its teacher itself)
Fed = tuple[torch.Tensor, "torch.Tensor | None", Any]
Feed = Callable[[torch.Tensor, "torch.Tensor | None", BatchPlace], Fed]
#: the stop signal received (its number), or None: asked after every optimiser step
StopCheck = Callable[[], "int | None"]


def own_feed(x: torch.Tensor, y: torch.Tensor | None, place: BatchPlace) -> Fed:
    """The default feed: the batch on the device, prepared; no hand-over."""
    x = x.to(place.device, non_blocking=True)
    y = None if y is None else y.to(place.device, non_blocking=True)
    x, y = place.prepare(x, y, place.seed)
    return x, y, None


def never_stop() -> int | None:
    """A stop check for an engine whose driver reads the signal itself (a study, once a round for all)."""
    return None


class Streams(Protocol):
    """Whose random streams a step draws from: ``active(accelerator)`` puts them in place for a step."""

    def active(self, accelerator: Any = None) -> AbstractContextManager: ...


class ProcessStreams:
    """The default: the process's own streams, as they stand (nothing swapped)."""

    def active(self, accelerator: Any = None) -> AbstractContextManager:
        return contextlib.nullcontext()


@dataclass
class StudentStreams:
    """What a student keeps to itself between its turns: the global random streams and the accelerator's
    micro-step count (None: a loop without one, a convert study's stage 1). `start`-ed, or taken as they
    stand (`current`), right after its student is built."""

    python: Any = None
    numpy: Any = None
    torch_cpu: torch.Tensor | None = None
    torch_cuda: list[torch.Tensor] = field(default_factory=list)
    accumulation_step: int = 0

    @classmethod
    def current(cls, accelerator: Any = None) -> StudentStreams:
        """The streams as they stand now (after a student was built: its own from then on)."""
        streams = cls()
        streams.start(accelerator)
        return streams

    def start(self, accelerator: Any = None) -> None:
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch_cpu = torch.get_rng_state()
        self.torch_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        self.accumulation_step = accelerator.step if accelerator is not None else 0

    @contextlib.contextmanager
    def active(self, accelerator: Any = None) -> Iterator[None]:
        """The student's streams in place for the duration, saved back after (whatever happened)."""
        if self.torch_cpu is None:
            raise RuntimeError("StudentStreams.active before start: start them once the student is built")
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        if accelerator is not None:
            accelerator.step = self.accumulation_step
        try:
            yield
        finally:
            self.start(accelerator)


@dataclass(frozen=True)
class Drive:
    """How an engine is driven (see the module docstring); the defaults are a run trained alone."""

    feed: Feed = own_feed
    stop: StopCheck = stop_signal
    streams: Streams = field(default_factory=ProcessStreams)
