"""One step of a SLURM job and a run dir's lock: ``hold RUN`` holds it (and sleeps), ``die RUN`` is SIGKILLed
holding it (its lock and fresh heartbeat left behind), ``judge RUN`` tries to take it and prints what came of it.
The holder's lock names another host: every node of the loopback cluster is this host, whose pid check would
otherwise decide."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from attnxfer.checkpoints.run_lock import RunDirInUseError, run_lock
from attnxfer.run_layout import LOCK_NAME

if __name__ == "__main__":
    what, run = sys.argv[1], Path(sys.argv[2])
    if what == "judge":
        try:
            with run_lock(run, "train"):
                print("took the lock", flush=True)
        except RunDirInUseError as e:
            print(f"refused: {e}", flush=True)
        sys.exit(0)
    with run_lock(run, "train"):
        lock = run / LOCK_NAME
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "node-elsewhere"}))
        if what == "hold":
            (run.parent / "holding").touch()
            time.sleep(300)
        os.kill(os.getpid(), signal.SIGKILL)
