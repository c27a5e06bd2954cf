"""How the program ends after a multi-rank run (`attnxfer.launch.process_exit`): with its command's code and
its outputs, without interpreter finalization (the gloo teardown race)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import torchrun_launch

_ENDS_AFTER_A_GROUP = """
import atexit, logging, sys
from pathlib import Path

from attnxfer.launch.process_exit import end_program
from attnxfer.train.distributed import joined_process_group

out = Path(sys.argv[1])
logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
class Finalized:
    def __del__(self):
        print("interpreter finalization ran", flush=True)
kept_until_finalization = Finalized()
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
from concurrent.futures import ThreadPoolExecutor
idle = ThreadPoolExecutor(1)  # never shut down: its worker waits until threading's exit hook stops it
idle.submit(print, "", end="")
with joined_process_group("gloo") as info:
    pass
logging.getLogger("run").info("rank %d finished", info.rank)
print("stdout of rank", info.rank, end="")  # unflushed: end_program must flush it
end_program(3)
"""


@pytest.mark.slow
def test_after_a_multi_rank_run_the_program_ends_with_its_code_and_its_outputs_but_without_finalization(
    tmp_path,
):
    """The gloo teardown race (`attnxfer.launch.process_exit`): a rank that finished must exit with its
    command's code, after the atexit handlers and with its streams flushed, and skip interpreter
    finalization; a single process exits the ordinary way."""
    script = tmp_path / "ends.py"
    script.write_text(_ENDS_AFTER_A_GROUP)
    launch, env = torchrun_launch(ranks=2)
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    two_dir.mkdir()
    one_dir.mkdir()
    two = subprocess.run(
        [*launch, "--tee=3", str(script), str(two_dir)], capture_output=True, text=True, timeout=120, env=env
    )
    assert two.returncode != 0 and "exitcode  : 3" in two.stderr, two.stderr[-2000:]  # both ranks exit 3
    assert "stdout of rank 0" in two.stdout and "stdout of rank 1" in two.stdout
    assert "interpreter finalization ran" not in two.stdout
    assert (two_dir / "atexit.txt").read_text() == "ran"
    assert "rank 0 finished" in (two_dir / "log.txt").read_text()
    one = subprocess.run(
        [sys.executable, str(script), str(one_dir)], capture_output=True, text=True, timeout=120, env=env
    )
    assert one.returncode == 3 and "interpreter finalization ran" in one.stdout
    assert (one_dir / "atexit.txt").read_text() == "ran"
