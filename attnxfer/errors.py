"""Errors whose message is meant for the user: the CLI prints them in one line (exit code 2); any other
exception is a bug and keeps its traceback. The bottom of the layers: it imports nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A refusal the user can act on: the message says what to change (a key, a path, a flag). Subclass it
    for every error meant to reach the command line without a traceback."""


class InputError(UserError, ValueError):
    """A value the user gave (a config key, a flag, a file they named) that cannot be used. Also a
    ValueError, so callers that catch those keep working."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named (a run dir, a checkpoint, a dataset root) that is not there. Also a
    FileNotFoundError, so callers that catch those keep working."""


class PathExistsError(UserError, FileExistsError):
    """A path the user named that would be overwritten (or is a file where a folder belongs). Also a
    FileExistsError."""


class OptionError(UserError, TypeError):
    """An option a registered builder (a dataset's ``data.kwargs``) does not take. Also a TypeError, as an
    unexpected keyword argument is."""


class UnknownNameError(InputError, KeyError):
    """A name nothing is registered under (an attention's). Also a KeyError, as a missing key is, but its
    message prints as written, not in quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HubUnreachableError(UserError, RuntimeError):
    """The Hub cannot be reached (offline mode, or no route) for what was asked of it; the message says what
    was done and how to finish elsewhere. Also a RuntimeError."""


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """``; did you mean 'NEAREST'?`` of ``name`` among ``names``, or "": a name in the wrong case (AUTO) finds
    its own spelling, which the caller still refuses to take. A word nearer a part that several names share
    than any whole name (``linear``, ``linera``: elu_linear, relu_linear, ...) is answered with those names,
    up to six, not with the one difflib ranks first."""
    by_lower = {n.lower(): n for n in sorted(names)}
    word = name.lower()
    close = difflib.get_close_matches(word, list(by_lower), n=1)
    parts = {p for n in by_lower if "_" in n for p in n.split("_")}
    part = difflib.get_close_matches(word, parts, n=1) if word not in by_lower else []
    nearer = part and (
        not close
        or difflib.SequenceMatcher(None, word, part[0]).ratio()
        > difflib.SequenceMatcher(None, word, close[0]).ratio()
    )
    sharing = [by_lower[n] for n in by_lower if part[0] in n.split("_")] if nearer else []
    if 1 < len(sharing) <= 6:
        return f"; did you mean one of {', '.join(map(repr, sharing))}?"
    # the one name of that part: 'topk' for topk_sparse, which difflib finds too short to be near it whole
    best = sharing[0] if len(sharing) == 1 else by_lower[close[0]] if close else None
    return f"; did you mean {best!r}?" if best else ""
