"""Atomic, durable single-file writes (a temporary sibling, fsync, rename, fsync of the folder): what the
checkpoint store and every app writing a run's files use, so that a crash leaves the old file or the new
one, never a torn one."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    """Persist a dir's entries (a rename or a new file). Some filesystems refuse; that is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    libc or the filesystem cannot (older kernels, some network filesystems)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)
    at_fdcwd = -100
    return fn is not None and fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _write_file_synced(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Create ``path`` (must not exist) with ``mode`` less the umask, write ``data``, fsync; a failed write
    leaves no file behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain ``open(path, "w")`` would (0o666 less the umask: 0644 as a rule). Writers
    that go through a private temporary file (safetensors writes 0600) leave it readable by its owner only,
    unlike the files beside it."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix (a temp file in
    the same dir, fsync, ``os.replace``, fsync of the dir)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"atomic_write: {path} is a directory; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        with contextlib.suppress(FileExistsError):
            _write_file_synced(tmp, bytes(data))  # a failed write leaves no temp file
            break
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``atomic_write_bytes`` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def _find_non_str_key(obj: Any, path: str = "") -> str | None:
    """json.dumps turns int keys into strings silently; a resumed run would then miss them."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        where = f"{path}[{k!r}]" if isinstance(obj, dict) else f"{path}[{k}]"
        if isinstance(obj, dict) and not isinstance(k, str):
            return where
        found = _find_non_str_key(v, where)
        if found:
            return found
    return None


def _dump_json(obj: Any, what: str) -> str:
    bad_key = _find_non_str_key(obj)
    if bad_key:
        raise TypeError(
            f"{what} has a non-str dict key at {bad_key}; JSON would turn it into a str. "
            f"Use str keys (or state_dict_to_tensors for nested state dicts)"
        )
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{what} must be JSON-serialisable (dicts with str keys, lists, str, int, finite float, "
            f"bool, None); convert tensors/paths/dataclasses/NaN first: {e}"
        ) from e


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (no NaN/inf), indented, written atomically."""
    return atomic_write_text(path, _dump_json(obj, f"content for {path}"))


def replace_dir(
    new: str | os.PathLike, final: str | os.PathLike, old: str | os.PathLike | None = None
) -> None:
    """Put the complete folder ``new`` at ``final`` in one step (readers see the old folder or the new one,
    never a mix), then delete the old one (where the filesystem cannot exchange two names, it is first renamed
    to ``old``, by default a hidden sibling). Both must be on one filesystem (``new`` beside ``final``)."""
    new, final, gone = Path(new), Path(final), None
    if not final.exists():
        os.rename(new, final)
    elif _exchange(new, final):
        gone = new  # the exchange left the old folder under the new one's name
    else:
        gone = Path(old) if old else final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
        os.rename(final, gone)
        os.rename(new, final)
    _fsync_dir(final.parent)
    if gone is not None:
        shutil.rmtree(gone, ignore_errors=True)
