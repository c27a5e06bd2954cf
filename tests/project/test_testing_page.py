"""docs/testing.md describes the fast lane by its share of the tests, not by counts that each new test makes
stale: the share it states is what pytest collects."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import SUITE_COUNTS

from .doc_pages import ROOT

#: the share docs/testing.md states, as words, and the range of collected shares that makes it true
SHARES = {
    "about three in four": (0.65, 0.85),
    "about four in five": (0.75, 0.9),
    "about two in three": (0.58, 0.75),
}


def _stated() -> str:
    text = " ".join((ROOT / "docs" / "testing.md").read_text().split())
    found = [words for words in SHARES if f"The fast lane holds {words} of the tests" in text]
    assert len(found) == 1, "docs/testing.md should say which share of the tests the fast lane holds"
    return found[0]


def test_the_testing_page_states_a_share_a_test_checks():
    _stated()


def _suite_counts(config: pytest.Config) -> tuple[int, int]:
    """(fast-lane tests, all tests): this session's own collection when it collected the whole suite (as
    scripts/test.sh's does), else one collection in a new process (~20 s of CPU: every test module imported)."""
    if SUITE_COUNTS in config.stash:
        return config.stash[SUITE_COUNTS]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["-m", "not slow and not slurm"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    fast, total = map(int, re.search(r"(\d+)/(\d+) tests collected", out).groups())
    return fast, total


@pytest.mark.slow  # alone it collects the suite again (~20 s); in a whole-suite session, none
def test_the_fast_lane_holds_the_share_of_the_tests_the_page_states(request):
    fast, total = _suite_counts(request.config)
    low, high = SHARES[_stated()]
    assert low <= fast / total <= high, (
        f"the fast lane holds {fast} of {total} tests; docs/testing.md says {_stated()}"
    )
