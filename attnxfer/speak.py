"""The one way attnxfer speaks: `say` (results, to stdout), `warn` (to stderr), `debug` (detail).
Every line goes through ``logging.getLogger("attnxfer")``, so plain `logging` controls it; the handler writes
to the *current* ``sys.stdout``/``sys.stderr`` at emit time (redirects and pytest's capture see the lines)
and flushes each (launcher output stays in order). The logger does not propagate, so a root handler does
not print a line twice. Ranks other than 0 drop a line unless ``all_ranks=True``. No torch at import time:
the CLI's ``--help`` imports this module.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TextIO

LOGGER_NAME = "attnxfer"
_ALL_RANKS = "attnxfer_all_ranks"
_TO_STDERR = "attnxfer_to_stderr"
#: inside `quiet()`: lines below WARNING are dropped (per thread and task, as a ContextVar is)
_QUIET: ContextVar[bool] = ContextVar("attnxfer_quiet", default=False)
#: inside `speaking_for(name)`: each line starts ``name: `` (a study's student, among others saying the same)
_SPEAKER: ContextVar[str | None] = ContextVar("attnxfer_speaker", default=None)


def rank() -> int:
    """This rank: torch.distributed's, else ``RANK``, else ``SLURM_PROCID`` (plain ``srun``), else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def is_main() -> bool:
    """True on rank 0: the process that speaks for the job, writes the shared records and reports."""
    return rank() == 0


def _main_rank_only(record: logging.LogRecord) -> bool:
    """Drop a record on ranks other than 0 unless ``all_ranks=True``, and below WARNING inside `quiet`."""
    if record.levelno < logging.WARNING and _QUIET.get():
        return False
    return getattr(record, _ALL_RANKS, False) or is_main()


class _CurrentStreams(logging.Handler):
    """INFO to ``sys.stdout`` (but `progress`), the rest to ``sys.stderr``, as they are at emit time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            to_stdout = record.levelno == logging.INFO and not getattr(record, _TO_STDERR, False)
            stream = sys.stdout if to_stdout else sys.stderr
            with _around_bars(stream):
                stream.write(self.format(record) + "\n")
                stream.flush()
        except BrokenPipeError:
            raise  # a reader that went away (`attnxfer ... | head`) ends the program as print's error did
        except Exception:
            self.handleError(record)


def _around_bars(stream: TextIO) -> contextlib.AbstractContextManager:
    """tqdm's bars cleared before the line and redrawn after it (else the line would half-draw a bar)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
        return contextlib.nullcontext()
    return tqdm.tqdm.external_write_mode(file=stream)


def _logger() -> logging.Logger:
    """attnxfer's logger with its handler and filter, installed on first use (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not getattr(logger, "_attnxfer_set_up", False):
        handler = _CurrentStreams()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.addFilter(_main_rank_only)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger._attnxfer_set_up = True  # type: ignore[attr-defined]  # a user who removed the handler keeps it removed
    return logger


def _as_speaker(text: str) -> str:
    """``text`` after the name `speaking_for` set, if any."""
    speaker = _SPEAKER.get()
    return f"{speaker}: {text}" if speaker else text


def _line(level: int, message: str, all_ranks: bool, to_stderr: bool = False) -> None:
    _logger().log(level, _as_speaker(message), extra={_ALL_RANKS: all_ranks, _TO_STDERR: to_stderr})


def say(message: str, *, all_ranks: bool = False) -> None:
    """A result or progress line for the user, on stdout (main rank only unless ``all_ranks``)."""
    _line(logging.INFO, message, all_ranks)


def warn(message: str, *, all_ranks: bool = False) -> None:
    """Something the user should know went differently than asked, on stderr (main rank unless ``all_ranks``)."""
    _line(logging.WARNING, message, all_ranks)


def progress(message: str, *, all_ranks: bool = False) -> None:
    """A progress line where no bar can be drawn (a log, a pipe): on stderr, so stdout keeps only results."""
    _line(logging.INFO, message, all_ranks, to_stderr=True)


def debug(message: str, *, all_ranks: bool = False) -> None:
    """Detail hidden by default (where a file came from, what a rank joined); shown at ``logging.DEBUG``."""
    _line(logging.DEBUG, message, all_ranks)


def config_word(value: Any) -> str:
    """A config value as the config spells it: null, true and false (not Python's None, True, False), else repr."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def change_said(old: Any, new: Any, show: Callable[[Any], str] = config_word) -> str:
    """``old -> new``; of two mappings (data.kwargs, a whole curriculum in it) only the entries that differ,
    ``distractors: 16 -> 8, hops: unset -> 2``: a run's start-up summary and a resume's changes say it alike."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{show(old)} -> {show(new)}"
    said = lambda d, k: show(d[k]) if k in d else "unset"
    return ", ".join(
        f"{k}: {said(old, k)} -> {said(new, k)}" for k in {**old, **new} if said(old, k) != said(new, k)
    )


@contextlib.contextmanager
def speaking_for(name: str | None) -> Iterator[None]:
    """Lines said inside start with ``name: ``: a study's students say the same lines in turn (each its plan,
    progress and scores), and a reader has to know whose each is. None: lines as they are."""
    token = _SPEAKER.set(name)
    try:
        yield
    finally:
        _SPEAKER.reset(token)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Only warnings said inside: work done for its result alone (a search's stage-1 fits) says nothing."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


@contextlib.contextmanager
def lines_dropped(logger: str, containing: str) -> Iterator[None]:
    """Inside: another library's log lines that contain ``containing`` dropped (timm's warning before attnxfer
    says the same thing in its own words, or finds nothing amiss)."""

    def keep(record: logging.LogRecord) -> bool:
        return containing not in record.getMessage()

    log = logging.getLogger(logger)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Inside: attnxfer's own warnings (a renamed key, a corrupt checkpoint) read ``warning: ...`` like its other
    lines, not ``file:line: Category: ...``, and only the main rank shows them, as it does `warn`'s (every rank
    reads the same config and checkpoints), each once however many places meet it (one broken checkpoint,
    listed by latest, best and list); other packages' keep Python's format. Filters still see them."""
    python_format = warnings.formatwarning
    shown: set[str] = set()

    def as_line(message, category, filename, lineno, line=None) -> str:
        if category.__module__.partition(".")[0] == __package__:  # a category attnxfer defines
            text = f"warning: {message}\n"
            if text in shown or not is_main():
                return ""
            shown.add(text)
            return _as_speaker(text)
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = as_line
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def show_debug() -> None:
    """Show `debug` lines too (a cluster job's log, where the detail helps afterwards)."""
    _logger().setLevel(logging.DEBUG)


class LineProgress:
    """Progress for a log file, in tqdm's calls: one plain line per log record (each `set_postfix`, as timm's
    train.py logs) and at most one every ``every_s`` seconds between; no carriage returns."""

    def __init__(
        self,
        total: int | None,
        *,
        initial: int = 0,
        desc: str = "",
        unit: str = "batch",
        every_s: float = 60.0,
    ):
        self.total, self.n, self.desc, self.unit = total, int(initial), desc, unit
        self.every_s = every_s
        self._start = self._said = time.monotonic()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._said >= self.every_s:
            self._say("")  # the count and time alone: the last record's values are of an earlier batch

    def set_postfix(self, **values: Any) -> None:
        self._say("".join(f"  {k} {v}" for k, v in values.items()))

    def close(self) -> None:
        pass

    def _say(self, postfix: str) -> None:
        self._said = time.monotonic()
        elapsed = datetime.timedelta(seconds=round(self._said - self._start))
        of = f"/{self.total} ({100 * self.n / self.total:3.0f}%)" if self.total else ""
        progress(f"{self.desc}: {self.unit} {self.n}{of}{postfix}  [{elapsed}]")


def progress_bar(
    total: int | None,
    *,
    initial: int = 0,
    desc: str = "",
    unit: str = "batch",
    disable: bool = False,
    stream: TextIO | None = None,
):
    """tqdm's bar where a person watches (a terminal, a notebook); `LineProgress` anywhere else: a bar redrawn
    ten times a second would write millions of redraws into a long job's log file. ``disable``: no progress."""
    from tqdm.auto import tqdm  # not at import: the CLI's --help imports this module

    stream = stream if stream is not None else sys.stderr
    try:  # a Jupyter cell's stream is no tty but draws tqdm's widget
        watched = type(stream).__module__.startswith("ipykernel") or stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        watched = False
    if watched or disable:
        return tqdm(
            total=total,
            initial=initial,
            desc=_as_speaker(desc),
            unit=unit,
            leave=False,
            dynamic_ncols=True,
            file=stream,
            disable=disable,
        )
    return LineProgress(total, initial=initial, desc=desc, unit=unit)
