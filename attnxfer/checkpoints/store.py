"""Atomic, verifiable training checkpoints: ``run_dir/checkpoints/step-00000123/`` holds one safetensors file
per tensor group ('model', 'ema', 'optimizer', ...), ``state.json`` and, written last, ``MANIFEST.json`` (size
and sha256 of every file). Nothing is ever unpickled.

Why a crash never leaves half a checkpoint: it is written into a hidden temp dir beside the final one (every
file fsynced, the manifest last), renamed to ``step-*`` (atomic on POSIX) and the parent fsynced; pruning
renames a doomed dir to a hidden trash name before deleting it; temp dirs of a live writer on this host are
left alone. Readers verify first (`verify.py`); hashing reads every byte (about 1 GB/s on one core here), so
huge checkpoints may keep only the cheap checks (truncation, missing files, damaged headers).

An intact checkpoint is never overwritten unless asked (`CheckpointManager.save`); a broken one at the same
step is set aside as ``step-X.corrupt-<time>``, and broken dirs are never deleted. One writer per run dir
(rank 0), any number of readers. Tensor groups come back in safetensors' key order.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..run_layout import CHECKPOINTS_SUBDIR, STATE_NAME
from ..sources.resolve import sha256_file
from .atomic_io import (
    _dump_json,
    _fsync_dir,
    _write_file_synced,
    atomic_write_bytes as atomic_write_bytes,
    atomic_write_json as atomic_write_json,
    atomic_write_text as atomic_write_text,
    give_normal_mode,
    replace_dir,
)
from .processes import process_alive
from .tensor_codec import (
    optimizer_state_from_tensors as optimizer_state_from_tensors,
    optimizer_state_to_tensors as optimizer_state_to_tensors,
    state_dict_from_tensors as state_dict_from_tensors,
    state_dict_to_tensors as state_dict_to_tensors,
)
from .verify import (
    CHECKPOINT_FORMAT,
    MANIFEST_NAME,
    STEP_DIR_RE,
    CheckpointError as CheckpointError,
    CheckpointExistsError,
    CheckpointInfo,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    load_checkpoint,
    manifest_digest,
    verify_checkpoint,
)

_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class MetricMode(StrEnum):
    """Whether a higher (``max``: accuracy) or lower (``min``: loss) selection metric is better."""

    MAX = "max"
    MIN = "min"

    @property
    def sign(self) -> int:
        """+1 or -1: ``sign * metric`` is larger for better checkpoints."""
        return 1 if self is MetricMode.MAX else -1

    def better(self, value: float, than: float) -> bool:
        return self.sign * value > self.sign * than


def _checked_save(
    step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any], metric: Any
) -> tuple[str, float | None]:
    """What a save is given, checked before anything is written: (the state as JSON text, the metric)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if metric is not None:
        metric = float(metric.item() if isinstance(metric, torch.Tensor) else metric)
        if not math.isfinite(metric):
            raise ValueError(
                f"metric must be finite to rank checkpoints, got {metric}; pass metric=None instead"
            )
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must map group name -> {{name: Tensor}}, got {type(tensors).__name__}")
    for group, tdict in tensors.items():
        if not isinstance(group, str) or not _GROUP_NAME_RE.match(group):
            raise ValueError(
                f"tensor group name {group!r} must be a plain file stem (letters, digits, _ . -), "
                f"like 'model', 'ema' or 'optimizer'"
            )
        if not isinstance(tdict, Mapping):
            raise TypeError(
                f"tensors[{group!r}] must be a flat dict str -> Tensor, got {type(tdict).__name__}"
            )
        for name, t in tdict.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"tensors[{group!r}] must be a flat dict str -> Tensor; entry {name!r} is "
                    f"{type(t).__name__} (nested state? use state_dict_to_tensors)"
                )
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a JSON-serialisable dict, got {type(state).__name__}")
    return _dump_json(dict(state), "checkpoint state"), metric


def _write_checkpoint_files(
    folder: Path,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state_text: str,
    metric: float | None,
) -> None:
    """Every file of a checkpoint into ``folder``, each fsynced, the manifest last, then the folder."""
    files = {}
    for group, tdict in tensors.items():
        path = folder / f"{group}.safetensors"
        # safetensors stores values: detach, make contiguous, and copy tensors that share storage
        prepared, seen = {}, set()
        for name, t in tdict.items():
            t = t.detach().contiguous()
            where = (t.device, t.untyped_storage().data_ptr())
            prepared[name] = t.clone() if t.numel() and where in seen else t
            seen.add(where)
        # safetensors' I/O failures (a full disk: "No space left on device (os error 28)") come back as the
        # `OSError` they are, naming the file, so callers can tell a full disk from a bug
        try:
            save_file(prepared, path, metadata={"format": "pt"})
        except SafetensorError as e:
            code = _OS_ERROR_RE.search(str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
        give_normal_mode(path)  # safetensors writes 0600; its neighbours (state.json, MANIFEST.json) are 0644
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    state_bytes = state_text.encode("utf-8")
    _write_file_synced(folder / STATE_NAME, state_bytes)
    files[STATE_NAME] = {"size": len(state_bytes), "sha256": hashlib.sha256(state_bytes).hexdigest()}
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "metric": metric,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "slurm_job": os.environ.get("SLURM_JOB_ID") or None,  # a restart's own saves, with no clock compared
        "files": files,
    }
    manifest["sha256"] = manifest_digest(manifest)
    _write_file_synced(folder / MANIFEST_NAME, _dump_json(manifest, "manifest").encode("utf-8"))
    _fsync_dir(folder)


def _owner_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"
    return f"{os.getpid()}@{host}"


def _owner_is_alive(dir_name: str) -> bool:
    """True when a temp/trash dir (named ``....PID@HOST``) belongs to another live process on this host."""
    pid_str, _, host = dir_name.rsplit(".", 1)[-1].partition("@")
    if not pid_str.isdigit() or host != _owner_tag().partition("@")[2]:
        return False  # unknown or another host: a writer there would break the one-writer rule
    return int(pid_str) != os.getpid() and process_alive(int(pid_str))


def set_aside(path: Path, why: str) -> Path:
    """Move ``path`` (a checkpoint out of the ``step-*`` namespace, an earlier attempt's result file) to
    ``<name>.<why>-<time>``: kept for a human, never read, loaded or pruned."""
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    aside = path.with_name(f"{path.name}.{why}-{stamp}")
    os.rename(path, aside)
    _fsync_dir(path.parent)
    return aside


class CheckpointManager:
    """Saves, verifies, finds, loads and prunes checkpoints under ``run_dir/checkpoints/step-XXXXXXXX``.

    ``keep_last``: the newest intact checkpoints that survive pruning; ``keep_best``: also the best by
    ``metric`` (``best_mode`` max or min; ties go to the newer step); ``verify_hash``: readers' default for
    checking every file's sha256 on top of the always-on size, header and JSON checks.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        keep_last: int = 3,
        keep_best: bool = True,
        best_mode: MetricMode | str = "max",
        verify_hash: bool = True,
    ):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        try:
            self.best_mode = MetricMode(best_mode)
        except ValueError:
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}") from None
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS_SUBDIR
        self.keep_last, self.keep_best, self.verify_hash = keep_last, keep_best, verify_hash

    def path_for(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def _hidden(self, prefix: str, name: str) -> Path:
        """A temp or trash dir's path: out of the ``step-*`` namespace, named after its owner process."""
        return self.dir / f"{prefix}{name}.{secrets.token_hex(4)}.{_owner_tag()}"

    def step_dirs(self) -> list[Path]:
        """All ``step-*`` dirs, newest first, unverified."""
        if not self.dir.is_dir():
            return []
        found = [(STEP_DIR_RE.match(e.name), e) for e in self.dir.iterdir()]
        found = [(int(m.group(1)), e) for m, e in found if m and e.is_dir()]
        return [e for _, e in sorted(found, key=lambda sp: sp[0], reverse=True)]

    # ---- reading -----------------------------------------------------------------------
    def _verified(self, paths: Iterable[Path], verify_hash: bool | None, report: bool = True):
        verify = self.verify_hash if verify_hash is None else verify_hash
        for path in paths:
            try:
                yield verify_checkpoint(path, verify_hash=verify)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                if not path.exists():  # removed since listed: a running job pruned it (checkpoint.keep_last)
                    continue
                if report:
                    warnings.warn(f"{e}; skipped", CorruptCheckpointWarning, stacklevel=3)

    def list(self, verify_hash: bool | None = None) -> list[CheckpointInfo]:
        """Intact checkpoints, oldest first; broken ones are reported and left out."""
        return sorted(self._verified(self.step_dirs(), verify_hash), key=lambda i: i.step)

    def latest(self, verify_hash: bool | None = None) -> CheckpointInfo | None:
        """Newest intact checkpoint, falling back past broken ones (each reported), or None."""
        return next(iter(self._verified(self.step_dirs(), verify_hash)), None)

    def best(self, verify_hash: bool | None = None) -> CheckpointInfo | None:
        """Intact checkpoint with the best metric (ties: newer), or None if none has a metric."""
        ranked = [i for i in self._verified(self.step_dirs(), False) if i.metric is not None]
        ranked.sort(key=self._rank_key, reverse=True)
        return next(iter(self._verified([i.path for i in ranked], verify_hash)), None)

    def _rank_key(self, info: CheckpointInfo) -> tuple[float, int]:
        return self.best_mode.sign * info.metric, info.step

    def load(
        self,
        info_or_path: CheckpointInfo | str | os.PathLike,
        map_location: str | torch.device = "cpu",
        verify_hash: bool | None = None,
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """``(tensors by group, state)`` of a checkpoint; verifies it first."""
        verify = self.verify_hash if verify_hash is None else verify_hash
        return load_checkpoint(info_or_path, map_location, verify_hash=verify)

    # ---- writing -----------------------------------------------------------------------
    def save(
        self,
        step: int,
        tensors: Mapping[str, Mapping[str, torch.Tensor]],
        state: Mapping[str, Any],
        metric: float | None = None,
        exist_ok: bool = False,
        replace: bool = False,
        prune: bool = True,
    ) -> Path:
        """Write checkpoint ``step`` atomically, then prune (``prune=False``: the caller prunes later, e.g. once
        every run of a study has saved the same step) and clean up crashed saves.

        An intact checkpoint for ``step`` is never overwritten: ``CheckpointExistsError``; ``exist_ok=True``
        keeps it and returns its path (a preemption handler saving a step just saved); ``replace=True``
        writes the new one in full, then it takes the old one's place (readers see the old dir or the new
        one; a crash between the fallback's two renames leaves the older checkpoints to resume from).
        """
        state_text, metric = _checked_save(step, tensors, state, metric)
        final = self.path_for(step)
        swap = False
        if final.exists() or final.is_symlink():
            kept = self._resolve_existing(final, exist_ok or replace)
            if kept is not None and not replace:
                return kept
            swap = kept is not None
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.run_dir)
        tmp = self._hidden(_TEMP_PREFIX, final.name)
        os.mkdir(tmp)
        try:
            _write_checkpoint_files(tmp, step, tensors, state_text, metric)
            if swap:  # the old checkpoint goes under a trash name (cleaned up if a crash leaves it)
                replace_dir(tmp, final, self._hidden(_TRASH_PREFIX, final.name))
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.dir)
        if prune:
            self.prune(protect=(final,))
        self.clean_temp()
        return final

    def _resolve_existing(self, final: Path, exist_ok: bool) -> Path | None:
        """The intact checkpoint at ``final`` when it may be kept; None once a broken one is set aside."""
        try:
            verify_checkpoint(final, verify_hash=self.verify_hash)
        except CorruptCheckpointError as e:
            aside = set_aside(final, "corrupt")
            warnings.warn(
                f"{e}; moved it to {aside} and writing a new one", CorruptCheckpointWarning, stacklevel=3
            )
            return None
        if exist_ok:
            return final
        raise CheckpointExistsError(
            f"checkpoint {final} already exists and is intact; checkpoints are never overwritten. "
            f"Pass exist_ok=True to keep it, use another run_dir, or delete it by hand."
        )

    def prune(self, protect: Iterable[Path] = ()) -> list[Path]:
        """Delete intact checkpoints beyond the newest ``keep_last`` and the best.

        Broken dirs are never deleted: they do not count towards ``keep_last`` (cheap checks) and stay for a
        human to look at (a doomed dir is hashed too, unless ``verify_hash=False``). Each doomed dir is renamed
        out of the ``step-*`` namespace first, so a crash never leaves half a checkpoint. Returns the deleted
        paths.
        """
        intact = list(self._verified(self.step_dirs(), False, report=False))
        keep = {Path(p) for p in protect}
        keep.update(i.path for i in sorted(intact, key=lambda i: i.step, reverse=True)[: self.keep_last])
        ranked = [i for i in intact if i.metric is not None] if self.keep_best else []
        ranked.sort(key=self._rank_key, reverse=True)
        # the best is the one `best()` reads: past any whose hashes fail (kept anyway, as every broken dir)
        best = next(self._verified([i.path for i in ranked], None, report=False), None)
        if best is not None:
            keep.add(best.path)
        doomed = [i.path for i in intact if i.path not in keep]
        deleted = [i.path for i in self._verified(doomed, None, report=False)]
        for path in deleted:
            trash = self._hidden(_TRASH_PREFIX, path.name)
            os.rename(path, trash)
            _fsync_dir(self.dir)
            shutil.rmtree(trash, ignore_errors=True)
        return deleted

    def clean_temp(self) -> list[Path]:
        """Remove temp/trash dirs left by crashed saves or deletes (never those of a live writer)."""
        if not self.dir.is_dir():
            return []
        removed = [
            e
            for e in self.dir.iterdir()
            if e.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)) and not _owner_is_alive(e.name)
        ]
        for entry in removed:
            shutil.rmtree(entry, ignore_errors=True)
        return removed
