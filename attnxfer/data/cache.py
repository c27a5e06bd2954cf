"""Where converted datasets are cached, and how a cache file is written safely."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """``$ATTNXFER_CACHE`` if set, else ``$XDG_CACHE_HOME/attnxfer``, else ``~/.cache/attnxfer`` (a
    relative or empty ``XDG_CACHE_HOME`` is ignored, as the XDG spec says)."""
    env = os.environ.get("ATTNXFER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "attnxfer"


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
