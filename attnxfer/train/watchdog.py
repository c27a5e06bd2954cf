"""A heartbeat between the ranks of a process group: a stopped or hung rank ends the job in bounded time,
with one line that names it (a collective's own timeout says "timed out", not who).

Every rank's background thread adds to its own counter in the group's store every few seconds and reads the
next rank's (a ring); a peer silent for ``timeout`` seconds is named on stderr and this process exits
(`EXIT_CODE`), for ``srun --kill-on-bad-exit`` or torchrun's agent to end the others. A thread beats, not the
loop, so long phases of the main thread (a teacher loading, a checkpoint written) never look like a hang.
Store calls may block while the store's host is stopped, so a second thread, with no I/O, judges the silence.
Nothing is saved on the way out: the last checkpoint, written atomically, stays the one to resume from.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from ..speak import debug, warn

#: how a process that the watchdog ends exits: timeout(1)'s "timed out"
EXIT_CODE = 124

#: the watchdog's one line, as `attnxfer submit --wait` finds it in a rank's log
SILENCE_LINE = re.compile(r"(?:rank \d+|the process group's store) .*has not answered for .*: stopping")

#: a counter value no beat reaches: the rank left the group cleanly (its silence from then on is expected)
_LEFT = 1 << 60


def beat_interval(timeout_s: float) -> float:
    """Seconds between two beats: a fifth of the timeout, between half a second and five seconds."""
    return min(5.0, max(0.5, timeout_s / 5))


def collective_timeout(timeout_s: float) -> float:
    """The process group's timeout for a watchdog bound of ``timeout_s``: two beats and five seconds later,
    so that a stopped peer is named by the watchdog before a collective's timeout reports it without a name."""
    return timeout_s + 2 * beat_interval(timeout_s) + 5.0


class HeartbeatWatchdog:
    """Beats for this rank in ``store`` (a clone of it: a connection of its own) and ends this process when the
    watched peer (or the store) falls silent. ``store_host``: the rank that serves the store (None: torchrun's
    agent does). ``exit``: what ends the process (tests pass another)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout_s: float,
        store_host: int | None = 0,
        store_address: str = "",
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        if world_size < 2:
            raise ValueError("a watchdog needs at least two ranks")
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.peer = (rank + 1) % world_size
        self.store_host, self.store_address = store_host, store_address
        self.interval = beat_interval(self.timeout_s)
        self._store = store
        self._exit = exit
        self._stopping = threading.Event()
        now = time.monotonic()
        # written by the beating thread, read by the judging one (plain attribute stores: atomic under the GIL)
        self._last_exchange = now  # the store last answered
        self._peer_value = -1
        self._peer_moved = now  # the peer's counter last changed
        self._peer_left = False
        self._who: dict[int, str] = {}
        self._threads = [
            threading.Thread(target=self._beat, name=f"attnxfer-heartbeat-{rank}", daemon=True),
            threading.Thread(target=self._judge, name=f"attnxfer-watchdog-{rank}", daemon=True),
        ]

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> HeartbeatWatchdog:
        """Say where this rank runs (in the caller's thread: the store has just answered the rendezvous),
        then beat and judge in the background."""
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # as the scheduler names it
        self._store.set(self._key("who", self.rank), f"{node} (pid {os.getpid()})")
        for thread in self._threads:
            thread.start()
        debug(
            f"watchdog: rank {self.rank} watches rank {self.peer} (silent for {self.timeout_s:g} s: stop)",
            all_ranks=True,
        )
        return self

    def stop(self) -> None:
        """This rank leaves cleanly: its peers stop expecting beats; waits a little for the last one."""
        self._stopping.set()
        self._threads[0].join(timeout=2 * self.interval)

    # ---- the beating thread (store I/O, may block while the store's host is stopped) -------------
    def _key(self, what: str, rank: int) -> str:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's agent keeps its store
        return f"attnxfer_watchdog/{restart}/{what}/{rank}"

    def _beat(self) -> None:
        store = None
        while not self._stopping.is_set():
            try:
                if store is None:  # a connection of its own (clone: torch >= 2.6)
                    store = self._store.clone() if hasattr(self._store, "clone") else self._store
                store.add(self._key("beat", self.rank), 1)
                value = store.add(self._key("beat", self.peer), 0)
                for rank in {self.peer, self.store_host} - {None, *self._who}:  # where they run, once written
                    if store.check([self._key("who", rank)]):
                        self._who[rank] = store.get(self._key("who", rank)).decode()
            except Exception as e:  # the store's host is gone or restarting: the judge counts the silence
                debug(f"watchdog: store call failed: {e}", all_ranks=True)
                store = None
            else:
                now = time.monotonic()
                if value != self._peer_value:
                    self._peer_value, self._peer_moved = value, now
                self._peer_left = value >= _LEFT
                self._last_exchange = now
            self._stopping.wait(self.interval)
        if store is not None:
            with contextlib.suppress(Exception):
                store.add(self._key("beat", self.rank), _LEFT)

    # ---- the judging thread (no I/O) ------------------------------------------------------------
    def _judge(self) -> None:
        """Every half beat: a silence longer than the timeout stops this process. Silences are counted from
        this process's own last freeze at the earliest: a process that was itself stopped (or starved of
        CPU) for a while wakes up with every clock stale, and must not blame its peers for it."""
        awake_since = last_tick = time.monotonic()
        note = "; it serves the process group's store" if self.store_host is not None else ""
        while not self._stopping.wait(self.interval / 2):
            if self._peer_left:
                return  # the job is ending; the process group's timeout still bounds what is left
            now = time.monotonic()
            if now - last_tick > 2 * self.interval:
                awake_since = now
            last_tick = now
            store_silent = now - max(self._last_exchange, awake_since)
            if store_silent > self.timeout_s:
                self._stop_process(self._store_name(), store_silent, note)
            peer_silent = now - max(self._peer_moved, awake_since)
            if peer_silent > self.timeout_s:  # the peer's beats may go stale a tick before the store's calls
                self._stop_process(
                    self._rank_name(self.peer), peer_silent, note if self.peer == self.store_host else ""
                )

    def _rank_name(self, rank: int) -> str:
        where = self._who.get(rank)
        return f"rank {rank} on {where}" if where else f"rank {rank}"

    def _store_name(self) -> str:
        if self.store_host is None:
            return f"the process group's store{' at ' + self.store_address if self.store_address else ''}"
        if self.store_host not in self._who and self.store_address:  # its host, from the store's address
            return f"rank {self.store_host} on {self.store_address.rsplit(':', 1)[0]}"
        return self._rank_name(self.store_host)

    def _stop_process(self, who: str, silent_s: float, note: str = "") -> None:
        """One line, flushed, then the process ends: no collective, nothing saved."""
        if self._stopping.is_set():
            return
        line = (
            f"{who} has not answered for {silent_s:.0f} s (stopped or hung{note}; dist.timeout={self.timeout_s:g}): "
            "stopping"
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):
            warn(line, all_ranks=True)
        self._exit(EXIT_CODE)
        self._stopping.set()  # an ``exit`` that returns (a test's): fire once


def start_watchdog(timeout_s: float) -> HeartbeatWatchdog | None:
    """A started watchdog for the joined group (None for a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    store = base = dist.distributed_c10d._get_default_store()
    while isinstance(base, dist.PrefixStore):  # the TCP store under the group's prefixes: its address
        base = base.underlying_store
    address = f"{base.host}:{base.port}" if isinstance(base, dist.TCPStore) else ""
    # None: torchrun's agent serves it
    host = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
    return HeartbeatWatchdog(
        store, dist.get_rank(), dist.get_world_size(), timeout_s, store_host=host, store_address=address
    ).start()
