"""How a config key is declared: once, as a dataclass field whose metadata holds its range and resume rules
(``lr: float = key(1e-3, range=POSITIVE, resumable=True)``), so the tables other code reads are derived and a
new key cannot be half-declared."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

_RANGE, _RESUMABLE, _SECTION = "attnxfer.range", "attnxfer.resumable", "attnxfer.section"
_SEARCH_RESUMABLE = "attnxfer.search_resumable"
_COMMAND, _UNREAD_BY = "attnxfer.command", "attnxfer.unread_by"


class ConfigError(InputError):
    """A config that cannot be used; the message says which key and what to write instead (``key``: the dotted
    key, where one value is at fault, so that the file that set it can be named)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """The values one config key accepts beyond its type: bounds (numbers and list items) or choices.
    ``Range()`` (`ANY`): any value of the field's type; `key` has no default, so every key states one on purpose."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded (> instead of >=)
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(c for c in self.choices if c)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:.15g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:.15g}")
        return " and ".join(parts) or "anything"

    def admits(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, list):
            return all(self.admits(v) for v in value)
        if self.choices is not None:
            return not isinstance(value, str) or value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        if isinstance(value, float) and not math.isfinite(value):  # an int is finite, whatever its size
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


ANY = Range()
POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # probabilities
OPEN_FRACTION = Range(0, 1, high_open=True)


def key(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    range: Range | None = None,
    choices: tuple[str, ...] | None = None,
    resumable: bool = False,
    search_resumable: bool = False,
) -> Any:
    """A config key: its default (or ``factory``), the values it accepts (exactly one of ``range=`` and
    ``choices=``) and whether a resumed run may change it (default no: a forgotten rule refuses a change rather
    than silently letting a checkpoint mean something else); ``search_resumable``: the same for a resumed
    ``attnxfer search`` (it resumes a population: how long it goes on may change, its candidates' training not)."""
    if (range is None) == (choices is None):
        raise TypeError("key(...): give exactly one of range= (ANY for no bounds) or choices=")
    rule = Range(choices=tuple(choices)) if choices is not None else range
    metadata = {_RANGE: rule, _RESUMABLE: bool(resumable), _SEARCH_RESUMABLE: bool(search_resumable)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(
    cls: type,
    *,
    resumable: bool = False,
    search_resumable: bool = False,
    command: str | None = None,
    unread_by: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """A section of the config (a nested dataclass); ``resumable``/``search_resumable``: a resumed run/search
    may change every key in it; ``command``: the one command that reads it; ``unread_by``: the commands that do
    not (every other one does), each with the values of the section's keys that say what it does anyway. A
    command that does not read a section leaves it out (`to_dict`)."""
    metadata = {
        _SECTION: True,
        _RESUMABLE: bool(resumable),
        _SEARCH_RESUMABLE: bool(search_resumable),
        _COMMAND: command,
        _UNREAD_BY: dict(unread_by or {}),
    }
    return dataclasses.field(default_factory=cls, metadata=metadata)


def section_command(f: dataclasses.Field) -> str | None:
    """The one command that reads the section ``f`` (None: no one command's; `reads_section` says whose)."""
    return f.metadata.get(_COMMAND)


def section_unread_by(f: dataclasses.Field) -> tuple[str, ...]:
    """The commands that do not read the section ``f``, though it is no one command's (the reference page)."""
    return tuple(f.metadata.get(_UNREAD_BY, ()))


def reads_section(f: dataclasses.Field, command: str | None) -> bool:
    """Whether ``command`` reads the field ``f`` (a key, not a section: yes); None: a command that reads every
    section no one command owns (eval of a train or convert run)."""
    return section_command(f) in (None, command) and command not in f.metadata.get(_UNREAD_BY, {})


def value_said_anyway(f: dataclasses.Field, command: str, key: str) -> Any:
    """The value of ``key`` (in the section ``f``) that says what ``command``, which does not read ``f``, does
    anyway (transfer.mode=none for pretrain): allowed, as an older run's config.yaml may hold it."""
    return f.metadata.get(_UNREAD_BY, {}).get(command, {}).get(key, dataclasses.MISSING)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation; cached (resolving annotations is the slow part of reading a config).
    Read-only."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def rule_of(f: dataclasses.Field) -> Range:
    """The declared range of a leaf field; a field declared without `key` is a mistake in the schema."""
    try:
        return f.metadata[_RANGE]
    except KeyError:
        raise TypeError(
            f"config field {f.name!r} is declared without its range: write "
            f"{f.name}: TYPE = key(DEFAULT, range=...) (range=ANY if it has none; a section: section(CLASS))"
        ) from None


@dataclass(frozen=True)
class Leaf:
    """One key of the schema: its dotted name, range and resume rules (its own or its section's)."""

    name: str
    range: Range
    resumable: bool
    owner: type  # the section dataclass that declares it
    search_resumable: bool = False

    @property
    def type(self) -> Any:
        """Its resolved annotation (``int | None``, ``list[str]``, ...)."""
        return field_types(self.owner)[self.name.rsplit(".", 1)[-1]]


def leaves(
    cls: type, prefix: str = "", resumable: bool = False, search_resumable: bool = False
) -> Iterator[Leaf]:
    """Every leaf key under ``cls``, dotted, in declaration order (read from the metadata alone)."""
    for f in dataclasses.fields(cls):
        name, may_change = prefix + f.name, resumable or f.metadata.get(_RESUMABLE, False)
        search_may = search_resumable or f.metadata.get(_SEARCH_RESUMABLE, False)
        if f.metadata.get(_SECTION):
            yield from leaves(f.default_factory, name + ".", may_change, search_may)
        else:
            yield Leaf(name, rule_of(f), may_change, cls, search_may)


def resumable_keys(cls: type) -> tuple[str, ...]:
    """The dotted keys a resumed run may change (declared on the field or on its section)."""
    return tuple(leaf.name for leaf in leaves(cls) if leaf.resumable)


def search_resumable_keys(cls: type) -> tuple[str, ...]:
    """The dotted keys a resumed search may change (declared on the field or on its section)."""
    return tuple(leaf.name for leaf in leaves(cls) if leaf.search_resumable)
