"""Stopping a run cleanly on SIGTERM (``scancel``, a preemption, ``kill``; SLURM's SIGKILL follows
``KillWait`` later), Ctrl-C (SIGINT) or SIGUSR2 (a user's ``#SBATCH --signal=USR2@120``, submitit's USR_SIG):
while a loop runs, each only sets a flag, the loop saves the step it is at and raises `StopRequested` (exit
143, 130 or 140; a submitted job requeues). A second signal acts as if none was caught (a second Ctrl-C:
KeyboardInterrupt at once), and so does one that came with no step left to stop at, as the block ends (one
whose default ends the process: `SystemExit` with the signal's exit code, so the run's lock is released).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..speak import say
from .distributed import rank_and_world

#: what a cluster or a user sends to end a process politely
STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

#: marks a stop signal's handler that must not run mid-step (a submitted job's USR2 requeue): the loop holds the
#: signal, saves its step and raises `StopRequested`; the handler runs only where no loop catches
WAITS_FOR_A_STEP = "waits_for_a_step"

_received: list[int] = []  # signals caught since the loop started (signal handlers only append)
#: a block runs: one inside it (a fit inside auto's selection) leaves it the signals and the flag
_catching = False


#: `StopRequested`'s message in a line of text: signal, unit, step, total, checkpoint
STOPPED_LINE = re.compile(
    r"stopped by (SIG\w+) at (\w+) (\d+)(?: of (\d+))?; checkpoint saved(?: \((.*?)\))?(?=;|$)", re.MULTILINE
)


class StopRequested(Exception):
    """The loop stopped at a step boundary after a stop signal; its checkpoint of that step is saved. ``unit``:
    what a step of the loop is called (a search's checkpoints hold generations)."""

    def __init__(
        self, signum: int, step: int, checkpoint: str | None, total: int | None = None, unit: str = "step"
    ) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.signal_name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {self.signal_name} at {unit} {step}{f' of {total}' if total else ''}; checkpoint saved"
            + (f" ({checkpoint})" if checkpoint else "")
        )

    @classmethod
    def said_in(cls, text: str) -> StopRequested | None:
        """The stop whose message ``text`` holds (its last; a local job's log, read by ``submit --wait``), or None."""
        found = STOPPED_LINE.findall(text)
        if not found:
            return None
        name, unit, step, total, checkpoint = found[-1]
        return cls(signal.Signals[name], int(step), checkpoint or None, int(total) if total else None, unit)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (143 for SIGTERM)."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, `STOP_SIGNALS` set a flag instead of ending the process (main thread only); a handler
    installed before (a submitted job's watcher) still runs; an ignored one (SIGINT of ``cmd &``) stays ignored.
    SIGUSR2 is caught where its default would end the process unsaved, and where its handler (a submitted job's
    requeue) is marked `WAITS_FOR_A_STEP`: that one runs once the loop has saved its step (or as the block ends)."""
    global _catching
    if threading.current_thread() is not threading.main_thread() or _catching:
        yield
        return
    _received.clear()
    previous = {
        s: signal.getsignal(s)
        for s in STOP_SIGNALS
        if signal.getsignal(s) != signal.SIG_IGN
        and (
            s != signal.SIGUSR2
            or signal.getsignal(s) == signal.SIG_DFL
            or getattr(signal.getsignal(s), WAITS_FOR_A_STEP, False)
        )
    }

    held: list[int] = []  # caught and not passed to a handler: the loop stops on them, or they are sent again

    def handler(signum: int, frame: Any) -> None:
        before = previous[signum]
        waits = getattr(before, WAITS_FOR_A_STEP, False)
        if _received and (
            before in (signal.SIG_DFL, None) or waits
        ):  # asked twice: stop now, as if never caught
            signal.signal(signum, before if waits else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _received.append(signum)
        if (
            callable(before)
            and not waits
            and (before is not signal.default_int_handler or len(_received) > 1)
        ):
            held[:] = [s for s in held if s != signum]
            before(signum, frame)
        else:
            held.append(signum)

    for s in previous:
        signal.signal(s, handler)
    _catching = True
    try:
        yield
    finally:
        _catching = False
        for s, before in previous.items():
            signal.signal(s, before if before is not None else signal.SIG_DFL)
        _received.clear()
    if held:  # the block ended as usual (no StopRequested): a signal during its last step would be lost
        name = signal.Signals(held[0]).name
        then = (
            "its job requeues now"
            if getattr(previous[held[0]], WAITS_FOR_A_STEP, False)
            else "stopping now; re-run the same command to finish"
        )
        say(f"{name} came as the loop ended, its work saved: {then}")
        if previous[held[0]] in (signal.SIG_DFL, None):
            # the signal's default ends the process where it stands; so does this, but through the blocks around
            # the loop, which release what the run holds (its folder's lock: else the next run takes it over)
            raise SystemExit(128 + held[0])
        os.kill(os.getpid(), held[0])


def stop_signal() -> int | None:
    """The stop signal any rank caught, or None: a collective, so every rank stops (and saves) at the same
    step. It travels through a gloo group on the CPU, so a GPU run pays no device sync for it."""
    mine = _received[0] if _received else 0
    if rank_and_world()[1] > 1:  # one process alone reads its own flag
        flag = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group())
        mine = int(flag.item())
    return mine or None


_gloo_group: tuple[Any, Any] | None = None  # (the default group it was made for, the gloo group)


def _cpu_group() -> Any:
    """None (the default group) when it is gloo; else one gloo group of all ranks, created by every rank
    at its first step (``new_group`` is collective: every rank gets here in the same order)."""
    global _gloo_group
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _gloo_group is None or _gloo_group[0] is not world:  # a new process group since: a new side group
        _gloo_group = (world, dist.new_group(backend="gloo"))
    return _gloo_group[1]
