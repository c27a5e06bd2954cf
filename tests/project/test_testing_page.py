"""docs/testing.md describes the fast lane by its share of the tests, not by counts that each new test makes
stale: the share it states is what pytest collects."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_the_fast_lane_holds_the_share_of_the_tests_the_page_states():
    """One collection (~20 s of CPU: every test module imported) gives both counts."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow and not slurm",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    fast, total = map(int, re.search(r"(\d+)/(\d+) tests collected", out).groups())
    low, high = SHARES[_stated()]
    assert low <= fast / total <= high, (
        f"the fast lane holds {fast} of {total} tests; docs/testing.md says {_stated()}"
    )
