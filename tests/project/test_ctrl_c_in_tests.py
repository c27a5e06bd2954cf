"""A test that sends Ctrl-C (SIGINT) to a child starts that child with `helpers.popen_interruptible` (a
command) or `helpers.fork_cli` (the CLI's own `main` in a forked child).

Why a rule: pytest started as a background job of a script (``cmd &``, nohup, some CI runners) runs with
SIGINT ignored, and a child started with plain `subprocess.Popen` inherits that, so the test's Ctrl-C does
nothing and the test fails only when started that way. Both helpers give the child a foreground command's
Ctrl-C (SIGINT's default action; Python's KeyboardInterrupt handler).
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SIGNAL = "SIG" + "INT"  # spelt in two parts so that this file's own text does not match
HELPERS = ("popen_interruptible", "fork_cli")


def test_every_test_file_that_sends_sigint_starts_its_child_with_the_helper():
    senders = [
        p
        for p in sorted(TESTS.rglob("*.py"))
        if p.name != "helpers.py" and f"signal.{SIGNAL}" in p.read_text(encoding="utf-8")
    ]
    assert len(senders) >= 2, senders  # the run-lock and the Ctrl-C-before-a-checkpoint tests at least
    without = [
        str(p.relative_to(TESTS))
        for p in senders
        if not any(helper in p.read_text(encoding="utf-8") for helper in HELPERS)
    ]
    assert without == [], (
        f"send {SIGNAL} only to children started with helpers.{' or '.join(HELPERS)}: {without}"
    )
