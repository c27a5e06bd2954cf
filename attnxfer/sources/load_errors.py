"""Why weights could not be had or used: each a UserError whose message says what to do."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError, UserError


class TeacherNotAvailable(UserError, RuntimeError):
    """The teacher's weights are neither on this machine nor reachable; the message says how to get them."""


class TeacherLoadError(InputError):
    """The weights do not fit the architecture (missing/unexpected/mis-shaped keys, wrong head)."""

    def __init__(self, message: str, missing_keys: Sequence[str] = (), unexpected_keys: Sequence[str] = ()):
        super().__init__(message)
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)


class UnsafeCheckpointError(InputError):
    """A checkpoint that can only be read by unpickling arbitrary Python objects."""
