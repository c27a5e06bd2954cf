"""A study's loop: K engines, one stream of batches, one teacher pass per batch, each student in turn.

Each student is an ordinary `Engine`; the study advances their `Engine.steps` one optimiser step each per
round. The loaded batch, its preparation and the teacher's pass are shared (`SharedBatches`, `SharedFeed`);
each student's random streams and accumulation count are its own (`StudentStreams`), so a student computes
exactly what it computes trained alone. A step is committed (``on_saved``, which may then prune) once every
student still training has saved it, so a kill at any instant leaves a step that every student has.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..speak import say, speaking_for
from .drive import BatchPlace, Fed, own_feed
from .engine import Engine, TrainResult
from .stop import StopRequested, stop_on_signals, stop_signal
from .terms import NonFiniteLossError


class SharedBatches:
    """One loader read once for several engines: each iterates its own view and gets the very batch objects
    the others get, one pass of the loader per epoch; a batch is kept until every view still reading took it."""

    def __init__(self, loader: Any, sampler: Any) -> None:
        self.loader, self.sampler = loader, sampler
        self._views: list[_View] = []
        self._key: tuple[int, int] | None = None
        self._source: Iterator[Any] | None = None
        self._buffer: collections.deque = collections.deque()
        self._taken = 0  # how many batches of this pass the buffer has dropped
        self.seconds = 0.0  # spent loading batches (for every member at once)

    def view(self) -> _View:
        view = _View(self)
        self._views.append(view)
        return view

    def leave(self, view: _View) -> None:
        """A view that reads no more (its student stopped): the others' batches no longer wait for it."""
        if view in self._views:
            self._views.remove(view)
        self._trim()

    def _start(self, view: _View) -> None:
        """A view starts reading a pass (an epoch from a position): the first to start it opens the loader."""
        key = (getattr(self.sampler, "epoch", 0), getattr(self.sampler, "position", 0))
        if key != self._key or self._source is None:
            self._key, self._source = key, iter(self.loader)
            self._buffer.clear()
            self._taken = 0
        view.index, view.key = 0, key

    def _next(self, view: _View) -> Any:
        if view.key != self._key:  # another pass started: this view's epoch is over
            raise StopIteration
        while view.index - self._taken >= len(self._buffer):
            start = time.monotonic()
            try:
                self._buffer.append(next(self._source))
            finally:
                self.seconds += time.monotonic() - start
        batch = self._buffer[view.index - self._taken]
        view.index += 1
        self._trim()
        return batch

    def _trim(self) -> None:
        """Drop the batches every view has taken (a view that has not started this pass yet needs them all)."""
        low = min(
            (v.index if v.key == self._key else 0 for v in self._views),
            default=self._taken + len(self._buffer),
        )
        while self._taken < low and self._buffer:
            self._buffer.popleft()
            self._taken += 1


class _View:
    """One engine's loader: the shared batches, in the loader's order (len and batch size as the loader's)."""

    def __init__(self, shared: SharedBatches) -> None:
        self.shared = shared
        self.index, self.key = 0, None

    def __iter__(self) -> Iterator[Any]:
        self.shared._start(self)
        while True:
            try:
                yield self.shared._next(self)
            except StopIteration:
                return

    def __len__(self) -> int:
        return len(self.shared.loader)

    @property
    def batch_size(self) -> int:
        return self.shared.loader.batch_size

    @property
    def dataset(self) -> Any:
        return self.shared.loader.dataset


class SharedFeed:
    """The study's engines' feed: the first engine to feed a batch prepares it (`own_feed`) and computes the
    teacher's pass for every student at once; the others take the same tensors (keyed by the batch object)."""

    def __init__(self, teacher_pass: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.teacher_pass = teacher_pass
        self._raw: Any = None  # the loaded batch fed last, kept so that no other batch can take its id
        self._fed: Fed | None = None
        self.seconds = 0.0  # spent preparing batches and in the teacher's pass (for every member at once)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, place: BatchPlace) -> Fed:
        if x is not self._raw:
            start = time.monotonic()
            self._raw = self._fed = None  # the previous batch's tensors go before this one's are made
            # a copy where the move keeps the loaded tensor (the run's device is the loader's): timm's Mixup
            # and CutMix mix in place, and a batch fed again (each student of a study with accumulation steps
            # takes its micro-batches in turn) would be mixed twice
            moved = x.to(place.device, non_blocking=True)
            x_fed, y_fed, _ = own_feed(moved.clone() if moved is x else moved, y, place)
            handover = None if self.teacher_pass is None else self.teacher_pass(x_fed)
            self._raw, self._fed = x, (x_fed, y_fed, handover)
            self.seconds += time.monotonic() - start
        return self._fed


@dataclass
class Member:
    """One student in the loop: its name, its engine and its view of the shared batches."""

    name: str
    engine: Engine
    view: _View | None = None
    steps: Iterator[int] | None = None
    stopped: str | None = None  # why it stopped early (a non-finite loss), None while it trains or finished
    done: bool = False  # it trained its last step
    seconds: float = 0.0  # its own time: its turns less what it loaded and fed for every member


class Lockstep:
    """Advances every member's `Engine.steps` one optimiser step per round (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[Member],
        batches: SharedBatches,
        feed: SharedFeed,
        *,
        on_saved: Callable[[int, list[Member], float], str | None],
        shared_before: float = 0.0,
    ) -> None:
        self.members, self.batches, self.feed = list(members), batches, feed
        self.on_saved = on_saved
        self.shared_before = shared_before  # what earlier attempts of the study spent once for all
        self._committed: int | None = None
        self._committed_at: str | None = None  # the committed step's checkpoint (``on_saved``'s answer)

    def run(self) -> list[TrainResult | None]:
        """Train every member to its end (or until it stops); results in the members' order (None: stopped)."""
        with stop_on_signals():
            while self.round():
                signum = stop_signal()
                if signum:
                    self._stop(signum, self.active)
        return [None if m.stopped else m.engine.result(m.seconds) for m in self.members]

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members if m.stopped is None and not m.done]

    def round(self) -> int:
        """One optimiser step of every member still training, in turn, then commit what all have saved;
        returns how many still train."""
        for m in self.active:
            if m.steps is None:
                m.steps = m.engine.steps()
            m.done = not self._turn(m)
        self._commit()
        return len(self.active)

    @property
    def shared_seconds(self) -> float:
        """Time spent loading and feeding batches (and the teacher's pass), once for every member."""
        return self.shared_before + self.batches.seconds + self.feed.seconds

    def _turn(self, m: Member) -> bool:
        """One optimiser step of ``m`` (its engine steps under its own streams); False when it has no more to do."""
        start, shared = time.monotonic(), self.shared_seconds
        try:
            with speaking_for(m.name):
                next(m.steps)
            return True
        except StopIteration:
            pass
        except NonFiniteLossError as e:
            m.stopped = str(e)
            m.engine.metrics.close()
            say(f"{m.name}: stopped: {str(e).rstrip('.')}; the others go on")
        finally:
            m.seconds += time.monotonic() - start - (self.shared_seconds - shared)
        self.batches.leave(m.view)  # it reads no more
        return False

    def _commit(self) -> None:
        """Commit the newest step every member still training has saved (once each)."""
        training = [m for m in self.members if m.stopped is None]
        saved = [m.engine.saved_step for m in training]
        if not training or any(s is None for s in saved):
            return
        step = min(saved)
        if step != self._committed:
            self._committed = step
            self._committed_at = self.on_saved(step, training, self.shared_seconds)

    def _stop(self, signum: int, active: list[Member]) -> None:
        """A stop signal: every member still training saves this step, the study commits it, then stops."""
        for m in active:
            with m.engine.own_streams(), speaking_for(m.name):  # a save gathers the student's own RNG states
                m.engine.save_unless_saved()
        self._commit()
        # named: the study's checkpoint (what a re-run goes on from), not the first student's
        engine = active[0].engine
        stop = StopRequested(signum, engine.step, self._committed_at, engine.total_steps)
        say(f"study: {stop} (every student)")
        for m in self.members:
            m.engine.metrics.close()
        raise stop
