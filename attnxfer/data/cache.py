"""Where converted datasets are cached, and how a cache file is written safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "save_npz_atomic"]


def cache_dir() -> Path:
    """``$ATTNXFER_CACHE`` if set, else ``~/.cache/attnxfer``."""
    env = os.environ.get("ATTNXFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnxfer"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz via temp file + fsync + rename, so concurrent ranks never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
