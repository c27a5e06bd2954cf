"""Fixtures shared by test modules (plain builders live in tests/helpers.py)."""

import os
import time

import pytest
import torch
from helpers import peaked_teacher, train_one_block_run
from timm.models import save_for_hf

from attnxfer.launch import cli


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch intra-op thread for a whole module, restored afterwards. Modules that run hundreds of tiny
    ops use it: on a busy 2-core machine a second intra-op thread makes each op wait for a core (see
    docs/benchmarks.md, zoo section). Use with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny peaked ViT teacher (depth 2, qkv bias, plain timm) saved in timm's format, once per session:
    ``teacher.spec=local-dir:<this>`` for the convert, search, SIGTERM and SLURM tests. Read-only: a test
    that changes a teacher makes its own."""
    folder = tmp_path_factory.mktemp("tiny-teacher")
    save_for_hf(peaked_teacher(depth=2, qkv_bias=True, plain_timm=True), folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished 4-step run of `ONE_BLOCK_RUN` (tests/helpers.py), once per session: the run that eval,
    export, the CLI's refusals and the resume checks are given. Read-only: a module whose tests write into
    it (scores, more steps) trains its own, a module-scoped `trained` (tests/analysis/test_eval.py)."""
    return train_one_block_run(tmp_path_factory)


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """`trained` exported, once per session: a micro ViT teacher, ``teacher.spec=local-dir:<this>``. Read-only."""
    out = tmp_path_factory.mktemp("exp") / "teacher"
    assert cli.main(["export", str(trained), str(out)]) == 0
    return out


# ---- opt-in CPU-time report: `pytest --cpu-durations=N` ------------------------------------------------
# Wall times swing 3-8x when the 2-core machine is shared; process CPU time (this process plus the
# subprocesses it waited for: CLI runs, torchrun) barely moves, so the fast-lane budget is kept in CPU
# seconds. A test's CPU can exceed its wall time (two intra-op threads) and misses time spent sleeping.


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-durations",
        type=int,
        default=None,
        metavar="N",
        help="report the N tests with the most CPU time (setup+call+teardown, children included; 0: all)",
    )


def pytest_configure(config):
    if config.getoption("cpu_durations") is not None and getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(
            "--cpu-durations counts in one process: add -n 0 (scripts/test.sh runs two workers)"
        )


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.config.getoption("cpu_durations") is None:
        yield
        return
    cpu, wall = _cpu_seconds(), time.perf_counter()
    yield
    item.config.stash.setdefault(_CPU_KEY, []).append(
        (_cpu_seconds() - cpu, time.perf_counter() - wall, item.nodeid)
    )


_CPU_KEY = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("cpu_durations")
    rows = config.stash.get(_CPU_KEY, [])
    if n is None or not rows:
        return
    rows.sort(reverse=True)
    tr = terminalreporter
    tr.write_sep("=", f"CPU time per test ({'all' if n == 0 else f'top {n}'})")
    for cpu, wall, nodeid in rows if n == 0 else rows[:n]:
        tr.write_line(f"{cpu:8.2f}s cpu {wall:8.2f}s wall  {nodeid}")
    cpu_total = sum(r[0] for r in rows)
    wall_total = sum(r[1] for r in rows)
    tr.write_line(
        f"total: {cpu_total:.1f}s cpu, {wall_total:.1f}s wall, {len(rows)} tests (load {os.getloadavg()[0]:.1f})"
    )
