"""`process_alive`, the one liveness test of the checkpoint store, the run lock and inspect's staging
folders: checked on real processes of this machine (running, exited and reaped, exited but not reaped)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from attnxfer.checkpoints.processes import process_alive


def test_a_running_process_is_alive_and_a_reaped_one_is_not():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_alive(os.getpid()) and process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)  # reaped: the pid names no process (pids are not reused this fast)


def test_a_zombie_is_not_alive():
    """A child that exited but was not reaped still answers signal 0; it will never finish what it began."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, 0)  # still there as a zombie: signal 0 alone would call it alive
        assert not process_alive(pid)
    finally:
        os.waitpid(pid, 0)
