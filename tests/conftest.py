"""Fixtures shared by test modules (plain builders live in tests/helpers.py)."""

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import SUITE_COUNTS, peaked_teacher, train_one_block_run
from timm.models import save_for_hf

from attnxfer.data import registry as datasets
from attnxfer.launch import cli
from attnxfer.models.attention import registry as attentions
from attnxfer.plugins import load_entry_points
from attnxfer.transfer import comparisons


@pytest.fixture(scope="session", autouse=True)
def scratch_in_pytests_own_folder(tmp_path_factory):
    """TMPDIR for this session and its children under pytest's own temporary folder, which pytest prunes (the
    last three sessions kept): what a killed child leaves there (wandb's tmp*wandb-media, torchrun's
    torchelastic_* logs) does not pile up in /tmp. The SLURM cluster's folder stays in /tmp: munged, run as
    user munge, cannot reach into pytest's private folders."""
    scratch = str(tmp_path_factory.mktemp("scratch"))
    was = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    yield
    tempfile.tempdir = None
    if was is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = was


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch intra-op thread for a whole module, restored afterwards. Modules that run hundreds of tiny
    ops use it: on a busy 2-core machine a second intra-op thread makes each op wait for a core (see
    docs/benchmarks.md, zoo section). Use with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inductor_in_process():
    """Inductor compiles in this process for a whole module (``compile_threads=1``), restored afterwards.
    Modules that compile with inductor on the CPU use it: by default the first compile starts a pool of
    compile subprocesses (each imports torch; the pool serves Triton, not the C++ kernels compiled here),
    ~5 s of CPU for nothing on a 2-core machine. The code generated and compiled is the same.
    Use with ``pytestmark = pytest.mark.usefixtures("inductor_in_process")``."""
    import torch._inductor.config as inductor

    with inductor.patch(compile_threads=1):
        yield


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


@pytest.fixture
def registries_kept():
    """The dataset, attention and comparison-loss registries put back as they were after the test: what it
    (or a docs example it runs) registers does not reach the next test in the same process."""
    registries = (
        datasets._DATASETS,
        attentions._ATTENTIONS,
        attentions._PARAMETRIC,
        comparisons.COMPARISON_LOSSES,
    )
    held = [dict(r) for r in registries]
    yield
    for registry, was in zip(registries, held):
        registry.clear()
        registry.update(was)


@pytest.fixture
def install_package(tmp_path, monkeypatch, registries_kept):
    """``install_package(files, entry_points)``: a distribution ``labpkg`` installed as pip installs one, for
    this test alone: ``files`` ({path: text}) in a site folder (returned) on sys.path beside ``labpkg-0.1.dist-info``,
    whose entry_points.txt is ``entry_points``. attnxfer reads the entry points afresh, and afterwards forgets
    the modules and what they registered."""
    site = tmp_path / "site"

    def install(files: dict[str, str], entry_points: str) -> Path:
        for path, text in files.items():
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            (site / path).write_text(text, encoding="utf-8")
        dist = site / "labpkg-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: labpkg\nVersion: 0.1\n", encoding="utf-8"
        )
        (dist / "entry_points.txt").write_text(entry_points, encoding="utf-8")
        monkeypatch.syspath_prepend(str(site))
        load_entry_points.cache_clear()
        return site

    yield install
    load_entry_points.cache_clear()
    for name in [m for m in sys.modules if m.split(".")[0] == "labpkg"]:
        del sys.modules[name]


# ---- the suite's own counts: tests/project/test_testing_page.py reads them instead of collecting again ----


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect any
def pytest_collection_modifyitems(session, config, items):
    """When this session collected every test file, stash (fast-lane tests, all tests) in SUITE_COUNTS."""
    collected = {Path(str(item.path)) for item in items}
    if set(Path(__file__).parent.rglob("test_*.py")) <= collected:
        fast = [i for i in items if not i.get_closest_marker("slow") and not i.get_closest_marker("slurm")]
        config.stash[SUITE_COUNTS] = (len(fast), len(items))


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
    return t.user + t.system + t.children_user + t.children_system + _fork_server_cpu_seconds()


def _fork_server_cpu_seconds() -> float:
    """CPU of `helpers.fork_cli`'s fork server and the children it has reaped: they are not this process's
    children, so ``os.times`` never counts them (a test of forked runs read ~0 s). The server's own start-up
    lands on the first test that starts it. 0 while none runs (or where /proc is not Linux's)."""
    import multiprocessing.forkserver

    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() if pid else []
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), counted here from field 3 (after the name)
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK") if fields else 0.0


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
