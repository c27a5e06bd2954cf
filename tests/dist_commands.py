"""Run by tests under torchrun: several ``attnxfer`` commands one after the other in one launch, so that the tests
they serve pay one torchrun start (a launcher and a fresh torch import a rank) instead of one each.

``python dist_commands.py OUT JSON``: JSON is a list of argv lists. This rank joins the launch's process group
first and keeps it across the commands (as a submitted task that initialises it before `main`; each command's
own `joined_process_group` then leaves it open); command i's stdout and stderr go to OUT/i.rank<R>.out and
.err, its exit code into OUT/i.rank<R>.code. The launch exits non-zero if any command did."""

import contextlib
import json
import os
import sys
from pathlib import Path

from attnxfer.launch.cli import main
from attnxfer.launch.process_exit import end_program
from attnxfer.train.distributed import backend_for, barrier, cleanup_distributed, init_distributed

out, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
init_distributed(backend_for("cpu"))
rank, worst = os.environ["RANK"], 0
for i, argv in enumerate(commands):
    with (
        open(out / f"{i}.rank{rank}.out", "w") as stdout,
        open(out / f"{i}.rank{rank}.err", "w") as stderr,
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        code = main(argv)
    (out / f"{i}.rank{rank}.code").write_text(str(code))
    worst = worst or code
barrier()
cleanup_distributed()
end_program(worst)
