"""One process owns a run directory (``RUN_DIR/attnxfer.lock``), and plain words when one cannot be written.

* The lock is a file created with ``O_CREAT | O_EXCL``: atomic on local filesystems, NFSv3+ and Lustre,
  where clusters put run dirs. ``flock``/``fcntl`` are not enough there: on NFS they depend on the lock
  daemon or ``local_lock`` (two hosts both "hold" it), on Lustre on the ``flock`` mount option, and they
  vanish silently when the holder's host dies.
* The file says who holds it (host, pid and the pid's start time, so a reused pid is not mistaken for the
  holder, SLURM job, command, start): a second process refuses at once naming the holder
  (`RunDirInUseError`: the CLI's one ``error:`` line).
* A heartbeat (the owner touches the file every `HEARTBEAT_S` s) tells a dead holder from a live one across
  hosts. A lock is taken over when its holder is provably gone: on this host its pid is gone (a zombie, or
  reused); on another its heartbeat is older than `STALE_AFTER_S` (ten beats: far above NFS attribute caches
  and clock skew); or it is an earlier attempt of this same SLURM job (a requeue: ``SLURM_RESTART_COUNT``,
  recorded in the file, differs from ours). Another step or task of the same attempt is judged by its heartbeat
  like any other holder (two ``srun`` steps of one job on one run dir would both write it), unless SLURM says
  its step has ended (``squeue``; a step SIGKILLed on another node, then ``srun`` again). A holder of another
  SLURM job (a job resubmitted after its node died) is gone once ``squeue`` of its cluster (recorded in the
  file) says that job has ended: a final state, or no longer listed where the job is this user's and
  ``squeue`` lists this process's own job of that cluster. A lock written
  without the attempt (by an older attnxfer) is taken as an earlier attempt's, as it was then, so its run
  folder still resumes. Taking over renames the file to a unique name (one contender wins), checks it is the
  one judged stale (else puts it back), then deletes it.
* Released on exit and on error, only if still ours; a SIGKILLed holder's file is taken over next time.
* A folder holds one kind of work (a study, a conversion, a search, a training run): a command that does not write that
  kind is refused before it writes, since its files would hide the work from export, inspect and resume.

`check_writable` and `disk_error` turn a full or read-only run dir into one message naming the path and the
newest intact checkpoint; `run_lock` applies `disk_error` to its body. Readers (eval, export, inspect) take
no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError, MissingPathError, PathExistsError
from ..run_layout import (
    CHECKPOINTS_SUBDIR,
    EXPORTED_MODEL,
    LOCK_NAME,
    PICTURES_DIR,
    RUN_CONFIG,
    RUN_DIR_MARKERS,
    RUN_RECORD,
    SEARCH_CANDIDATES,
    STAGE_DIRS,
    STUDY_RECORD,
    STUDY_YAML,
    SWEEP_POINT,
    SWEEP_RECORD,
    TENSORBOARD_DIR,
    is_exported_model,
    read_record,
)
from ..speak import debug, say
from .atomic_io import _write_file_synced
from .processes import process_alive
from .store import CheckpointError, CheckpointInfo, CheckpointManager

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
#: how long ``squeue`` may take to say which steps or jobs run (past it: the heartbeat decides)
SQUEUE_TIMEOUT_S = 10.0
#: a job's states (squeue's State) once all its processes are gone; COMPLETING is not one (a step may still be
#: saving after its SIGTERM), nor PENDING, REQUEUED or SUSPENDED (a job that will run, or runs, again)
_ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)

#: errors that mean "this directory cannot take more writes", not a bug
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

#: the work a run dir may hold, by the file that marks it (the first found counts), and how it goes on
_WORK = (
    ("study", STUDY_RECORD, f"attnxfer study -c {{dir}}/{STUDY_YAML}"),
    *(("conversion", stage, f"attnxfer convert -c {{dir}}/{RUN_CONFIG}") for stage in reversed(STAGE_DIRS)),
    ("search", SEARCH_CANDIDATES, "the attnxfer search command that started it"),
    ("training run", RUN_RECORD, f"the command that trained it, -c {{dir}}/{RUN_CONFIG}"),
    ("sweep", SWEEP_RECORD, "the attnxfer submit --sweep command that started it"),
)
#: the work each command's own folder holds; train's and pretrain's, a training run (as a study's students:
#: `run_lock`'s ``writes``)
_WRITES = {"study": "study", "convert": "conversion", "search": "search"}


def _sweep_held(run_dir: Path) -> tuple[str, str, str] | None:
    """A sweep's folder submitted before its record (`SWEEP_RECORD`), told by a point folder (``000_KEY=VALUE``)
    holding a run's files (`_WORK`'s form; None where there is no such point)."""
    try:
        children = sorted(run_dir.iterdir())
    except OSError:  # not made yet, or not a folder (refused elsewhere)
        return None
    for child in children:
        if (
            SWEEP_POINT.match(child.name)
            and child.is_dir()
            and any((child / m).exists() for m in RUN_DIR_MARKERS)
        ):
            return "sweep", f"{child.name}/", "the attnxfer submit --sweep command that started it"
    return None


def refuse_other_work(run_dir: str | os.PathLike, command: str, writes: str | None = None) -> None:
    """A folder holds one kind of work: another command's files beside it would hide that work from export,
    inspect and resume (a run.json in a conversion's folder would stand for its final student). ``writes``:
    the work ``command`` writes there (default: its own folder's). Checked by `run_lock`, and by ``attnxfer
    submit`` before it submits anything."""
    run_dir = Path(run_dir)
    if is_exported_model(run_dir):  # a model, maybe a teacher: a run's files would mix with its own
        raise PathExistsError(
            f"run_dir={run_dir} holds an exported model ({', '.join(EXPORTED_MODEL)}), which attnxfer "
            f"{command} does not write into (it reads it as local-dir:{run_dir}); choose another run_dir"
        )

    if (inside := _in_a_runs_own_folder(run_dir)) is not None:  # its run would prune or overwrite this work
        raise PathExistsError(f"run_dir={run_dir} is {inside} (and prunes); choose another run_dir")

    def refusal(held: str, how: str, then: str = "") -> PathExistsError:
        return PathExistsError(
            f"run_dir={run_dir} {held}, which attnxfer {command} does not write into: continue it with {how}, "
            f"or choose another run_dir{then}"
        )

    conversion = run_dir.parent  # its stage 1 holds checkpoints alone: any other work there would pass for it
    if (
        run_dir.name == STAGE_DIRS[0]
        and (conversion / RUN_CONFIG).is_file()
        and not (conversion / RUN_RECORD).exists()
    ):
        raise refusal(f"is stage 1 of the conversion {conversion}", _WORK[1][2].format(dir=conversion))
    held = next((work for work in _WORK if (run_dir / work[1]).exists()), None) or _sweep_held(run_dir)
    if held is not None and held[0] != (writes or _WRITES.get(command, "training run")):
        what, marker, how = held
        raise refusal(f"holds a {what} ({marker})", how.format(dir=run_dir))
    mae = held is not None and read_record(run_dir / RUN_RECORD).get("objective") == "mae"
    if held is None and (run_dir / CHECKPOINTS_SUBDIR).is_dir():
        # a run whose run.json is gone: the sections of its config.yaml say which command wrote it (mae: only
        # pretrain's, transfer: only train's), else the other command's resume would take it for its own
        with contextlib.suppress(OSError, ValueError, yaml.YAMLError):
            sections = yaml.safe_load((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
            if isinstance(sections, dict) and ({"mae", "transfer"} & set(sections)):
                held, mae = ("training run", RUN_CONFIG, ""), "mae" in sections
    if command in ("train", "pretrain") and held is not None and mae != (command == "pretrain"):
        # the two write the same files: a resume would compare configs, and load one's weights as the other's
        how = f"attnxfer {'pretrain' if mae else 'train'} -c {run_dir / RUN_CONFIG}"
        said = f"holds {'an MAE pre-training' if mae else 'a training'} run ({held[1]})"
        tune = f"; to fine-tune its encoder: attnxfer export {run_dir} OUT, then model.init=local-dir:OUT"
        raise refusal(said, how, tune if mae else "")


class RunDirInUseError(CheckpointError):
    """Another live process holds the run directory's lock."""


class RunDirNotWritableError(CheckpointError):
    """The run directory is read-only, full or not ours: what was saved before is intact."""


def newest_checkpoint(run_dir: str | os.PathLike) -> CheckpointInfo | None:
    """Where a run resumes from: its newest intact checkpoint (a conversion's: stage 2's, else stage 1's);
    None where none was saved."""
    run_dir = Path(run_dir)
    folders = (*(run_dir / s for s in reversed(STAGE_DIRS)), run_dir)
    return next(filter(None, (CheckpointManager(d).latest(verify_hash=False) for d in folders)), None)


def last_checkpoint_note(run_dir: str | os.PathLike) -> str:
    """Where a run can resume from, in words (`newest_checkpoint`)."""
    try:
        info = newest_checkpoint(run_dir)
    except Exception:  # a damaged or unreadable checkpoints dir: say nothing rather than guess
        return "its checkpoints could not be listed"
    if info is None:
        return "no checkpoint was saved yet"
    # a search's checkpoints hold generations
    unit = "generation" if (Path(run_dir) / SEARCH_CANDIDATES).exists() else "step"
    return f"last intact checkpoint: {unit} {info.step} ({info.path})"


def disk_error(e: BaseException, run_dir: str | os.PathLike) -> RunDirNotWritableError | None:
    """``e`` as a one-line `RunDirNotWritableError` when it means the disk is full or read-only; else None."""
    if isinstance(e, RunDirNotWritableError):
        return e
    if not isinstance(e, OSError) or e.errno not in _DISK_ERRNOS:
        return None
    run_dir = Path(run_dir)
    where = os.fsdecode(e.filename) if e.filename else run_dir
    # a new run's folder that could not be made: the folder above it is the one to make writable
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), run_dir)
    return RunDirNotWritableError(
        f"cannot write {where}: {e.strerror or os.strerror(e.errno)}. Nothing saved before was lost "
        f"({run_dir}: {last_checkpoint_note(run_dir)}); free space or make {existing} writable, then run the same "
        "command again to continue"
    )


def _raise_plainly(e: OSError, run_dir: Path) -> None:
    """Re-raise ``e``, as a `RunDirNotWritableError` when it is a disk error (call inside ``except``)."""
    plain = disk_error(e, run_dir)
    if plain is None:
        raise e
    raise plain from e


def in_run_folder(folder: str | os.PathLike) -> str | None:
    """What of a run ``folder`` is where an output written there would mix with the run's files (export's
    and inspect's ``OUT``): a run's own folder (a conversion's stage too), or one its run writes into
    (checkpoints/, tb/, pictures/); None for any other (a run's export/, a folder of the user's beside its files)."""
    marker = next((m for m in RUN_DIR_MARKERS if (Path(folder) / m).exists()), None)
    if marker:
        return f"a run's folder (it holds {marker})"
    return _in_a_runs_own_folder(folder)


def _in_a_runs_own_folder(folder: str | os.PathLike) -> str | None:
    """Where ``folder`` is in (or is) a folder a run writes into and prunes (checkpoints/, tb/, pictures/)."""
    owned = (CHECKPOINTS_SUBDIR, TENSORBOARD_DIR, PICTURES_DIR)
    folder = Path(os.path.abspath(folder))  # ``..`` folded, links kept: the names the user gave
    for part in (p for p in (folder, *folder.parents) if p.name in owned):
        # a run's own files beside it, not the folder's name (a checkpoints/ marks nothing itself: users keep
        # their runs under $SCRATCH/checkpoints/), or checkpoints of a run there
        beside = (m for m in (*RUN_DIR_MARKERS, RUN_CONFIG) if m != CHECKPOINTS_SUBDIR)
        saved = any((part.parent / CHECKPOINTS_SUBDIR).glob("step-*"))
        if saved or any((part.parent / m).exists() for m in beside):
            return f"in {part.parent}'s {part.name}/, which its run writes into"
    return None


def refuse_file_in_the_way(folder: str | os.PathLike, name: str, what: str | None = None) -> None:
    """Refuse a folder to write into that is a file, or lies under one (``run_dir=cfg.yaml/run``) or under a
    link to nothing (scratch space not made on this node), before anything is computed: the ``mkdir`` would
    fail with a traceback only once the work is done. ``what``: the folder in words where the key ``name``
    chooses it without naming it (tensorboard's, in run_dir)."""
    folder = Path(folder)
    link = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:
        raise MissingPathError(
            f"{what or f'{name}={folder}'}: {link} links to {os.readlink(link)}, which does not exist: make that "
            "folder, or remove the link"
        )
    file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        where = "is a file" if file == folder else f"cannot be made: {file} is a file"
        raise PathExistsError(f"{what or f'{name}={folder}'} {where}, not a directory; choose another {name}")


def refuse_unwritable(folder: str | os.PathLike, name: str, what: str | None = None) -> None:
    """Refuse an output folder this process cannot write (read-only, another user's, under /proc) before any
    work, by a probe folder made and removed in it or in its nearest existing parent (the folder is not
    made): the command's own mkdir would fail with a traceback once the work is done. ``what``: as
    `refuse_file_in_the_way`'s."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as e:
        raise PathExistsError(
            f"{what or f'{name}={folder}'} cannot be written ({existing}: {e.strerror}); choose another "
            f"{name}, or make {existing} writable"
        ) from None


def claim_new_file(file: Path, what: str) -> None:
    """Create ``file`` empty, or refuse where it exists: an output folder found free before long work (an
    export, an inspection) may since hold another process's files, which a plain move would replace."""
    try:
        _write_file_synced(file, b"")
    except FileExistsError:
        raise PathExistsError(
            f"{file.parent} was written by another {what} meanwhile (its {file.name}); nothing of it was "
            "replaced: choose another folder, or pass --overwrite to replace it"
        ) from None


def check_writable(run_dir: str | os.PathLike) -> None:
    """Create ``run_dir`` and write, fsync and delete a small probe file in it, so that a full or read-only
    run dir stops a command before it computes anything (`RunDirNotWritableError`)."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{secrets.token_hex(4)}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_file_synced(probe, b"\0" * 4096, 0o600)
    except OSError as e:  # name the run dir, not the probe
        _raise_plainly(OSError(e.errno, e.strerror, str(run_dir)) if e.filename == str(probe) else e, run_dir)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def slurm_restart_count() -> int:
    """Which attempt of its SLURM job this process is: ``SLURM_RESTART_COUNT`` (SLURM sets it from the first
    requeue on, every requeue adds one; unset, or outside SLURM: 0)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _squeue(*query: str) -> str | None:
    """What ``squeue --noheader QUERY`` prints; None where it could not be asked (not installed, no
    controller, too slow)."""
    try:
        done = subprocess.run(
            ["squeue", "--noheader", *query], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _step_ended(job: str, step: str) -> bool:
    """Whether SLURM says step ``step`` of ``job`` (this process's own job) runs no more. False wherever
    that is not certain: squeue failed, or its answer does not show this process's own step (squeue lists
    no step for a job it does not know, as under another cluster's SLURM_CONF)."""
    ours = os.environ.get("SLURM_STEP_ID") or "batch"  # the batch script itself runs in step "batch"
    listed = _squeue("--steps", "--jobs", job, "--format", "%i") or ""
    # the ids of the steps running (0, 1, batch): JOB.STEP, ARRAYJOB_TASK.STEP for an array's task,
    # JOB.STEP+COMPONENT for a heterogeneous step
    running = {line.rsplit(".", 1)[1].split("+")[0] for line in listed.split() if "." in line}
    return ours in running and step not in running


def _job_ended(job: str, cluster: str, mine: bool) -> str | None:
    """How SLURM says job ``job`` of ``cluster`` (not this process's job) has ended, in words; None wherever
    that is not certain: squeue failed, it answers for another cluster (the same id there is another job), or
    the job is pending, running, suspended, requeued or completing. A job squeue does not list has ended only
    where the answer lists this process's own job, of that cluster (so not outside a job), and the job is
    ``mine`` (this user's: SLURM may hide other users' jobs, PrivateData=jobs)."""
    ours = os.environ.get("SLURM_JOB_ID")
    # JobID: the job's own id, an array task's too (%i gives ARRAYJOB_TASK); --states all: ended jobs as well
    listed = _squeue(
        "--states", "all", "--jobs", f"{ours},{job}" if ours else job, "--Format", "JobID:|,State:|,Cluster:|"
    )
    rows = {
        r[0]: (r[1], r[2]) for r in (line.split("|") for line in (listed or "").splitlines()) if len(r) > 3
    }
    if job in rows:
        state, where = rows[job]
        return f"squeue: {state}" if where == cluster and state in _ENDED_STATES else None
    return "squeue lists it no more" if mine and ours in rows and rows[ours][1] == cluster else None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass
class _Holder:
    content: dict[str, Any]
    age_s: float  # since the last heartbeat (the file's mtime)
    owner: int | None = None  # the lock file's user id

    def __post_init__(self) -> None:
        self.host, pid = str(self.content.get("host", "?")), self.content.get("pid")
        self.pid = pid if isinstance(pid, int) else None

    def describe(self) -> str:
        c = self.content
        if not c:
            return f"unknown holder (an empty or unreadable lock file; last touched {self.age_s:.0f} s ago)"
        pid = f", pid {self.pid}" if self.pid is not None else ""
        step = f".{c['slurm_step']}" if c.get("slurm_step") is not None else ""  # SLURM's JOB.STEP
        task = f" task {c['slurm_task']}" if c.get("slurm_task") is not None else ""
        job = f", SLURM job {c['slurm_job']}{step}{task}" if c.get("slurm_job") else ""
        return (
            f"`attnxfer {c.get('command', '?')}` on host {self.host}{pid}{job}, started {c.get('started', '?')} "
            f"(heartbeat {self.age_s:.0f} s ago)"
        )

    @property
    def ours(self) -> bool:
        """Whether this process holds it: a run that exports its own weights once it has trained them."""
        return self.content.get("token") in _OWN_TOKENS

    def in_use(self, path: Path) -> RunDirInUseError:
        """The refusal of the run dir whose lock file ``path`` this live holder holds (`run_lock`'s, and
        ``attnxfer submit``'s before the queue's wait)."""
        job, step = self.content.get("slurm_job"), self.content.get("slurm_step")
        if job and step is not None and job == os.environ.get("SLURM_JOB_ID"):
            job = f"{job}.{step}"  # a step of this very job: scancel JOB would end this command's job too
        # a lock that names no process (empty, or written by hand) has no kill to advise
        # a pid is killed on its own host: from another, `kill` would reach some other process or none
        here = self.host == socket.gethostname()
        kill = f"kill {self.pid}" if here else f"kill {self.pid} on {self.host}"
        stops = [kill] * (self.pid is not None and (here or not job)) + [f"scancel {job}"] * bool(job)
        stop = f", or stop it ({' or '.join(stops)}) and run this command again to continue the run"
        return RunDirInUseError(
            f"{path.parent} is in use by {self.describe()}. One process writes a run directory: wait for it "
            f"to finish{stop if stops else ''}; for a separate run choose another run_dir=. If no such "
            f"process exists any more, delete {path}"
        )

    def why_dead(self) -> str | None:
        """Why the holder is provably gone (None: it may be alive)."""
        if not self.content:
            stale = self.age_s > STALE_AFTER_S
            return f"its lock file is unreadable and {self.age_s:.0f} s old" if stale else None
        if self.host == socket.gethostname():
            if self.pid == os.getpid():  # this process, or an earlier one that had our pid (a container)
                return None if self.ours else "an earlier process with this pid"
            # gone: not alive, or the pid now belongs to a process started at another time
            if self.pid is None:
                return None
            started, now = self.content.get("pid_started"), _start_time(self.pid)
            if not process_alive(self.pid) or (None not in (started, now) and now != started):
                return f"process {self.pid} on this host is gone"
            return None
        job, cluster = self.content.get("slurm_job"), self.content.get("slurm_cluster")
        if job and job == os.environ.get("SLURM_JOB_ID"):
            if "slurm_restart" not in self.content:  # written before attempts were recorded: as then
                return f"it belongs to this same SLURM job {job} (a requeued attempt), run earlier on host {self.host}"
            # SLURM runs one attempt of a job at a time: another attempt's holder is an earlier one's. Told
            # by "differs", not "below": SLURM sets SLURM_RESTART_COUNT only from the first requeue on, so a
            # first attempt may carry a count its submitting shell exported (sbatch --export=ALL)
            theirs, ours = self.content["slurm_restart"], slurm_restart_count()
            if isinstance(theirs, int) and theirs != ours:
                return (
                    f"it belongs to an earlier attempt of this same SLURM job {job} (restart {theirs}; this is "
                    f"restart {ours}), run on host {self.host}"
                )
            # the same attempt: another step or task of this job, alive while its heartbeat goes on, unless
            # SLURM says its step ended (a step SIGKILLed on another node, then srun again: no 5-minute wait)
            step = self.content.get("slurm_step")
            if (
                step is not None
                and str(step) != os.environ.get("SLURM_STEP_ID")
                and _step_ended(job, str(step))
            ):
                return f"step {job}.{step} has ended (squeue), run on host {self.host}"
        elif job and cluster:
            # another job (one resubmitted after the holder's node died, or `attnxfer submit` checking the folder
            # before it submits one): no 5-minute wait once SLURM says the holder's job has ended
            ended = _job_ended(str(job), str(cluster), mine=self.owner == os.getuid())
            if ended is not None:
                return f"SLURM job {job} has ended ({ended}), run on host {self.host}"
        if self.age_s > STALE_AFTER_S:
            return f"its heartbeat stopped {self.age_s:.0f} s ago (more than {STALE_AFTER_S:.0f} s)"
        return None


def lock_holder(path: Path) -> _Holder | None:
    """Who holds the lock file ``path`` (None: no one); ``why_dead()`` says whether it may still be at work."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = {}
    return _Holder(
        content if isinstance(content, dict) else {}, max(0.0, time.time() - st.st_mtime), st.st_uid
    )


def _take_over(path: Path, stale: _Holder) -> bool:
    """Remove the stale lock ``stale`` was read from; False if another process got there first."""
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = lock_holder(aside)
    if moved is None or moved.content != stale.content:  # we moved a newer, live lock: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
        with contextlib.suppress(OSError):
            aside.unlink()
        return False
    aside.unlink(missing_ok=True)
    return True


#: locks this process holds, by (resolved path, thread): a nested acquire in one thread is fine (each thread
#: adds and removes only its own keys)
_HELD: set[tuple[str, int]] = set()
#: tokens of the locks this process holds or is creating (another thread's lock is a live holder's)
_OWN_TOKENS: set[str] = set()
#: the dead holders (host, pid, its start, SLURM job) whose locks this process took over
_TAKEN_OVER: set[tuple[Any, ...]] = set()


def _heartbeat(path: Path, token: str, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        holder = lock_holder(path)
        if holder is None or holder.content.get("token") != token:
            return  # taken over by someone who judged us dead: nothing of ours to refresh
        with contextlib.suppress(OSError):
            os.utime(path)


def _acquire(path: Path, content: dict[str, Any]) -> None:
    run_dir, data = path.parent, json.dumps(content, indent=1).encode()
    for _ in range(50):  # contenders racing over a stale lock: a few rounds settle it
        try:
            _write_file_synced(path, data, 0o644)
            return
        except FileExistsError:
            pass
        holder = lock_holder(path)
        if holder is None:
            continue  # released between our two calls
        if not holder.content and holder.age_s < 5:
            time.sleep(0.1)  # created an instant ago: its holder is writing who it is
            continue
        why = holder.why_dead()
        if why is None:
            raise holder.in_use(path)
        if _take_over(path, holder):
            # a study's folder and its students' were held by one process: its takeover is said once
            dead = tuple(holder.content.get(k) for k in ("host", "pid", "pid_started", "slurm_job"))
            # killed before its first save: nothing to go on from, which the run would otherwise not say
            saved = any(Path(run_dir).rglob(f"{CHECKPOINTS_SUBDIR}/step-*"))
            (debug if dead in _TAKEN_OVER else say)(
                f"{run_dir}: taking over the lock of {holder.describe()}: {why}"
                + ("" if saved else "; it saved no checkpoint there, so this run starts from step 0")
            )
            _TAKEN_OVER.add(dead)
    raise RunDirInUseError(f"{run_dir}: could not take its lock ({path}) after 50 tries; try again")


@contextlib.contextmanager
def run_lock(
    run_dir: str | os.PathLike,
    command: str,
    *,
    enabled: bool = True,
    heartbeat_s: float = HEARTBEAT_S,
    writes: str | None = None,
) -> Iterator[None]:
    """Hold ``RUN_DIR/attnxfer.lock`` while the body runs (the module docstring says how and why); ``writes``:
    the work the folder gets, where it is not ``command``'s own (a study's student: a training run).

    ``enabled=False`` (ranks other than 0: they write nothing) only reports disk errors. A full or read-only
    run dir, at the start or inside the body, becomes a `RunDirNotWritableError` naming the path and the
    newest intact checkpoint; a run dir held by a live process, a `RunDirInUseError` naming the holder.
    """
    run_dir = Path(run_dir)
    refuse_file_in_the_way(run_dir, "run_dir")
    checkpoints = run_dir / CHECKPOINTS_SUBDIR  # first written after the first epoch: checked before it
    if checkpoints.is_symlink() and not checkpoints.exists():
        raise MissingPathError(
            f"{checkpoints} links to {os.readlink(checkpoints)}, which does not exist: make that folder, or "
            "remove the link"
        )
    if checkpoints.exists() and not checkpoints.is_dir():
        raise PathExistsError(f"{checkpoints} is a file where the run keeps its checkpoints: move it away")
    refuse_other_work(run_dir, command, writes)
    if not enabled:
        with _plain_disk_errors(run_dir):
            yield
        return
    path = run_dir / LOCK_NAME
    # the folders made for it, removed again (deepest first) if the command ends leaving them empty (refused input)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:  # a full or read-only disk as in the body; any other refusal (/proc takes no folders) named plainly
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, run_dir) or InputError(
            f"run_dir={run_dir} cannot be made ({os.fsdecode(e.filename or run_dir)}: {e.strerror}); choose "
            "another run_dir"
        ) from e
    key = (str(path.resolve()), threading.get_ident())  # per thread: another thread is a holder
    if key in _HELD:  # nested: this thread holds it already
        yield
        return
    token = secrets.token_hex(8)
    content = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _start_time(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
        # whose job ids these are: another job's lock is judged by squeue only where it answers for this cluster
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME") or None,
        # which attempt, step and task of the job: a requeued attempt takes over an earlier one's lock, never
        # a sibling step's or task's (`_Holder.why_dead`)
        "slurm_restart": slurm_restart_count() if os.environ.get("SLURM_JOB_ID") else None,
        "slurm_step": os.environ.get("SLURM_STEP_ID") or None,
        "slurm_task": os.environ.get("SLURM_PROCID") or None,
        "command": command,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "token": token,
    }
    _OWN_TOKENS.add(token)
    try:
        with _plain_disk_errors(run_dir):
            _acquire(path, content)
    except BaseException:
        _OWN_TOKENS.discard(token)
        raise
    _HELD.add(key)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(path, token, stop, heartbeat_s), name="attnxfer-run-lock", daemon=True
    )
    try:
        beat.start()
        with _plain_disk_errors(run_dir):
            yield
    finally:  # forget the hold, delete the lock if still ours, and the folders we made if they are empty
        stop.set()
        if beat.is_alive():
            beat.join()
        _HELD.discard(key)
        _OWN_TOKENS.discard(token)
        holder = lock_holder(path)
        if holder is not None and holder.content.get("token") == token:
            with contextlib.suppress(OSError):
                path.unlink()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def _plain_disk_errors(run_dir: Path) -> Iterator[None]:
    """A disk error (full, read-only) raised in the body as one `RunDirNotWritableError` naming the run dir."""
    try:
        yield
    except OSError as e:
        _raise_plainly(e, run_dir)
