"""What a run goes on from: ``checkpoint.resume`` (auto | none | PATH) and the checkpoint it finds, verified
and its ``state.json`` parsed once (`ResumePoint.find`); everything later reads the point, never the files
again. Which recorded keys changed, and whether that is allowed, the apps judge (`KeyChange`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, MissingPathError
from ..run_layout import CHECKPOINTS_SUBDIR, STATE_NAME, is_exported_model, missing_path
from ..speak import change_said
from .store import CheckpointError, CheckpointInfo, CheckpointManager, load_checkpoint, verify_checkpoint
from .verify import MANIFEST_NAME, CorruptCheckpointError


class ResumePolicy(StrEnum):
    LATEST = "auto"  # the run's newest intact checkpoint, if it has one
    FRESH = "none"  # start over (an earlier attempt's checkpoints and records are kept aside)
    PATH = "path"  # a given checkpoint directory


@dataclass(frozen=True)
class ResumeFrom:
    """The config's ``checkpoint.resume`` as data."""

    policy: ResumePolicy = ResumePolicy.LATEST
    path: Path | None = None

    @classmethod
    def parse(cls, value: ResumeFrom | str | os.PathLike) -> ResumeFrom:
        """``auto``, ``none`` or a checkpoint directory (the config's words) as a `ResumeFrom`."""
        if isinstance(value, ResumeFrom):
            return value
        try:
            policy = ResumePolicy(str(value) or ResumePolicy.PATH)  # '' (an unset variable) is not '.' either
        except ValueError:
            return cls(ResumePolicy.PATH, Path(value))
        if policy is ResumePolicy.PATH:  # the word itself is not a directory name anyone means
            raise InputError("checkpoint.resume: use auto, none, or a checkpoint directory")
        return cls(policy)

    def checkpoint(
        self, manager: CheckpointManager, verify_hash: bool | None = None
    ) -> CheckpointInfo | None:
        """The checkpoint to resume from, or None for a fresh start (``none``, or ``auto`` in a new run). ``auto``
        where every checkpoint is broken is refused: starting over would drop the run's records and, once
        newer saves push them out, the checkpoints themselves."""
        if self.policy is ResumePolicy.FRESH:
            return None
        if self.policy is ResumePolicy.LATEST:
            info = manager.latest(verify_hash=verify_hash)
            if info is None and (broken := manager.step_dirs()):
                raise none_usable(manager, broken)
            return info
        if not self.path.exists():
            raise MissingPathError(
                f"checkpoint.resume={missing_path(self.path)}; use auto, none, or a "
                "checkpoint directory such as RUN_DIR/checkpoints/step-00000100"
            )
        where = self.path.parent if self.path.name == CHECKPOINTS_SUBDIR else self.path
        if self.path.is_file():  # as timm's and MAE's --resume take their checkpoint's .pth
            fix = (
                f"of the checkpoint {self.path.parent}: give the folder"
                if (self.path.parent / MANIFEST_NAME).is_file()
                else f"of no run's checkpoint (RUN_DIR/checkpoints/step-*): to start a run from its weights, "
                f"give it as model.init={self.path}"
            )
            raise InputError(f"checkpoint.resume={str(self.path)!r} is a file {fix}")
        if is_exported_model(self.path):  # no save cut short, as its missing manifest would say
            raise InputError(
                f"checkpoint.resume={str(self.path)!r} is an exported model, not a run's checkpoint "
                f"(RUN_DIR/checkpoints/step-*): to start a run from its weights, give it as "
                f"model.init=local-dir:{self.path}"
            )
        if not (self.path / MANIFEST_NAME).exists() and (steps := CheckpointManager(where).step_dirs()):
            raise InputError(
                f"checkpoint.resume={str(self.path)!r} holds checkpoints, not one: give one of them (the newest "
                f"is {steps[0]}), or checkpoint.resume=auto with run_dir={where}"
            )
        try:
            return verify_checkpoint(self.path, verify_hash=True if verify_hash is None else verify_hash)
        except CorruptCheckpointError as e:  # say what to give instead
            raise CorruptCheckpointError(
                e.path,
                f"{e.problem}; give checkpoint.resume another checkpoint, or auto (the newest intact one)",
            ) from None

    def __str__(self) -> str:
        return str(self.path) if self.policy is ResumePolicy.PATH else self.policy.value


def none_usable(manager: CheckpointManager, broken: list[Path]) -> CheckpointError:
    """The refusal of a run whose ``broken`` checkpoints (``manager.step_dirs()``) all failed verification, each
    warned about: one message for every command that reads a run, saying what to do with them."""
    return CheckpointError(
        f"{manager.dir} holds {len(broken)} checkpoint(s), none usable (each warning above says "
        "why): nothing is read from them, and nothing trains over them; put back the files the warnings name "
        f"(from a copy of the run, if there is one), or move them out of {manager.dir} (to look at later) and "
        "train the run again from scratch"
    )


def starts_over(resume: ResumeFrom | str | os.PathLike) -> bool:
    """Whether ``checkpoint.resume`` is ``none``: the run starts over, its earlier work kept aside."""
    return ResumeFrom.parse(resume).policy is ResumePolicy.FRESH


@dataclass(frozen=True)
class KeyChange:
    """One config key whose value differs from the one a checkpoint recorded, and whether a resume may
    change it (the rule is the apps': `attnxfer.apps.run.resume`)."""

    key: str
    old: Any
    new: Any
    allowed: bool
    note: str = ""  # why it is allowed where the key alone would not be ("the weights must hash as recorded")

    def __str__(self) -> str:
        return f"{self.key} ({change_said(self.old, self.new)}){f' [{self.note}]' if self.note else ''}"

    @staticmethod
    def restoring(changes: list[KeyChange]) -> str:
        """The overrides that give ``changes`` their recorded values back: the way to continue a run whose
        values came from the command line, where dropping the new ones would fall to the recipe's."""
        plain = lambda v: isinstance(v, str) and yaml.safe_load(v) == v  # read back as the same string
        return " ".join(
            shlex.quote(f"{c.key}={c.old if plain(c.old) else json.dumps(c.old)}") for c in changes
        )


class RecordedState(dict):
    """A checkpoint's parsed ``state.json``: an entry a resume reads (``state["epoch"]``) that the file lacks
    (edited by hand and its manifest re-hashed) is refused naming the file and the entry, not a bare KeyError."""

    def __init__(self, file: Path, entries: dict[str, Any]) -> None:
        super().__init__(entries)
        self.file = file

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(
            f"{self.file} has no {key!r} entry (edited by hand?): this checkpoint cannot be resumed. Restore the "
            "file, give checkpoint.resume another checkpoint, or start the run over with checkpoint.resume=none"
        )


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint found, verified and read once: where it is, its parsed state, and (once judged by the
    apps) the config keys that changed since it was written."""

    checkpoint: CheckpointInfo
    state: dict[str, Any]
    changes: tuple[KeyChange, ...] = field(default=())
    # the training data is not what the checkpoint recorded and the user asked to go on: the epoch restarts
    restart_epoch: bool = False

    @classmethod
    def find(
        cls, run_dir: str | os.PathLike, resume: ResumeFrom | str = "auto", *, verify_hash: bool | None = None
    ) -> ResumePoint | None:
        """The checkpoint ``resume`` picks under ``run_dir`` (``none``: None; ``auto`` in a run without one:
        None), verified (with its files' hashes unless ``verify_hash=False``) and its state parsed."""
        info = ResumeFrom.parse(resume).checkpoint(CheckpointManager(run_dir), verify_hash=verify_hash)
        if info is None:
            return None
        try:
            state = json.loads((info.path / STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read the recorded state of {info.path}: {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{info.path / STATE_NAME} is not a JSON object; not an attnxfer checkpoint?"
            )
        return cls(info, RecordedState(info.path / STATE_NAME, state))

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def name(self) -> str:
        return self.checkpoint.path.name

    @property
    def step(self) -> int:
        return int(self.state.get("step", self.checkpoint.step))

    def _typed(self, key: str, kind: type) -> Any:
        value = self.state.get(key)
        return value if isinstance(value, kind) else None

    @property
    def config(self) -> dict[str, Any] | None:
        """The config (as a dict) the checkpoint was trained with; None for a checkpoint written without one."""
        return self._typed("config", dict)

    @property
    def world_size(self) -> int | None:
        return self._typed("world_size", int)

    @property
    def teacher(self) -> dict[str, Any] | None:
        """The teacher's record (spec, weights sha256) the checkpoint learned from."""
        return self._typed("teacher", dict)

    @property
    def data(self) -> dict[str, Any] | None:
        """What its training data was (`attnxfer.data.identity`): None for a checkpoint that did not record it."""
        return self._typed("data", dict)

    def record(self, key: str) -> Any:
        """Any other entry of the state (None where absent)."""
        return self.state.get(key)

    @property
    def allowed(self) -> tuple[KeyChange, ...]:
        return tuple(c for c in self.changes if c.allowed)

    @property
    def refused(self) -> tuple[KeyChange, ...]:
        return tuple(c for c in self.changes if not c.allowed)

    def judged(self, changes: tuple[KeyChange, ...] | list[KeyChange]) -> ResumePoint:
        return dataclasses.replace(self, changes=tuple(changes))

    def load_tensors(self, map_location: str = "cpu") -> dict[str, dict[str, Any]]:
        """Its tensor groups. Files hash-verified when the point was found get only the cheap checks again
        (sizes, headers: a file that changed since is still caught)."""
        rehash = not self.checkpoint.hash_verified
        return load_checkpoint(self.checkpoint, map_location, verify_hash=rehash)[0]
