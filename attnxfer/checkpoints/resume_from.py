"""What a run resumes from: the config's ``checkpoint.resume`` (auto | none | PATH) as data.

The engine, ``attnxfer eval``, conversion and the resume checks all ask `ResumeFrom.checkpoint`, so the
three cases are decided in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..errors import InputError, MissingPathError
from .store import CheckpointInfo, CheckpointManager, verify_checkpoint

__all__ = ["ResumeFrom", "ResumePolicy"]


class ResumePolicy(StrEnum):
    LATEST = "auto"  # the run's newest intact checkpoint, if it has one
    FRESH = "none"  # start over (records of an earlier attempt are dropped)
    PATH = "path"  # a given checkpoint directory


@dataclass(frozen=True)
class ResumeFrom:
    policy: ResumePolicy = ResumePolicy.LATEST
    path: Path | None = None

    @classmethod
    def parse(cls, value: ResumeFrom | str | os.PathLike) -> ResumeFrom:
        """``auto``, ``none`` or a checkpoint directory (the config's words) as a `ResumeFrom`."""
        if isinstance(value, ResumeFrom):
            return value
        try:
            policy = ResumePolicy(str(value))
        except ValueError:
            return cls(ResumePolicy.PATH, Path(value))
        if policy is ResumePolicy.PATH:  # the word itself is not a directory name anyone means
            raise InputError("checkpoint.resume: use auto, none, or a checkpoint directory")
        return cls(policy)

    def checkpoint(
        self, manager: CheckpointManager, verify_hash: bool | None = None
    ) -> CheckpointInfo | None:
        """The checkpoint to resume from, or None for a fresh start (``none``, or ``auto`` in a new run)."""
        if self.policy is ResumePolicy.FRESH:
            return None
        if self.policy is ResumePolicy.LATEST:
            return manager.latest(verify_hash=verify_hash)
        if not self.path.exists():
            raise MissingPathError(
                f"checkpoint.resume={str(self.path)!r} does not exist; use auto, none, or a "
                "checkpoint directory such as RUN_DIR/checkpoints/step-00000100"
            )
        return verify_checkpoint(self.path, verify_hash=True if verify_hash is None else verify_hash)

    def __str__(self) -> str:
        return str(self.path) if self.policy is ResumePolicy.PATH else self.policy.value
