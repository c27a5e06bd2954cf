"""Progress where nobody watches a terminal: a submitted job's stderr is a file (``submitit/*_log.err``), where a
tqdm bar redrawn ten times a second leaves every redraw (a carriage return each). There the engine writes one
plain line per log record; on a terminal (a pty here) the bar stays."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import struct
import termios
import threading
from pathlib import Path
from typing import TextIO

import torch

from attnxfer.launch import cli
from attnxfer.speak import LineProgress, progress_bar


def _terminal() -> tuple[int, int]:
    """(master, slave) of a pty with a terminal's 24x80 size (tqdm draws nothing 0 columns wide)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return master, slave


def _read_all(fd: int) -> str:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):  # drained (or the other end closed)
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _drive(bar) -> None:
    """What the engine does over one epoch: a step per batch, a log record every 2 steps."""
    for step in range(1, 7):
        bar.update(1)
        if step % 2 == 0:
            bar.set_postfix(loss=f"{1 / step:.3f}", lr="1.00e-03")
    bar.close()


def test_a_file_gets_one_plain_line_per_record_and_a_terminal_keeps_the_bar(capsys):
    bar = progress_bar(6, desc="epoch 0")  # stderr captured: no terminal, as a job's *_log.err
    assert isinstance(bar, LineProgress)
    _drive(bar)
    out, text = capsys.readouterr()
    assert out == ""  # progress stays off stdout, where the results go
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3  # one per record
    assert (
        lines[0].startswith("epoch 0: batch 2/6") and "loss 0.500" in lines[0] and "lr 1.00e-03" in lines[0]
    )
    assert lines[-1].startswith("epoch 0: batch 6/6")

    master, slave = _terminal()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            bar = progress_bar(6, desc="epoch 0", stream=tty)
            assert not isinstance(bar, LineProgress)  # tqdm's own bar
            _drive(bar)
            tty.flush()
        assert "\r" in _read_all(master)  # redrawn in place
    finally:
        os.close(master)
        os.close(slave)


def test_between_records_a_line_comes_at_most_every_so_many_seconds(capsys):
    quiet = LineProgress(10, desc="quiet", every_s=3600)  # no record, not an hour yet: silent
    for _ in range(10):
        quiet.update(1)
    chatty = LineProgress(3, desc="chatty", every_s=0)
    for _ in range(3):
        chatty.update(1)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "chatty: batch 1/3",
        "chatty: batch 2/3",
        "chatty: batch 3/3",
    ]


def test_a_line_between_records_gives_no_earlier_records_loss_as_its_batchs(capsys):
    """A record's loss and lr belong to its batch: a timed line of a later batch (a slow step in a job's
    log) says its count and time alone, so no line pairs batch 3 with batch 2's numbers."""
    bar = LineProgress(6, desc="epoch 0", every_s=0)
    bar.update(1)
    bar.update(1)
    bar.set_postfix(loss="0.500", lr="1.00e-03")
    bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"epoch 0: batch {n}/6" for n in (1, 2, 2, 3)]
    assert "loss 0.500" in lines[2] and "loss" not in lines[3] and "lr" not in lines[3]


def test_inspect_and_search_write_plain_lines_to_a_file_too(tmp_path, capsys):
    """Their progress goes the engine's way: a job's log gets lines, not a bar's redraws."""
    from helpers import tiny_vit

    from attnxfer.analysis import compare_attention
    from attnxfer.analysis.compare import InspectedStudent

    teacher = tiny_vit(depth=1)
    compare_attention(teacher, {"s": InspectedStudent(teacher)}, [torch.randn(2, 3, 32, 32)], progress=True)
    with progress_bar(5, desc="search", unit="candidate") as bar:  # how the search holds its bar
        bar.every_s = 0
        bar.update(2)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("search: candidate 2/5 ( 40%)")
    assert progress_bar(None, desc="inspect", unit="image").__class__ is LineProgress


TRAIN = [
    "train",
    "data.dataset=synthetic",
    "data.batch_size=8",
    "data.kwargs.length=64",
    "model.kwargs={depth: 2, embed_dim: 48}",
    "transfer.mode=none",
    "log.progress=true",
    "log.trackers=[]",
    "log.every_steps=2",
    "schedule.max_steps=6",
    "checkpoint.every_epoch=false",
    "device=cpu",
]


def _train(run: Path, stderr: TextIO, *extra: str) -> int:
    """`attnxfer train` (the CLI's own `main`, in this process) with ``stderr`` as its stderr: what the engine
    decides from is the stream ``sys.stderr`` is when its bar starts, a file's or a terminal's, so no new
    interpreter (a fresh torch import) is needed to give it either. Its stdout, the results, is dropped."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        return cli.main([*TRAIN, f"run_dir={run}", *extra])


def _train_on_a_terminal(run: Path) -> tuple[int, str]:
    """The run with a pty as stderr, read by a thread while it runs (a full pty buffer would block the run)."""
    master, slave = _terminal()
    out: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the pty
                break
            if not chunk:
                break
            out.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with os.fdopen(slave, "w", buffering=1) as tty:  # closes the pty's writer end: the reader's EIO
            code = _train(run, tty)
        reader.join(timeout=60)
        assert not reader.is_alive()
        return code, b"".join(out).decode(errors="replace")
    finally:
        os.close(master)


def test_a_training_run_writes_plain_lines_into_a_log_file_and_a_bar_onto_a_terminal(
    tmp_path, tiny_teacher_dir
):
    """`attnxfer train` with log.progress=true: stderr to a file (a submitted job's) holds one line per
    train record and no carriage return, with the loss and the two parts a distillation's sums; the same run
    on a pty draws tqdm's bar. Both in this process (`_train`)."""
    err = tmp_path / "job_log.err"
    with err.open("w") as f:
        distill = [f"teacher.spec=local-dir:{tiny_teacher_dir}", "transfer.mode=distill"]
        assert _train(tmp_path / "file", f, *distill) == 0
    text = err.read_text()
    assert "\r" not in text
    records = [json.loads(line) for line in (tmp_path / "file" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    lines = [line for line in text.splitlines() if line.startswith("epoch 0: batch")]
    assert [r["step"] for r in train] == [2, 4, 6] and len(lines) == len(train), text
    for r, line in zip(train, lines):
        assert f"loss {r['total']:.3f}  task {r['task']:.3f}  transfer {r['transfer']:.3f}  lr" in line, line

    code, shown = _train_on_a_terminal(tmp_path / "tty")
    # a redraw is a carriage return of its own: the pty turns every line's "\n" into "\r\n", which plain
    # lines on a terminal would show too
    assert code == 0 and "\r" in shown.replace("\r\n", "\n") and "epoch 0:" in shown, shown
