"""Whether a process of this host is still alive: the one answer for everything that finds a folder or a
lock a process left behind and must tell a live owner from a dead one (the checkpoint store's temp and
trash folders, the run lock's holder, `attnxfer inspect`'s staging folders)."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while process ``pid`` of this host exists and has not exited. One this user may not signal
    (another user's) counts as alive; one that has exited but is not yet reaped by its parent (a zombie)
    does not: it will never finish what it started."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # the process's state letter (Linux /proc: R, S, D, Z, X, ...); unknown counts as alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
