"""Ending the ``attnxfer`` program, with the exit code its command returned, once every output is written.

After a run in a gloo process group, CPython's interpreter finalization can abort the process: torch's
C++ worker threads of the (already destroyed) group are torn down concurrently with the interpreter, and
a rank that finished and wrote everything exits with SIGABRT ("terminate called without an active
exception") or SIGSEGV, in about one run in fifteen on a loaded machine (pytorch/pytorch#179291 discusses
the race). torchrun then reports the job as failed, and may restart it. So after such a run the program
does everything Python's own exit does that has observable effects — threading's exit hooks and the
wait for non-daemon threads, the ``atexit`` handlers (logging's flush among them), flushing the standard
streams — and then ends with
``os._exit``, skipping only the finalization (module teardown and C++ static destructors).

Single-process runs exit the ordinary way.
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
