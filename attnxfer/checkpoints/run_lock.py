"""One process owns a run directory: ``RUN_DIR/attnxfer.lock``, and plain words when a run dir cannot be written.

What was chosen, and why:

* **The lock is a file created with ``os.open(O_CREAT | O_EXCL)``.** Exclusive creation is atomic on local
  filesystems, on NFSv3 and later (the server decides) and on Lustre, the filesystems clusters put run
  directories on. ``flock``/``fcntl`` locks are not enough there: on NFS they depend on the lock daemon or
  the ``local_lock`` mount option (with which two hosts both "hold" the lock), on Lustre on the ``flock``
  mount option, and they vanish silently when the holder's host dies.
* **The file says who holds it**, as JSON: host, pid (and the pid's start time, so a reused pid is not
  mistaken for the holder), SLURM job id, command and start time. A second process refuses at once,
  naming the holder (`RunDirInUseError`, a `CheckpointError`: the CLI exits 2 with one ``error:`` line).
* **A heartbeat tells a dead holder from a live one across hosts**: the owner touches the file's mtime every
  `HEARTBEAT_S` seconds from a daemon thread. A lock is taken over when its holder is provably gone: on
  this host its pid is gone (or a zombie, or reused); on another host its heartbeat is older than
  `STALE_AFTER_S` (ten heartbeats: NFS attribute caches and clock skew stay far below that); or it belongs
  to this same SLURM job on another node (a requeued attempt of the same job: its old processes are gone).
  Taking over renames the stale file to a unique name (one contender wins the rename), checks that the
  renamed file is the one judged stale (else puts it back), deletes it, then creates a fresh lock.
* **Released** on normal exit and on error (the context manager), only if the file is still ours.
  A SIGKILLed holder leaves its file behind; the next run takes it over and says so.

`check_writable` and `disk_error` turn a full or read-only run dir into one message naming the path and the
newest intact checkpoint. `run_lock` applies `disk_error` to whatever its body raises, so every command that
holds a lock reports a full disk the same way. Readers (`attnxfer eval`, export, inspect) take no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PathExistsError
from ..run_layout import LOCK_NAME, STAGE_DIRS
from ..speak import say
from .processes import process_alive
from .store import CheckpointError, CheckpointManager

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

#: errors that mean "this directory cannot take more writes", not a bug
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class RunDirInUseError(CheckpointError):
    """Another live process holds the run directory's lock."""


class RunDirNotWritableError(CheckpointError):
    """The run directory is read-only, full or not ours: what was saved before is intact."""


# ------------------------------------------------------------------------------------ full / read-only


def last_checkpoint_note(run_dir: str | os.PathLike) -> str:
    """Where a run can resume from, in words: its newest intact checkpoint (a conversion's: stage 2's)."""
    run_dir = Path(run_dir)
    try:
        found = [
            CheckpointManager(d).latest(verify_hash=False)
            for d in (run_dir, *(run_dir / s for s in STAGE_DIRS))
        ]
    except Exception:  # a damaged or unreadable checkpoints dir: say nothing rather than guess
        return "its checkpoints could not be listed"
    info = next((i for i in reversed(found) if i is not None), None)
    if info is None:
        return "no checkpoint was saved in it yet"
    return f"last intact checkpoint: step {info.step} ({info.path})"


def disk_error(e: BaseException, run_dir: str | os.PathLike) -> RunDirNotWritableError | None:
    """``e`` as a one-line `RunDirNotWritableError` when it means the disk is full or read-only; else None."""
    if isinstance(e, RunDirNotWritableError):
        return e
    if not isinstance(e, OSError) or e.errno not in _DISK_ERRNOS:
        return None
    run_dir = Path(run_dir)
    where = e.filename or run_dir
    return RunDirNotWritableError(
        f"cannot write {where}: {e.strerror or os.strerror(e.errno)}. Nothing saved before was lost "
        f"({run_dir}: {last_checkpoint_note(run_dir)}); free space or make {run_dir} writable, then run the same command "
        "again to continue"
    )


def _raise_plainly(e: OSError, run_dir: Path) -> None:
    """Re-raise ``e``, as a `RunDirNotWritableError` when it is a disk error (call inside ``except``)."""
    plain = disk_error(e, run_dir)
    if plain is None:
        raise e
    raise plain from e


def check_writable(run_dir: str | os.PathLike, probe_bytes: int = 4096) -> None:
    """Create ``run_dir`` and write, fsync and delete a small probe file in it, so that a full or read-only
    run dir stops a command before it computes anything (`RunDirNotWritableError`)."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{secrets.token_hex(4)}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * probe_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # name the run dir, not the probe
        _raise_plainly(OSError(e.errno, e.strerror, str(run_dir)) if e.filename == str(probe) else e, run_dir)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# ------------------------------------------------------------------------------------------- the lock


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_gone(pid: int, started: str | None) -> bool:
    """True when process ``pid`` of this host is provably not the one that took the lock: it is not alive,
    or the pid now belongs to a process started at another time."""
    if not process_alive(pid):
        return True
    now = _start_time(pid)
    return started is not None and now is not None and now != started


def _slurm_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or None


@dataclass
class _Holder:
    content: dict[str, Any]
    age_s: float  # since the last heartbeat (the file's mtime)

    @property
    def host(self) -> str:
        return str(self.content.get("host", "?"))

    @property
    def pid(self) -> int | None:
        pid = self.content.get("pid")
        return pid if isinstance(pid, int) else None

    def describe(self) -> str:
        c = self.content
        if not c:
            return f"unknown holder (an empty or unreadable lock file; last touched {self.age_s:.0f} s ago)"
        job = f", SLURM job {c['slurm_job']}" if c.get("slurm_job") else ""
        return (
            f"`attnxfer {c.get('command', '?')}` on host {self.host}, pid {self.pid}{job}, started "
            f"{c.get('started', '?')} (heartbeat {self.age_s:.0f} s ago)"
        )

    def why_dead(self, stale_after_s: float) -> str | None:
        """Why the holder is provably gone (None: it may be alive)."""
        if not self.content:
            return (
                f"its lock file is unreadable and {self.age_s:.0f} s old"
                if self.age_s > stale_after_s
                else None
            )
        if self.host == socket.gethostname():
            if self.pid == os.getpid():  # this process, or an earlier one that had our pid (a container)
                return (
                    None if self.content.get("token") in _OWN_TOKENS else "an earlier process with this pid"
                )
            if self.pid is not None and _pid_gone(self.pid, self.content.get("pid_started")):
                return f"process {self.pid} on this host is gone"
            return None
        job = self.content.get("slurm_job")
        if job and job == _slurm_job():
            return f"it belongs to this same SLURM job {job} (a requeued attempt), run earlier on host {self.host}"
        if self.age_s > stale_after_s:
            return f"its heartbeat stopped {self.age_s:.0f} s ago (more than {stale_after_s:.0f} s)"
        return None


def _read(path: Path) -> _Holder | None:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = {}
    return _Holder(content if isinstance(content, dict) else {}, max(0.0, time.time() - st.st_mtime))


def _create(path: Path, content: dict[str, Any]) -> bool:
    """Create the lock file holding ``content``; False when it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        data = json.dumps(content, indent=1).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    return True


def _take_over(path: Path, stale: _Holder) -> bool:
    """Remove the stale lock ``stale`` was read from; False if another process got there first."""
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read(aside)
    if moved is None or moved.content != stale.content:  # we moved a newer, live lock: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        with contextlib.suppress(OSError):
            aside.unlink()
        return False
    aside.unlink(missing_ok=True)
    return True


#: locks this process holds: (resolved path, thread) -> [token, depth] (a nested acquire in one thread is fine)
_HELD: dict[tuple[str, int], list] = {}
#: tokens of the locks this process holds or is creating (another thread's lock is a live holder's)
_OWN_TOKENS: set[str] = set()
_HELD_GUARD = threading.Lock()


def _heartbeat(path: Path, token: str, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        holder = _read(path)
        if holder is None or holder.content.get("token") != token:
            return  # taken over by someone who judged us dead: nothing of ours to refresh
        with contextlib.suppress(OSError):
            os.utime(path)


def _acquire(path: Path, content: dict[str, Any], stale_after_s: float) -> None:
    run_dir = path.parent
    for _ in range(50):  # contenders racing over a stale lock: a few rounds settle it
        if _create(path, content):
            return
        holder = _read(path)
        if holder is None:
            continue  # released between our two calls
        if not holder.content and holder.age_s < 5:
            time.sleep(0.1)  # created an instant ago: its holder is writing who it is
            continue
        why = holder.why_dead(stale_after_s)
        if why is None:
            job = holder.content.get("slurm_job")
            stop = f"kill {holder.pid}" + (f" or scancel {job}" if job else "")
            raise RunDirInUseError(
                f"{run_dir} is in use by {holder.describe()}. One process writes a run directory: wait for it "
                f"to finish, or stop it ({stop}) and run this command again to continue the run; for a "
                f"separate run choose another run_dir=. If no such process exists any more, delete {path}"
            )
        if _take_over(path, holder):
            say(f"{run_dir}: taking over the lock of {holder.describe()}: {why}")
    raise RunDirInUseError(f"{run_dir}: could not take its lock ({path}) after 50 tries; try again")


@contextlib.contextmanager
def run_lock(
    run_dir: str | os.PathLike,
    command: str,
    *,
    enabled: bool = True,
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
) -> Iterator[None]:
    """Hold ``RUN_DIR/attnxfer.lock`` while the body runs (see the module docstring for how and why).

    ``enabled=False`` (ranks other than 0: they write nothing) only reports disk errors. A full or read-only
    run dir, at the start or inside the body, becomes a `RunDirNotWritableError` naming the path and the
    newest intact checkpoint; a run dir held by a live process, a `RunDirInUseError` naming the holder.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PathExistsError(f"run_dir={run_dir} is a file, not a directory; choose another run_dir")
    if not enabled:
        with _plain_disk_errors(run_dir):
            yield
        return
    path = run_dir / LOCK_NAME
    created = not run_dir.exists()  # removed again if the command ends leaving it empty (refused input)
    with _plain_disk_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        key = (
            str(path.resolve()),
            threading.get_ident(),
        )  # nesting is per thread: another thread is a holder
    held = _nested_hold(key)
    if held is not None:  # nested: this process holds it already
        try:
            yield
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    token = _hold(path, key, command, stale_after_s)
    try:
        with _heartbeat_thread(path, token, heartbeat_s), _plain_disk_errors(run_dir):
            yield
    finally:
        _release(path, key, token, remove_dir=created)


@contextlib.contextmanager
def _plain_disk_errors(run_dir: Path) -> Iterator[None]:
    """A disk error (full, read-only) raised in the body as one `RunDirNotWritableError` naming the run dir."""
    try:
        yield
    except OSError as e:
        _raise_plainly(e, run_dir)


def _nested_hold(key: tuple[str, int]) -> list | None:
    """This thread's hold of the lock (its depth counted up once more), or None when it holds none."""
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    return held


def _hold(path: Path, key: tuple[str, int], command: str, stale_after_s: float) -> str:
    """Take the lock for this process (saying who holds it), or raise; returns the lock's token."""
    token = secrets.token_hex(8)
    content = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _start_time(os.getpid()),
        "slurm_job": _slurm_job(),
        "command": command,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "token": token,
    }
    _OWN_TOKENS.add(token)
    try:
        _acquire(path, content, stale_after_s)
    except OSError as e:
        _OWN_TOKENS.discard(token)
        _raise_plainly(e, path.parent)
    except BaseException:
        _OWN_TOKENS.discard(token)
        raise
    with _HELD_GUARD:
        _HELD[key] = [token, 1]
    return token


@contextlib.contextmanager
def _heartbeat_thread(path: Path, token: str, every: float) -> Iterator[None]:
    """Touch the lock every ``every`` seconds from a daemon thread while the body runs."""
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(path, token, stop, every), name="attnxfer-run-lock", daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()


def _release(path: Path, key: tuple[str, int], token: str, *, remove_dir: bool) -> None:
    """Forget the hold and delete the lock file if it is still ours; remove the run dir if this command
    created it and left it empty."""
    with _HELD_GUARD:
        _HELD.pop(key, None)
    _OWN_TOKENS.discard(token)
    holder = _read(path)
    if holder is not None and holder.content.get("token") == token:
        with contextlib.suppress(OSError):
            path.unlink()
    if remove_dir:
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only if empty
