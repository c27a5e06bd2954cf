"""The submitted callable: a rank's `main(cfg)`, requeued (bounded, recorded) on preemption or time limit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import submitit
from submitit.core.utils import DelayedSubmission, UncompletedJobError

from ...checkpoints.atomic_io import atomic_write_text
from ...checkpoints.resume_point import ResumePoint
from ...checkpoints.run_lock import slurm_restart_count
from ...checkpoints.verify import MANIFEST_NAME
from ...config import TrainConfig, dump_config
from ...config.study_spec import StudySpec, from_text
from ...errors import UserError
from ...run_layout import CHECKPOINTS_SUBDIR
from ...speak import show_debug, warn, warnings_as_lines
from ...train.distributed import backend_for, barrier, cleanup_distributed, init_distributed
from ...train.stop import WAITS_FOR_A_STEP, StopRequested
from .earlier_names import current_config, install as install_earlier_names
from .held_signal import pass_on_held_usr2
from .options import SlurmOptions


class RequeueLimitReached(RuntimeError):
    """The job timed out more often than ``max_requeues`` (or was preempted more than ``max_preemptions``)."""


# SLURM sends the time-limit signal `signal_delay_s` before the limit, "up to 60 seconds earlier" (sbatch
# --signal): a signal later than limit - delay - this slack is the time limit; an earlier one, a preemption
TIMEOUT_SLACK_S = 90


#: how long rank 0 waits for ``scontrol requeue`` after SIGTERM (past it: the job ends, said not requeued);
#: under SLURM's default KillWait of 30 s, so that the line is said before SIGKILL
SCONTROL_TIMEOUT_S = 20.0

#: what a job past its requeue bound says to do; `attnxfer submit` adds how its config resumes
RESUBMIT = "resubmit to continue"


# a job requeued after an upgrade unpickles this module's TrainingTask first, then its callable and config by the
# names the version that submitted it gave them
install_earlier_names()


class ConfigText(str):
    """A run's config (or a study) as a pickled task holds it: the YAML its config.yaml (study.yaml) holds."""


class TrainingTask(submitit.helpers.Checkpointable):
    """``main_fn(cfg)`` as a checkpointable submitit task that requeues itself and resumes from its run dir:

    * SIGTERM (``scancel``, preemption without USR2), and USR2 (``--signal`` before the time limit, or a
      preemption that sends it) while a training loop runs: the loop saves at the next step boundary and raises
      `StopRequested`; rank 0 requeues (``scontrol requeue``; a job its user cancelled stays cancelled).
    * USR2 outside a loop (loading, evaluating): ``checkpoint()`` runs in submitit's handler on rank 0 only, so
      it does no collective and saves nothing (the run's checkpoints resume); it hands back this task, which
      submitit pickles and SLURM requeues.

    A signal within `TIMEOUT_SLACK_S` of the time limit is a timeout (bounded by ``max_requeues``); any
    other, and a requeue by the scheduler itself, a preemption (bounded by ``max_preemptions``, if set).
    Past a bound: `RequeueLimitReached`."""

    #: what a restart does and what to do past a bound, as a run's job says it (a run resumes from its
    #: checkpoints); a task whose callable keeps none says its own (`launch/search_array.py`'s batches)
    on_restart = "the run resumes from its run directory"
    on_requeue = "the run will resume from its newest checkpoint"
    past_bound = f"the run dir keeps the last checkpoint: {RESUBMIT}"
    more_time = "a longer --time or a higher --max-requeues"

    def __init__(
        self,
        main_fn: Callable[[Any], Any],
        cfg: Any,
        max_requeues: int = 3,
        max_preemptions: int | None = None,
        time_limit_min: int | None = None,
        signal_delay_s: int = 120,
    ) -> None:
        self.main_fn = main_fn
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.max_preemptions = max_preemptions
        self.time_limit_min = time_limit_min  # None: every signal counts as a time limit
        self.signal_delay_s = signal_delay_s
        # requeues this task asked for, by cause; they travel with the pickled task
        self.timeouts = 0
        self.preemptions = 0
        self._started = time.time()

    @classmethod
    def for_options(cls, main_fn: Callable[[Any], Any], cfg: Any, opts: SlurmOptions) -> TrainingTask:
        """The task of a job submitted with ``opts``: its requeue bounds and when its time-limit signal comes."""
        return cls(
            main_fn,
            cfg,
            max_requeues=opts.max_requeues,
            max_preemptions=opts.max_preemptions,
            time_limit_min=opts.timeout_min,
            signal_delay_s=opts.signal_delay_s,
        )

    @property
    def requeues(self) -> int:
        return self.timeouts + self.preemptions

    def __call__(self) -> Any:
        # a job's own process (submitit started it): its log keeps the detail (which group it joined, where
        # the teacher came from); the debug executor runs in the caller's, left as it is
        if os.environ.get("SUBMITIT_EXECUTOR"):
            show_debug()
        self._started = time.time()
        restarts = self.restart_count()
        if restarts:
            most = "no bound" if self.max_preemptions is None else f"at most {self.max_preemptions}"
            past = self.max_preemptions is not None and self.all_preemptions() > self.max_preemptions
            # past the bound (the scheduler requeued it without asking us): not "resumes" before the refusal
            then = "past its bound" if past else self.on_restart
            warn(
                f"restart {restarts} of this job ({self.timeouts} time limit(s) of at most {self.max_requeues}, "
                f"{self.all_preemptions()} preemption(s) of {most}): {then}"
            )
            self._record_requeue(restarts, event="restarted")
            if past:
                n = self.all_preemptions()
                raise RequeueLimitReached(
                    f"job preempted {n} time{'s' * (n != 1)}, more than max_preemptions={self.max_preemptions}; "
                    f"{self.past_bound} (with a higher --max-preemptions, or on another partition)"
                )
            self.cfg = resumed_on_restart(self.cfg)
        _watch_stop_signals()
        pass_on_held_usr2()  # a preemption while the task loaded: submitit's handler requeues the job now
        # the config's dist.timeout (a run's config; another callable's config may have none: torch's defaults)
        timeout = getattr(getattr(self.cfg, "dist", None), "timeout", None)
        info = init_distributed(backend_for(getattr(self.cfg, "device", "auto")), timeout)
        try:
            with warnings_as_lines():  # the job's log reads attnxfer's warnings as the CLI shows them
                result = self.main_fn(self.cfg)
        except StopRequested as stop:  # SIGTERM: the step is saved; requeue (rank 0), then every rank leaves
            self._requeue_after_stop(stop, info.rank)
        except Exception as e:
            # no cleanup_distributed() here: closing the group would make the other ranks fail
            # before this rank's error is on record; the process exits right after anyway
            if not _STOP_SIGNALLED or isinstance(e, (RequeueLimitReached, UncompletedJobError)):
                raise
            # a peer left for the requeue (or SLURM is killing the job): this error is a consequence,
            # and must not reach the submitter as a failure of the job, which will run again
            warn(
                f"rank {info.rank}: {e!r} after a preemption/time-limit signal; exiting without a result",
                all_ranks=True,
            )
            raise SystemExit(1) from e
        cleanup_distributed()
        return result

    def restart_count(self) -> int:
        """How often this job was requeued: ours, or SLURM's count where SLURM ran it. Under the local and
        debug executors a ``SLURM_RESTART_COUNT`` can only be the submitting shell's own (a command submitted
        from inside a requeued job): not this job's."""
        slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        return max(self.requeues, slurm_restart_count() if slurm else 0)

    def all_preemptions(self) -> int:
        """Ours plus the requeues SLURM did without asking this task (preemption in requeue mode, admins)."""
        return self.preemptions + max(0, self.restart_count() - self.requeues)

    def requeue_cause(self) -> str:
        """``"timeout"`` when the signal came within `TIMEOUT_SLACK_S` of ``signal_delay_s`` before the
        time limit (measured from this run's start), else ``"preemption"``."""
        if self.time_limit_min is None:
            return "timeout"
        ran = time.time() - self._started
        late = ran >= self.time_limit_min * 60 - self.signal_delay_s - TIMEOUT_SLACK_S
        return "timeout" if late else "preemption"

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        cause = self.requeue_cause()
        if cause == "timeout" and self.timeouts + 1 > self.max_requeues:
            self._record_requeue(self.requeues, event="refused", cause=cause)
            # raised inside the signal handler: the job ends with this error instead of requeuing
            raise RequeueLimitReached(
                f"timed out again after {self.timeouts} requeue(s) at the time limit; "
                f"max_requeues={self.max_requeues} reached, not requeuing ({self.past_bound}, with "
                f"{self.more_time})"
            )
        limit = self.max_preemptions
        if cause == "preemption" and limit is not None and self.all_preemptions() + 1 > limit:
            self._record_requeue(self.requeues, event="refused", cause=cause)
            raise RequeueLimitReached(
                f"preempted again after {self.all_preemptions()} preemption(s); max_preemptions={limit} "
                f"reached, not requeuing ({self.past_bound})"
            )
        if cause == "timeout":
            self.timeouts += 1
        else:
            self.preemptions += 1
        self._record_requeue(self.requeues, event="requeued", cause=cause)
        warn(
            f"requeuing after a {cause} ({self.timeouts} time limit(s) of at most {self.max_requeues}, "
            f"{self.all_preemptions()} preemption(s)); {self.on_requeue}"
        )
        return super().checkpoint(*args, **kwargs)

    def _requeue_after_stop(self, stop: StopRequested, rank: int) -> None:
        """After SIGTERM: rank 0 pickles this task and requeues the job; no rank leaves before that (srun's
        --kill-on-bad-exit would take rank 0 down with the first rank to exit). Always raises."""
        executor = os.environ.get("SUBMITIT_EXECUTOR")
        if executor == "local":  # nothing requeues it: the loop's line, read in this log by `submit --wait`
            warn(f"{stop}; a local job is not requeued: submit the same command to resume")
            with contextlib.suppress(Exception):
                barrier()
            raise SystemExit(stop.exit_code)
        if executor != "slurm":  # debug executor: the submit command's own process, whose CLI says it
            raise stop
        env = submitit.JobEnvironment()
        refused: RequeueLimitReached | None = None
        why = _why_ending(env.paths.stderr, self._started) if rank == 0 else None
        if why == "":  # its user's scancel: SLURM would requeue even a cancelled job, which must stay so
            warn(f"{stop}; job {env.job_id} was cancelled, not requeued: submit the same command to resume")
        elif rank == 0:
            try:
                delayed = self.checkpoint()
                delayed.set_timeout(self.time_limit_min or 0, 10**6)  # our own counts bound the requeues
                failed = _requeue(delayed, env)
                if failed is None or why == "JOB REQUEUE":  # the latter: requeued by SLURM itself
                    warn(f"{stop}; job {env.job_id} requeued: it resumes from that step")
                else:  # the record's "requeued" event, written before scontrol was asked, is followed by this
                    self._record_requeue(self.requeues, event="not requeued", cause=failed)
                    warn(
                        f"{stop}; job {env.job_id} was not requeued ({failed}): submit the same command to "
                        "resume from that step (with checkpoint.resume=auto where it was submitted with none or "
                        "a PATH)"
                    )
            except RequeueLimitReached as e:
                refused = e
        with contextlib.suppress(Exception):
            barrier()
        if refused is not None:  # the stop's traceback is no cause of it: the bound alone
            raise refused from None
        raise SystemExit(stop.exit_code)

    def _record_requeue(self, count: int, event: str, cause: str | None = None) -> None:
        """Append to ``<job_dir>/<job_id>_requeues.json`` (rank 0 only; best effort, never raises)."""
        try:
            env = submitit.JobEnvironment()
            if env.global_rank != 0:
                return
            path = requeue_record_path(env.paths.folder, env.job_id)
            record = json.loads(path.read_text()) if path.exists() else {"job_id": env.job_id, "events": []}
            record.update(
                requeues=count,
                timeouts=self.timeouts,
                preemptions=self.all_preemptions(),
                max_requeues=self.max_requeues,
                max_preemptions=self.max_preemptions,
            )
            entry = {"event": event, "count": count, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if cause:
                entry["cause"] = cause
            record["events"].append(entry)
            atomic_write_text(path, json.dumps(record, indent=1))
        except Exception as e:  # a report must not break the requeue itself
            warn(f"could not record requeue: {e}")

    def __getstate__(self) -> dict[str, Any]:
        """As pickled: one of `attnxfer submit`'s commands by its name, a run's config as its YAML, so that a
        requeued job finds both wherever the version it then runs keeps them; anything else as it is."""
        from ..commands.base import SUBMITTABLE

        state = dict(self.__dict__)
        where = f"{getattr(self.main_fn, '__module__', '')}:{getattr(self.main_fn, '__qualname__', '')}"
        state["main_fn"] = next((name for name, w in SUBMITTABLE.items() if w == where), self.main_fn)
        if type(self.cfg) in (TrainConfig, StudySpec):
            state["cfg"] = ConfigText(dump_config(self.cfg) if type(self.cfg) is TrainConfig else self.cfg)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from ..commands.base import submittable

        self.__dict__.update(state)
        if isinstance(self.main_fn, str):  # a command's name
            self.main_fn = submittable(self.main_fn)
        # an earlier version's `--command study` named its callable attnxfer.apps.study.study, now a module
        if isinstance(self.main_fn, ModuleType):
            self.main_fn = getattr(self.main_fn, self.main_fn.__name__.rpartition(".")[2])
        if isinstance(self.cfg, ConfigText):  # read as a run's config.yaml is (old spellings where they went)
            self.cfg = from_text(self.cfg)
        else:  # an earlier version pickled the object, which holds that version's keys only
            self.cfg = current_config(self.cfg)

    def __repr__(self) -> str:
        name = getattr(self.main_fn, "__qualname__", repr(self.main_fn))
        return (
            f"TrainingTask({name}, run_dir={getattr(self.cfg, 'run_dir', '?')!r}, "
            f"max_requeues={self.max_requeues}, max_preemptions={self.max_preemptions})"
        )


def _requeue(delayed: DelayedSubmission, env: submitit.JobEnvironment) -> str | None:
    """Write the task the requeued job runs, then ask SLURM to requeue this job: None once it is, else why
    not, in words. Never raises for a failed ``scontrol`` (missing, hung, refused) or an unwritable pickle:
    rank 0 must still meet the other ranks at their barrier, and say that the job ends for good."""
    try:
        # whole or not at all (submitit's own handler does the same): SIGKILL follows KillWait after the
        # SIGTERM, and a cluster that requeues preempted jobs starts the next attempt from this file whether
        # or not it was written to the end
        _dump_whole(delayed, env.paths.submitted_pickle)
    except OSError as e:
        return f"its task could not be written to {env.paths.submitted_pickle}: {e.strerror or e}"
    try:
        done = subprocess.run(
            ["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"scontrol requeue {env.job_id} did not answer within {SCONTROL_TIMEOUT_S:g} s"
    except OSError as e:
        return f"scontrol could not run: {e.strerror or e}"
    if done.returncode != 0:
        return done.stderr.strip() or f"scontrol requeue {env.job_id} exited with {done.returncode}"
    return None


def _dump_whole(delayed: DelayedSubmission, path: Path) -> None:
    """Pickle ``delayed`` (submitit's cloudpickle) beside ``path`` and rename it over it: readers find the old
    file or the new one, never a truncated one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        delayed.dump(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resumed_on_restart(cfg: Any) -> Any:
    """A restarted job's config, once the job has saved a checkpoint under its run_dir (its manifest names the
    job); unchanged before any save. Its checkpoint.resume none or PATH said where its first attempt started: a
    restart goes on from the newest (auto) instead of redoing the work and setting its saves aside. A run's own
    batch split is the one the job trained with: a first attempt that resumed a run saved by another number of
    processes re-split the global batch (`fit_world_size`), which the config as submitted does not hold, and
    the restart (on as many processes) would be refused for it."""
    from ..commands.base import with_auto_resume

    job = os.environ.get("SLURM_JOB_ID")
    if not job or not hasattr(cfg, "run_dir"):
        return cfg
    ours = []
    for manifest in Path(cfg.run_dir).rglob(f"{CHECKPOINTS_SUBDIR}/step-*/{MANIFEST_NAME}"):
        with contextlib.suppress(OSError, ValueError):  # unreadable: no save to go on from
            if json.loads(manifest.read_text()).get("slurm_job") == job:
                ours.append(manifest.parent)
    if not ours:
        return cfg
    overrides: dict[str, Any] = {}
    if with_auto_resume(cfg):
        warn(
            "restarted after saving: resumes from its newest checkpoint (checkpoint.resume=auto for this restart)"
        )
        overrides["checkpoint.resume"] = "auto"
    own = sorted(p for p in ours if p.parent == Path(cfg.run_dir) / CHECKPOINTS_SUBDIR)  # not a stage's
    if type(cfg) is TrainConfig and own:
        with contextlib.suppress(UserError, KeyError, TypeError):  # no split recorded: as submitted
            saved = ResumePoint.find(cfg.run_dir, str(own[-1]), verify_hash=False).config
            split = {
                "data.batch_size": saved["data"]["batch_size"],
                "optim.accum_steps": saved["optim"]["accum_steps"],
            }
            if (cfg.data.batch_size, cfg.optim.accum_steps) != tuple(split.values()):
                warn(
                    f"restarted after saving: trains with the batch split this job saved {own[-1].name} with "
                    f"({', '.join(f'{k}={v}' for k, v in split.items())}; submitted: data.batch_size="
                    f"{cfg.data.batch_size}, optim.accum_steps={cfg.optim.accum_steps})"
                )
                overrides |= split
    return cfg.with_overrides(overrides) if overrides else cfg


_STOP_SIGNALLED = False


def _watch_stop_signals() -> None:
    """Remember SIGTERM and submitit's preemption signal, then run submitit's handlers: only rank 0
    requeues, and the other ranks' collectives failing a moment later are then no real failure. The
    preemption signal's handler waits for a training loop's step (`WAITS_FOR_A_STEP`): inside one, every rank
    saves that step and the job requeues as after SIGTERM; elsewhere (loading, evaluating) submitit's runs."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # debug executor: this is the user's own process
        return
    usr = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}", signal.SIGUSR2)
    for signum in {signal.SIGTERM, usr}:
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: Any, previous: Any = previous) -> None:
            global _STOP_SIGNALLED
            _STOP_SIGNALLED = True
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:  # keep the default action (terminate)
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        setattr(handler, WAITS_FOR_A_STEP, signum == usr)
        signal.signal(signum, handler)


# slurmstepd's lines in the job's log as SLURM ends the job: "*** STEP 12.0 ON node1 CANCELLED AT
# 2026-01-31T12:00:00 DUE TO JOB REQUEUE ***" (PREEMPTION, TIME LIMIT...) before its SIGTERM, then the same with
# JOB 12, possibly after it; no reason for its user's scancel; a signal alone (scancel --signal=TERM): STEP only
_ENDING = re.compile(r"\*\*\* (JOB|STEP) \S+ ON \S+ CANCELLED AT (\S+)(?: DUE TO (.+?))? \*\*\*")


def _why_ending(log: Path, since: float) -> str | None:
    """Why SLURM ends the job, from its log's `_ENDING` lines since this attempt began: the JOB line's reason
    ("" for its user's scancel), else a STEP line's; None for a signal alone. A STEP line without a reason
    waits up to a second for the JOB line that tells a scancel from a signal (read too early on a loaded
    node, a scancel would be requeued); the lines come in either order."""
    for _ in range(10):
        try:
            ends = [
                (kind, why)
                for kind, at, why in _ENDING.findall(log.read_text(errors="replace"))
                if time.mktime(time.strptime(at, "%Y-%m-%dT%H:%M:%S")) >= int(since)
            ]
        except (OSError, ValueError):  # no log, or a site's own time format: as if no line
            return None
        jobs, reasons = [why for kind, why in ends if kind == "JOB"], [why for _, why in ends if why]
        if jobs or reasons or not ends:
            return (jobs or reasons or [None])[-1]
        time.sleep(0.1)
    return None


def requeue_record_path(job_folder: str | Path, job_id: str) -> Path:
    return Path(job_folder) / f"{job_id}_requeues.json"
