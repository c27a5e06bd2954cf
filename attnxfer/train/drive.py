"""What varies between the loops one `Engine` runs, handed to it whole when it is built (`Drive`).

One engine trains a run alone (`attnxfer train`, pretrain, convert's stage 2) or as one student of a study
(`attnxfer.train.lockstep`). Three things differ, and each is a collaborator with one obvious default:

- the feed (`Feed`): how a loaded batch becomes what the objective takes. Alone, `own_feed` moves it to the
  device and prepares it (mixup); a study's `SharedFeed` does that once a batch for every student and adds the
  teacher's pass, computed once for all.
- the stop check (`StopCheck`): which stop signal, if any, the engine acts on after a step. Alone,
  `stop_signal` (SIGTERM on any rank); a study reads the signal once a round for every student, so its
  engines take `never_stop`.
- the random streams (`Streams`): whose python/numpy/torch streams a step draws from. Alone, the process's
  own (`ProcessStreams`); a study's student, its own `StudentStreams`, swapped in around each of its steps.

Nothing of an engine is replaced at run time: a study builds its engines with its `Drive`.
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
    """What a feed needs of the engine for one batch: where it goes, its seed (from the batch's epoch and place
    in the data: the same in every run that reads it) and the objective's preparation (mixup)."""

    device: torch.device
    seed: int
    prepare: Prepare


Fed = tuple[torch.Tensor, "torch.Tensor | None", Any]


class Feed(Protocol):
    """A loaded batch as the objective takes it: ``(x, y, handover)``, ``handover`` the teacher's pass for it
    where the feed computed one (None: the objective runs its teacher itself)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, place: BatchPlace) -> Fed: ...


def own_feed(x: torch.Tensor, y: torch.Tensor | None, place: BatchPlace) -> Fed:
    """The default feed: the batch on the device, prepared; no hand-over."""
    x = x.to(place.device, non_blocking=True)
    y = None if y is None else y.to(place.device, non_blocking=True)
    x, y = place.prepare(x, y, place.seed)
    return x, y, None


class StopCheck(Protocol):
    """The stop signal received (its number), or None: asked after every optimiser step."""

    def __call__(self) -> int | None: ...


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
    """What a student keeps to itself between its turns: the global random streams (python, numpy, torch CPU
    and CUDA) and the accelerator's micro-step count (gradient accumulation is counted per accelerator; a loop
    without one, a convert study's stage 1, passes None). Made empty and `start`-ed right after its student
    is built (from then on the streams are its own), or taken as they stand (`current`)."""

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
        """Take the streams as they stand now as this student's own."""
        self.python, self.numpy, self.torch_cpu = (
            random.getstate(),
            np.random.get_state(),
            torch.get_rng_state(),
        )
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
