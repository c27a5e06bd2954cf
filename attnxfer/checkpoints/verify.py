"""One checkpoint dir read back: nothing in it is trusted before its manifest (written last: size and sha256
of every other file) is checked against the files, and nothing is ever unpickled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import UserError
from ..run_layout import MANIFEST_NAME, STATE_NAME
from ..sources.resolve import sha256_file

CHECKPOINT_FORMAT = "attnxfer.checkpoint/1"
STEP_DIR_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """Base class for checkpoint problems."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint dir fails verification; ``path`` and ``problem`` say where and what."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path} is not usable: {problem}")


class CheckpointExistsError(CheckpointError, FileExistsError):
    """An intact checkpoint already exists for this step; it is never overwritten."""


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint was skipped because it failed verification."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint dir that passed verification."""

    step: int
    path: Path
    metric: float | None
    created: str
    files: Mapping[str, Mapping[str, Any]]  # file name -> {'size': int, 'sha256': str}
    hash_verified: bool
    #: what ``metric`` is: the name the run ranks by (its state's ``best_metric``); None: not recorded
    metric_name: str | None = None

    @property
    def groups(self) -> list[str]:
        """Tensor group names ('model', 'optimizer', ...)."""
        return [n[: -len(".safetensors")] for n in self.files if n.endswith(".safetensors")]

    def __str__(self) -> str:
        if self.metric is None:
            metric = ""
        elif self.metric_name:
            metric = f" ({metric_words(self.metric_name, self.metric)})"
        else:
            metric = f", metric={self.metric:g}"
        return f"checkpoint step {self.step}{metric} at {self.path}"


def metric_words(name: str, value: float) -> str:
    """A ranking metric as eval and export say it: ``val top-1 70.00``, ``EMA val top-1 70.00``, ``val loss
    2.272``, else its name (``feat_cos_patch 0.9132``, ``EMA feat_cos_patch 0.9132``)."""
    if name in ("val_top1", "ema_val_top1"):
        return f"{'EMA ' * name.startswith('ema_')}val top-1 {value:.2f}"
    if name == "val_loss":
        return f"val loss {value:.4g}"
    return f"{name.replace('ema_val_', 'EMA ').removeprefix('val_')} {value:.4g}"


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's entries but its own (``sha256``), as sorted-key JSON: what its own entry holds, so
    a changed byte in its metric or step is caught as one in a listed file is (older manifests hold none)."""
    entries = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest()


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise CorruptCheckpointError(path, "not a directory")
    if not manifest_path.is_file():
        raise CorruptCheckpointError(path, f"{MANIFEST_NAME} is missing (save never finished?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(path, f"{MANIFEST_NAME} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCheckpointError(
            path, f"{MANIFEST_NAME} has no 'format': '{CHECKPOINT_FORMAT}' (not an attnxfer checkpoint?)"
        )
    if "sha256" in manifest and manifest["sha256"] != manifest_digest(manifest):
        raise CorruptCheckpointError(path, f"{MANIFEST_NAME} does not match its own sha256 (changed since)")
    files = manifest.get("files")
    step = manifest.get("step")
    if not isinstance(files, dict) or STATE_NAME not in files or not isinstance(step, int):
        raise CorruptCheckpointError(path, f"{MANIFEST_NAME} lacks step/files/{STATE_NAME} entries")
    for name, entry in files.items():
        if (
            not isinstance(name, str)
            or "/" in name
            or name.startswith(".")
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CorruptCheckpointError(path, f"{MANIFEST_NAME} has a malformed entry for {name!r}")
    return manifest


def _check_file(path: Path, name: str, entry: Mapping[str, Any], verify_hash: bool) -> Any:
    """Check one listed file; a JSON file's parsed content is returned (None for others)."""
    parsed = None
    file_path = path / name
    if not file_path.is_file():
        raise CorruptCheckpointError(path, f"{name} is missing")
    size = file_path.stat().st_size
    if size != entry["size"]:
        raise CorruptCheckpointError(path, f"{name} has {size} bytes, manifest says {entry['size']}")
    if name.endswith(".safetensors"):
        try:
            with safe_open(file_path, framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise CorruptCheckpointError(path, f"{name} is not valid safetensors: {e}") from e
    elif name.endswith(".json"):
        try:
            parsed = json.loads(file_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(path, f"{name} is not valid JSON: {e}") from e
    if verify_hash:
        digest = sha256_file(file_path)
        if digest != entry["sha256"]:
            raise CorruptCheckpointError(
                path, f"{name} sha256 is {digest[:12]}..., manifest says {entry['sha256'][:12]}..."
            )
    return parsed


def verify_checkpoint(path: str | os.PathLike, verify_hash: bool = True) -> CheckpointInfo:
    """Check one checkpoint dir (the manifest well formed; every listed file present with its size, every
    header and JSON parsing, every sha256 matching with ``verify_hash``); its info, or ``CorruptCheckpointError``."""
    path = Path(path)
    manifest = _read_manifest(path)
    match = STEP_DIR_RE.match(path.name)
    if match and int(match.group(1)) != manifest["step"]:
        raise CorruptCheckpointError(
            path, f"dir name says step {int(match.group(1))}, manifest says {manifest['step']}"
        )
    parsed = {name: _check_file(path, name, entry, verify_hash) for name, entry in manifest["files"].items()}
    metric, state = manifest.get("metric"), parsed.get(STATE_NAME)
    metric_name = state.get("best_metric") if isinstance(state, dict) else None
    return CheckpointInfo(
        step=manifest["step"],
        path=path,
        metric=None if metric is None else float(metric),
        created=str(manifest.get("created", "")),
        files=manifest["files"],
        hash_verified=verify_hash,
        metric_name=metric_name if isinstance(metric_name, str) else None,
    )


def load_checkpoint(
    info_or_path: CheckpointInfo | str | os.PathLike,
    map_location: str | torch.device = "cpu",
    verify_hash: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verify, then load ``(tensors by group, state)`` from a checkpoint dir (again for a ``CheckpointInfo``:
    the files may have changed since)."""
    path = info_or_path.path if isinstance(info_or_path, CheckpointInfo) else Path(info_or_path)
    info = verify_checkpoint(path, verify_hash=verify_hash)
    device = str(torch.device(map_location))
    tensors = {group: load_file(path / f"{group}.safetensors", device=device) for group in info.groups}
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    return tensors, state
