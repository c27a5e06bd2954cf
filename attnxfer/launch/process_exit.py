"""Ending the ``attnxfer`` program once every output is written. After a run in a gloo process group,
interpreter finalization can abort a rank that finished (SIGABRT or SIGSEGV as torch's C++ threads are torn
down, about one run in fifteen on a loaded machine; pytorch/pytorch#179291), and torchrun reports a failure.
So such a run does what Python's exit does that is observable (threading's exit hooks, atexit handlers,
flushing the streams) and then ``os._exit``; single-process runs exit the ordinary way.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def end_program(code: int) -> NoReturn:
    """Exit with ``code``; after a multi-process run, without interpreter finalization (module docstring)."""
    # finalization is skipped only where this process created a process group of several ranks (read without
    # importing torch when no run was started)
    distributed = sys.modules.get("attnxfer.train.distributed")
    if distributed is None or not distributed.joined_a_process_group():
        sys.exit(code)
    # What the interpreter does first at exit, in its order: threading's own exit hooks (they stop idle
    # ThreadPoolExecutor workers, which a plain join would wait for forever), joining the non-daemon
    # threads, then the atexit handlers (logging.shutdown among them).
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to write
            stream.flush()
    os._exit(code)
