"""Fixtures shared by test modules (plain builders live in tests/helpers.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch intra-op thread for a whole module, restored afterwards. Modules that run hundreds of tiny
    ops use it: on a busy 2-core machine a second intra-op thread makes each op wait for a core (see
    docs/benchmarks.md, zoo section). Use with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
