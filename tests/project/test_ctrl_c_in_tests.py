"""A test that sends Ctrl-C (SIGINT) to a child starts that child with `helpers.popen_interruptible`.

Why a rule: pytest started as a background job of a script (``cmd &``, nohup, some CI runners) runs with
SIGINT ignored, and a child started with plain `subprocess.Popen` inherits that, so the test's Ctrl-C does
nothing and the test fails only when started that way. The helper gives the child SIGINT's default action.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SIGNAL = "SIG" + "INT"  # spelt in two parts so that this file's own text does not match
HELPER = "popen_interruptible"


def test_every_test_file_that_sends_sigint_starts_its_child_with_the_helper():
    senders = [
        p
        for p in sorted(TESTS.rglob("*.py"))
        if p.name != "helpers.py" and f"signal.{SIGNAL}" in p.read_text(encoding="utf-8")
    ]
    assert len(senders) >= 2, senders  # the run-lock and the Ctrl-C-before-a-checkpoint tests at least
    without = [str(p.relative_to(TESTS)) for p in senders if HELPER not in p.read_text(encoding="utf-8")]
    assert without == [], f"send {SIGNAL} only to children started with helpers.{HELPER}: {without}"
