"""attnxfer.speak: results on stdout, warnings on stderr, each line once, and only the main rank speaks unless
a line says it is every rank's."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

from attnxfer.config.renamed import RenamedKeyWarning
from attnxfer.speak import is_main, progress, quiet, rank, say, speaking_for, warn, warnings_as_lines

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter (its own logging state and rank) running ``code`` against this checkout."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "WORLD_SIZE")}
    clean.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=clean, timeout=60
    )


SAY_BOTH = """
    from attnxfer.speak import say, warn
    say("everyone hears the main rank")
    say("rank line", all_ranks=True)
    warn("rank trouble", all_ranks=True)
    warn("main-rank warning")
"""


def test_rank_1_drops_main_rank_lines_and_keeps_all_ranks_lines():
    done = _run(SAY_BOTH, RANK="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "rank line\n"
    assert done.stderr == "rank trouble\n"


def test_rank_0_says_everything_once_on_its_stream():
    done = _run(SAY_BOTH, RANK="0")
    assert done.stdout == "everyone hears the main rank\nrank line\n"
    assert done.stderr == "rank trouble\nmain-rank warning\n"


def test_slurm_procid_is_the_rank_when_no_launcher_set_rank():
    done = _run(SAY_BOTH, SLURM_PROCID="2")
    assert done.stdout == "rank line\n"


def test_a_users_root_handler_does_not_print_the_line_twice():
    """basicConfig puts a handler on the root logger; attnxfer's line still appears once, in its own words."""
    done = _run(
        """
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="ROOT %(message)s")
        from attnxfer.speak import say
        say("once")
        say("twice?")
        """
    )
    assert done.stdout == "once\ntwice?\n", done.stdout


def test_the_user_controls_the_level_through_the_attnxfer_logger():
    done = _run(
        """
        import logging
        from attnxfer.speak import debug, say, warn
        say("shown")
        debug("hidden by default")
        logging.getLogger("attnxfer").setLevel(logging.WARNING)
        say("silenced")
        warn("still warned")
        logging.getLogger("attnxfer").setLevel(logging.DEBUG)
        debug("detail asked for")
        """
    )
    assert done.stdout == "shown\n"
    assert done.stderr == "still warned\ndetail asked for\n"


def test_lines_go_to_the_streams_as_they_are_when_said(capsys, monkeypatch):
    """pytest swaps sys.stdout per test: the handler must write to the current one, not the first it saw."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    say("result 100%")  # a % in the text is not a format directive
    warn("careful")
    out, err = capsys.readouterr()
    assert (out, err) == ("result 100%\n", "careful\n")
    assert rank() == 0 and is_main()


def test_quiet_drops_lines_but_not_warnings_and_ends_with_its_block(capsys):
    """Work done for its result alone (a search's fits) says nothing, yet its warnings still reach the user."""
    with quiet():
        say("a fit's own step line")
        warn("a fit's warning")
    say("after")
    assert capsys.readouterr() == ("after\n", "a fit's warning\n")


def test_a_students_lines_start_with_its_name_and_only_inside_its_block(capsys):
    """A study's students say the same lines in turn: each says them under its name, on every stream and
    through Python's warnings too; outside the block, and for None, lines are as they are."""
    with warnings_as_lines(), speaking_for("distill"):
        say("epoch 0: step 4/4 val top1 30.00")
        progress("epoch 0: batch 2/8")
        warn("loss spiked")
        shown = warnings.formatwarning("a renamed key", RenamedKeyWarning, "config.py", 1)
        with speaking_for(None):
            say("shared by every student")
    say("study -> runs/st")
    out, err = capsys.readouterr()
    assert out == "distill: epoch 0: step 4/4 val top1 30.00\nshared by every student\nstudy -> runs/st\n"
    assert err == "distill: epoch 0: batch 2/8\ndistill: loss spiked\n"
    assert shown == "distill: warning: a renamed key\n"


def test_a_reader_that_goes_away_ends_the_cli_quietly():
    """`attnxfer ... | head -1`: once the reader has gone, the CLI stops with the shell's broken-pipe code
    (141), not a logging traceback."""
    done = _run(
        """
        import os, sys
        read, write = os.pipe()
        os.close(read)  # the reader has gone: every write to stdout now fails with EPIPE
        os.dup2(write, sys.stdout.fileno())
        from attnxfer.launch.cli import main
        sys.exit(main(["train", "--print-config"]))
        """
    )
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "Logging error" not in done.stderr, done.stderr
