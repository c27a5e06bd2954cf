"""Fixtures shared by test modules (plain builders live in tests/helpers.py)."""

import pytest
import torch
from helpers import peaked_teacher
from timm.models import save_for_hf


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


def pytest_configure(config):
    """Under xdist, hand out the groups in collection order (xdist's default sorts them by test count):
    the SLURM group, collected first, is the longest and must start first."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Work units for ``pytest -n 2 --dist loadgroup`` (the README's test command): every test on the loopback
    SLURM cluster goes to one group, so one cluster (a session fixture) serves them all on one worker while
    the other worker runs CPU tests during their waits; every other module is a group of its own, so its
    module-scoped fixtures (trained runs, exports) are built once, not once per worker. Without xdist the
    marks do nothing."""
    for item in items:
        if item.get_closest_marker("slurm") or "slurm_cluster" in getattr(item, "fixturenames", ()):
            group = "slurm"
        else:
            group = item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
