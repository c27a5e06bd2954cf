"""Whether a process of this host is still alive: the one answer wherever a folder or lock a process left
behind must be told from a live owner's (store temp/trash folders, the run lock, export staging)."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while process ``pid`` of this host exists and has not exited: another user's counts as alive, a
    zombie (exited, not yet reaped) does not, as it will never finish what it started."""
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
