"""The heartbeat watchdog (`attnxfer.train.watchdog`): a silent peer ends the waiting rank with one line naming it.

The in-process cases run the watchdog's own threads against a real TCPStore with a recorded exit; the slow
ones are a real 2-process gloo group in which one rank stops itself with SIGSTOP, and the other, blocked in
an all-reduce, must exit with the watchdog's code and line instead of waiting for the collective's timeout;
continued, the stopped one must not take its own freeze for its peer's silence.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from attnxfer.train.distributed import init_distributed
from attnxfer.train.watchdog import (
    EXIT_CODE,
    SILENCE_LINE,
    HeartbeatWatchdog,
    beat_interval,
    collective_timeout,
)


def _store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _recorded_exit(codes: list[int], done: threading.Event):
    def exit(code: int) -> None:
        codes.append(code)
        done.set()

    return exit


def _fired(rank: int) -> list[int]:
    """A watchdog on ``rank`` of 2 whose peer never beats (the store, served by this process, answers), run
    until it fires: the exit codes it recorded."""
    codes, done = [], threading.Event()
    watchdog = HeartbeatWatchdog(
        _store(), rank=rank, world_size=2, timeout_s=1.0, exit=_recorded_exit(codes, done)
    )
    watchdog.start()
    try:
        assert done.wait(30), "the watchdog never fired"
    finally:
        watchdog.stop()
    return codes


def test_a_peer_that_never_beats_is_named_after_the_timeout(capfd):
    assert _fired(rank=0) == [EXIT_CODE]
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert SILENCE_LINE.search(line)
    assert line.startswith("rank 1 has not answered for ") and "dist.timeout=1" in line


def test_a_silent_store_host_is_named_as_such_whichever_clock_runs_out_first(capfd):
    """Rank 0 serves the store: its beats can go stale a tick before the store's calls do (here the store
    answers throughout and only rank 0's beats are missing); the line says what rank 0 serves either way."""
    assert _fired(rank=1) == [EXIT_CODE]
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("rank 0 has not answered for ") and "it serves the process group's store" in line


@pytest.mark.slow  # 10 s of waiting (little CPU): a loaded machine must not make a beat look late
def test_peers_that_beat_or_leave_cleanly_are_not_taken_for_a_hang():
    store, codes, done = _store(), [], threading.Event()
    ranks = [
        HeartbeatWatchdog(store, rank=r, world_size=2, timeout_s=2.0, exit=_recorded_exit(codes, done))
        for r in range(2)
    ]
    for w in ranks:
        w.start()
    try:
        assert not done.wait(5.0), codes  # two and a half timeouts of beating peers: nobody fires
        # rank 1 leaves the group; rank 0 goes on alone (a last save) for longer than the timeout
        ranks[1].stop()
        assert not done.wait(5.0), codes
    finally:
        ranks[0].stop()
    assert codes == []


def test_the_process_group_times_out_after_the_watchdog():
    for timeout in (1.0, 15.0, 300.0):
        assert collective_timeout(timeout) > timeout + 2 * beat_interval(timeout)


def _rank_that_may_stop(rank: int, port: int, timeout: float, stopped: int, log: str) -> None:
    """One rank of a 2-rank gloo group, forked (it shares the test's imports); output to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest replaced both)
    os.environ.pop("SUBMITIT_EXECUTOR", None)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("gloo", timeout=timeout)
    x = torch.ones(1)
    dist.all_reduce(x)  # both ranks joined and beating
    if rank == stopped:
        time.sleep(1.5)  # a few beats: the peer has learnt where this rank runs
        os.kill(os.getpid(), signal.SIGSTOP)
    try:
        dist.all_reduce(x)  # the other rank waits here for the stopped one
    except Exception as e:  # the stopped rank, continued after its peer left
        print(f"the all-reduce failed: {e}", flush=True)
        os._exit(3)
    print("the all-reduce returned", flush=True)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stopped", [1, 0], ids=["rank-1-stops", "rank-0-the-store-host-stops"])
def test_a_stopped_rank_ends_its_peer_with_one_line_naming_it(tmp_path, stopped):
    timeout, port = 2.0, _free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    fork = multiprocessing.get_context("fork")
    procs = [
        fork.Process(target=_rank_that_may_stop, args=(r, port, timeout, stopped, str(logs[r])))
        for r in range(2)
    ]
    try:
        for proc in procs:
            proc.start()
        waiting = procs[1 - stopped]
        # a hang guard, not a measurement: the collective's own timeout would end it too, without the line
        waiting.join(timeout=120)
        assert waiting.exitcode is not None, "the waiting rank is still waiting"
        # continued, the stopped rank wakes with every clock stale: it must not blame the peer for its own stop
        os.kill(procs[stopped].pid, signal.SIGCONT)
        continued = time.monotonic()
        procs[stopped].join(timeout=60)
        awake_s = time.monotonic() - continued
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL ends a stopped process too
                proc.join()
    err = logs[1 - stopped].read_text()
    assert waiting.exitcode == EXIT_CODE, err[-3000:]
    assert "the all-reduce returned" not in err
    lines = [line for line in err.splitlines() if SILENCE_LINE.search(line)]
    assert len(lines) == 1, err[-3000:]
    m = re.match(r"rank (\d+) on (\S+) \(pid (\d+)\) has not answered for (\d+) s", lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == stopped and int(m.group(3)) == procs[stopped].pid
    assert m.group(2) == (os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    assert int(m.group(4)) >= timeout and f"dist.timeout={timeout:g}" in lines[0]
    if stopped == 0:
        assert "it serves the process group's store" in lines[0]
    woken = logs[stopped].read_text()
    # the woken rank's all-reduce fails (its peer is gone); if that takes longer than the timeout on a loaded
    # machine, its watchdog may name the store's silence, but only one counted from the wake, never its own stop
    if procs[stopped].exitcode == EXIT_CODE:
        assert awake_s >= timeout, (awake_s, woken[-3000:])
    else:
        assert procs[stopped].exitcode == 3 and not SILENCE_LINE.search(woken), woken[-3000:]
