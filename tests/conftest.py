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
