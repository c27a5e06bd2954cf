"""The training loop: one `Engine` for a laptop, torchrun, accelerate or a SLURM task, and `train_step`, the
one optimiser step of attnxfer (the engine's, and stage 1's).

The engine takes objects, never a config (`attnxfer.apps.run.training` builds them): an `Objective` whose
`Objective.loss` is each step's loss, an optimiser, loaders, `LoopSettings`, and a `Drive` for what varies
between loops. accelerate owns devices, DDP and autocast; the engine owns the loop: the data order, the
schedule, logging, evaluation and when to save (what a save holds is its `Checkpointing`'s).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoints.resume_point import ResumePolicy
from ..checkpoints.store import MetricMode
from ..data.label_free import split_batch
from ..data.seeding import sample_seed
from ..errors import InputError, UserError
from ..speak import progress_bar, say
from ..transfer.step_loss import Loss
from .checkpointing import Checkpointing, CheckpointPolicy
from .distributed import min_over_ranks, sum_over_ranks
from .drive import BatchPlace, Drive
from .ema import StudentEMA
from .metrics import MetricsLogger
from .objective import Objective, Pictures
from .runtime import Runtime
from .schedule import lr_at
from .stop import StopRequested, stop_on_signals
from .terms import NonFiniteGuard, NonFiniteLossError, TermWindow
from .trackers import flat_hparams


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    epochs_done: float
    best: float | None  # best value of the run's selection metric (LoopSettings.metric)
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    metric: str = "val_top1"
    # set when a resume found the run already at (or past) its last step: one line saying so (nothing trained,
    # nothing evaluated, nothing written)
    nothing_to_do: str | None = None

    @property
    def best_top1(self) -> float | None:
        """The best val top-1, the EMA's where the run keeps one (classification runs; None for others)."""
        return self.best if self.metric in ("val_top1", "ema_val_top1") else None


@dataclass(frozen=True)
class LoopSettings:
    """Everything the loop decides by: the schedule, logging and checkpointing (no model, no data)."""

    run_dir: Path
    epochs: int
    max_steps: int | None = None
    warmup_epochs: float = 0.0
    base_lr: float = 1e-3
    min_lr: float = 0.0
    clip_grad: float | None = None
    accum_steps: int = 1
    log_every: int = 20
    trackers: tuple[str, ...] = ("tensorboard",)  # train/trackers.py: tensorboard, wandb, mlflow
    project: str = "attnxfer"  # the W&B project / MLflow experiment the run is logged under
    progress: bool = True
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    metric: str = "val_top1"  # what "best" means: a key of the evaluation's results...
    metric_mode: MetricMode | str = MetricMode.MAX  # ...and whether higher (max) or lower (min) is better
    seed: int = 0  # the data's seed: with a batch's epoch and place, the seed of its transform (mixup)


def schedule_steps(train_loader: Sized, s: LoopSettings) -> tuple[int, int, int]:
    """(optimiser steps per epoch, total steps, warm-up steps) for ``train_loader``'s batches an epoch (a
    DataLoader's images counted where it cannot make one step)."""
    batches = len(train_loader)
    steps_per_epoch = batches // s.accum_steps
    if steps_per_epoch < 1:
        counted, lower = "", "lower data.batch_size"
        sampler = getattr(train_loader, "sampler", None)
        if isinstance(sampler, Sized):  # a stream's sampler has no length: not counted
            images = len(sampler)
            counted = f" ({images} images a process, in whole batches of {train_loader.batch_size})"
            if images >= s.accum_steps:
                lower += f" to {images // s.accum_steps} or less"
        raise InputError(
            f"the training set gives {batches} batches per epoch{counted}, fewer than "
            f"optim.accum_steps={s.accum_steps}; {lower}, or give the training split more images"
        )
    total_steps = steps_per_epoch * s.epochs
    if s.max_steps is not None:
        total_steps = min(total_steps, s.max_steps)
    return steps_per_epoch, total_steps, round(s.warmup_epochs * steps_per_epoch)


class Gradients(Protocol):
    """How `train_step` makes, synchronises and clips the gradients: accelerate's `Accelerator` (DDP, autocast's
    scaler, accumulation), or stage 1's `attnxfer.train.distributed.RankAverage`."""

    sync_gradients: bool  # False while micro-batches accumulate: no clipping (the optimiser skips too)

    def accumulate(self, *models: torch.nn.Module) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor: ...


def train_step(
    loss: Callable[[], Loss],
    optimizer: torch.optim.Optimizer,
    gradients: Gradients,
    guard: NonFiniteGuard,
    at: tuple[int, int],
    *,
    model: torch.nn.Module,
    params: Iterable[torch.Tensor],
    clip_grad: float | None = None,
    watched: Sequence[str] | None = None,
    kept: AbstractContextManager | None = None,
) -> Loss:
    """One optimiser step, the only one in attnxfer: ``loss()``, its terms (``watched`` ones, or all) to the
    non-finite guard at ``at`` (step, epoch), backward, clipping ``params`` (norm logged as ``grad_norm``),
    step, ``zero_grad``. A fused AdamW with a ``found_inf`` flag (stage 1's) takes the guard's: it skips every
    step from the first non-finite one on. Nothing is read on the host. ``kept``: what the forward and the
    backward run inside (`Objective.kept_for_backward`)."""
    with gradients.accumulate(model), kept or contextlib.nullcontext():
        out = loss()
        terms = out.terms if watched is None else {name: out.terms[name] for name in watched}
        guard.watch(terms, *at)
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None:
            found_inf.copy_(guard.tripped())
        gradients.backward(out.total)
        if gradients.sync_gradients and clip_grad:
            out.terms["grad_norm"] = gradients.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


class Engine:
    """One run's state and loop. ``record`` is what checkpoints carry besides tensors (the run's config, the
    teacher's record): plain JSON, opaque to the engine. ``drive``: a run trained alone by default."""

    def __init__(
        self,
        runtime: Runtime,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        *,
        train_loader: Any,
        val_loader: Any,
        train_sampler: Any,
        settings: LoopSettings,
        ema: StudentEMA | None = None,
        record: dict[str, Any] | None = None,
        pictures: Sequence[Pictures] = (),
        drive: Drive | None = None,
    ):
        self.runtime = runtime
        self.drive = drive or Drive()
        self.accelerator = acc = runtime.accelerator
        self.rank, self.world, self.is_main = runtime.rank, runtime.world, runtime.is_main
        self.settings = s = settings
        self.record = dict(record or {})
        self.run_dir = Path(s.run_dir)
        # The objective's module runs the batches; its trained part is what the optimiser, the checkpoints
        # and the EMA hold (a TeacherStudent's student; a self-supervised module, itself).
        self.objective, self.ema = objective, ema
        self.module, self.student = objective.module, objective.trained
        self.train_loader, self.val_loader, self.train_sampler = train_loader, val_loader, train_sampler
        self.pictures = tuple(pictures)
        self.ema_eval = objective.ema_model(ema.module) if ema is not None else None
        self.base_lr = s.base_lr
        self.model, self.optimizer = acc.prepare(objective.module, optimizer)
        self.steps_per_epoch, self.total_steps, self.warmup_steps = schedule_steps(train_loader, s)
        self.checkpointing = Checkpointing(
            self.run_dir,
            s.checkpoint,
            s.metric_mode,
            runtime,
            trained=self.student,
            optimizer=self.optimizer,
            ema=ema,
        )
        self.ckpt = self.checkpointing.manager
        self.metrics = MetricsLogger(
            self.run_dir,
            enabled=self.is_main,
            trackers=s.trackers,
            project=s.project,
            hparams=flat_hparams(self.record.get("config") or {}, self.objective.description),
        )
        self.step, self.epoch, self.position = 0, 0, 0
        self.best: float | None = None  # best value of settings.metric so far
        self.last_ckpt: str | None = None
        self.history: list[dict[str, float]] = []
        # training seconds of the attempts before a resume (from its checkpoint), and when this one began: a
        # resumed run's result and report count the whole run, as its history does
        self.seconds_before, self._started = 0.0, time.monotonic()
        # Logged terms and the non-finite guard stay on the device between log steps (no host syncs).
        self.window = TermWindow()
        self.guard = NonFiniteGuard()
        self._last_save_time = time.monotonic()
        self.saved_step: int | None = None  # the step of this process's last save (a stop needs no second)
        self._final: dict[str, float] = {}
        # summary.csv's train_loss: the epoch's summed step losses and optimiser step count (saved in
        # checkpoints, so a run resumed mid-epoch reports the whole epoch), and the lr of the last step
        self._epoch_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        self._epoch_batches = 0
        self._last_lr = float("nan")

    def stop_if_non_finite(self) -> None:
        """Raise `NonFiniteLossError` if a loss term of any rank was NaN/inf since the run (re)started: called
        on log steps and before every save and evaluation, so weights after a bad step are never written or
        scored. One read (and a collective under DDP)."""
        if not self.guard.any_rank_tripped():
            return
        where = (
            f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
        )
        bad = self.guard.first()
        what = (
            f"non-finite loss term {bad.term!r} = {bad.value} at step {bad.step + 1} (epoch {bad.epoch})"
            if bad is not None
            else "a non-finite loss term on another rank"
        )
        # before the first update no learning rate is to blame: the loss's own computation or the data is;
        # after it, the settings the run has (a clip already set, a transfer weight where the term is one)
        clip = self.settings.clip_grad
        clip = f"a lower optim.clip_grad than {clip:g}" if clip else "optim.clip_grad=1.0"
        weights = self.objective.weight_keys if bad is None or bad.term != "task" else ""
        weight = f", or a lower {weights}" if weights else ""
        advice = (
            "It came before any update: check the loss that computes that term, and the data."
            if bad is not None and bad.step == 0
            else f"Try a lower optim.lr, {clip}{weight}."
        )
        raise NonFiniteLossError(f"{what}; stopping without saving ({where}). {advice}")

    def save(self, metric: float | None = None) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes. Never after a non-finite loss."""
        self.stop_if_non_finite()
        loop = {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "best": self.best,
            "best_metric": self.settings.metric,
            "seconds": self.seconds_before + time.monotonic() - self._started,
            "history": self.history,
        }
        extra = {
            "epoch_train_loss": [self._epoch_loss_sum(), self._epoch_batches],
            # summary.csv's lr: a run stopped at an epoch's last step scores that epoch when it resumes,
            # before any step sets the lr again (None before the first step: state.json holds no NaN)
            "last_lr": self._last_lr if math.isfinite(self._last_lr) else None,
            "log_window": self.window.state(),
            **self.record,
        }
        where = self.checkpointing.save(self.step, loop, extra, metric=metric)
        if where is not None:
            self.last_ckpt = where
        self._last_save_time = time.monotonic()
        self.saved_step = self.step

    def _epoch_loss_sum(self) -> float:
        """The epoch's summed losses, the mean over ranks (each sums its share; a resumed part is every rank's)."""
        return sum_over_ranks([self._epoch_loss.item()], self._epoch_loss.device)[0] / self.world

    def save_unless_saved(self) -> None:
        """Save this step, unless it was just saved (a stop saves the step it stopped at)."""
        if self.saved_step != self.step:
            self.save()

    def _stop_if_signalled(self) -> None:
        """After SIGTERM on any rank (`stop_on_signals`): save this step unless it was just saved and
        raise `StopRequested`. Every rank calls it after every optimiser step (the drive's stop check:
        one small CPU collective; a study's engines check nothing here, the study checks once a round)."""
        signum = self.drive.stop()
        if signum is None:
            return
        self.save_unless_saved()
        self.metrics.close()
        raise StopRequested(signum, self.step, self.last_ckpt, self.total_steps)  # said by the CLI or the job

    def resume(self, scoring: bool = False) -> None:
        """Restore the checkpoint the policy picks (`Checkpointing.resume`) and the loop's counters from it;
        a fresh start clears the metrics an earlier attempt left. ``scoring``: read to be scored, not resumed."""
        resumed = self.checkpointing.resume(scoring)
        self._started = time.monotonic()
        if resumed is None:
            if getattr(self.checkpointing.policy.resume, "policy", None) is ResumePolicy.FRESH:
                self.metrics.set_aside_records()  # checkpoint.resume=none over a run: its records kept, as its saves
            self.metrics.truncate_after(0)  # a fresh start: records of an earlier attempt would repeat
            self.metrics.truncate_summary(0)
            return
        state = resumed.state
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best = state.get("best", state.get("best_top1"))
        # checkpoints written before these were kept start the count and the history at the resume
        self.seconds_before, self.history = state.get("seconds", 0.0), list(state.get("history", []))
        self.last_ckpt = str(resumed.checkpoint)
        loss_sum, batches = state.get("epoch_train_loss") or (0.0, 0)
        if resumed.restart_epoch and self.position:  # other data: the position counted samples of the old set
            self.position, loss_sum, batches = 0, 0.0, 0
        self._epoch_loss = torch.tensor(float(loss_sum), dtype=torch.float64, device=self.accelerator.device)
        self._epoch_batches = int(batches)
        last_lr = state.get("last_lr")  # absent from checkpoints written before it was kept
        self._last_lr = float("nan") if last_lr is None else float(last_lr)
        # the terms summed since the last record: the next record covers the same steps as an uninterrupted run's
        self.window = TermWindow.restored(
            [] if resumed.restart_epoch else state.get("log_window", []), self.accelerator.device
        )
        if self.is_main and not self.finished:  # a finished run's records stay as they are
            # a checkpoint at an epoch's end before its evaluation (a stop at its last step): this resume
            # evaluates that step first (the checkpoint's history holds the evaluations it had seen)
            if "history" in state:
                scored = self.position == 0 or any(h.get("step") == self.step for h in self.history)
            else:  # an older checkpoint: only one at its epoch's end is scored again
                scored = self.position == 0 or self.step % self.steps_per_epoch != 0
            self.metrics.truncate_after(self.step, scored=scored)
            self.metrics.truncate_summary(self.epoch)  # rows of epochs the checkpoint had not finished
        where = f"step {self.step}, epoch {self.epoch}, position {self.position}"
        say(f"scoring {self.last_ckpt}" if scoring else f"resumed from {self.last_ckpt} ({where})")

    def _summary_row(self, final: dict[str, float]) -> dict[str, float]:
        """summary.csv's row: the epoch's mean training loss, the evaluation (timm's ``eval_`` names; the EMA's
        where the run ranks by it, as timm's train.py does), lr."""
        row = {"train_loss": self._epoch_loss_sum() / max(1, self._epoch_batches)}
        src = "ema_val_" if self.settings.metric.startswith("ema_") else "val_"
        evals = {
            f"eval_{k[len(src) :]}": v for k, v in final.items() if k.startswith(src) and k != src + "count"
        }
        row |= sorted(evals.items(), key=lambda kv: kv[0] != "eval_loss")  # timm's order: loss first
        return row | {"lr": self._last_lr}

    # -- the loop ---------------------------------------------------------------------------
    def _should_checkpoint_now(self) -> bool:
        c = self.settings.checkpoint
        if c.every_steps and self.step % c.every_steps == 0:
            return True
        # a save is a collective: when every rank's clock says so (rank 0's alone would leave the others
        # behind), asked at log steps, which read the device anyway, not with a host read every step
        if not c.every_minutes or not self._logs_at(self.step):
            return False
        due = torch.tensor(int(time.monotonic() - self._last_save_time >= 60 * c.every_minutes))
        return min_over_ranks(due.to(self.accelerator.device)) > 0

    def _evaluate_all(self) -> dict[str, float]:
        res = {}
        for prefix, model in (("val_", self.model), ("ema_val_", self.ema_eval)):
            if model is not None:
                scores = self.objective.evaluate(model, self.val_loader, self.accelerator)
                res |= {prefix + k: v for k, v in scores.items()}
        return res

    def evaluate_checkpoint(self) -> dict[str, float]:
        """Load the checkpoint to evaluate (newest, or ``checkpoint.resume=PATH``) and score it; writes nothing."""
        self.checkpointing.require_checkpoint()
        self.metrics.enabled = False  # resume must not touch the run's metrics
        self.resume(scoring=True)
        return self._evaluate_all()

    def run(self) -> TrainResult:
        start = time.monotonic()
        with stop_on_signals():  # SIGTERM: save at the next step boundary, then StopRequested
            for _ in self.steps():
                pass
        return self.result(self.seconds_before + time.monotonic() - start)

    def result(self, seconds: float) -> TrainResult:
        """Where the run stands after `steps` ran out (its metrics files closed); ``seconds``: the whole run's
        training time, as its driver counts it (a study's students count their own turns, earlier attempts
        included)."""
        self.metrics.close()
        return TrainResult(
            str(self.run_dir),
            self.step,
            self.epoch,
            self.best,
            self._final,
            self.history,
            seconds,
            metric=self.settings.metric,
            nothing_to_do=None if self._final else self._nothing_to_do(),
        )

    @property
    def finished(self) -> bool:
        """Whether the run stands at (or past) its last step: a resume of it has nothing to do."""
        return self.step >= self.total_steps

    @property
    def resumes_other_run(self) -> bool:
        """Whether the checkpoint it resumes is not one of its run dir's (checkpoint.resume=PATH of another run)."""
        given = self.checkpointing.policy.resume.path
        return given is not None and Path(given).parent.resolve() != self.checkpointing.manager.dir.resolve()

    def _nothing_to_do(self) -> str:
        """What a resume of a run already at (or past) its last step says instead of training."""
        s = self.settings
        # the key that ends the run: a max_steps past the last epoch's end trains no further when raised
        limit, keys = f"schedule.epochs={s.epochs} of {self.steps_per_epoch} steps", "schedule.epochs"
        if s.max_steps == self.total_steps:
            limit, keys = f"schedule.max_steps={s.max_steps}", "schedule.max_steps or schedule.epochs"
        where = " of" if self.step == self.total_steps else ", past"  # a run lowered below where it stands
        at, kept = (
            f"{self.run_dir} is",
            f"its checkpoint {Path(self.last_ckpt or '').name or '(none)'} is unchanged",
        )
        if self.resumes_other_run:  # the run dir holds none of it: nothing was written there either
            at, kept = (
                f"checkpoint.resume={self.checkpointing.policy.resume.path} is",
                f"nothing was written into {self.run_dir}",
            )
        return (
            f"nothing to do: {at} at step {self.step}{where} the {self.total_steps} this run trains ({limit}); "
            f"{kept}. To train longer, raise {keys}"
        )

    def own_streams(self):
        """The drive's random streams in place (a study's student's own; alone, the process's as they are)."""
        return self.drive.streams.active(self.accelerator)

    def steps(self) -> Iterator[int]:
        """The training loop, yielding the step count after every optimiser step (the last one after its
        evaluation and save), each step under the drive's random streams: `run` drains it, a study advances its
        engines one step each in turn, a benchmark times several engines step by step."""
        loop = self._loop()
        while True:
            with self.own_streams():
                step = next(loop, None)
            if step is None:
                return
            yield step

    def _loop(self) -> Iterator[int]:
        s, sampler = self.settings, self.train_sampler
        self._last_save_time = time.monotonic()
        self.resume()
        self.model.train()
        self._final = {}
        while self.step < self.total_steps:
            sampler.set_epoch(self.epoch)
            sampler.set_position(self.position)
            # whole optimiser steps only: a tail of micro-batches shorter than accum_steps would leave its
            # gradient (and accelerate's accumulation count) to the next epoch's first step. Per epoch this is
            # steps_per_epoch x accum_steps batches at every world size (what keeps a resume on another number
            # of ranks on the same schedule, apps/run/world_size.py)
            usable = len(self.train_loader) // s.accum_steps * s.accum_steps
            progress = self._progress_bar(usable)
            if self.position == 0:  # a record never mixes epochs (a resumed run logs the same records)
                self.window = TermWindow()
            batches_left = usable
            for batch in itertools.islice(self.train_loader, usable):
                batches_left -= 1
                x, y = split_batch(batch)  # y None: data without labels (attnxfer.data.label_free)
                lr, stepped = self._micro_step(x, y, progress)
                if not stepped:
                    continue
                self._after_step(lr, progress, epoch_ends=batches_left == 0)
                if self.step >= self.total_steps:
                    if batches_left == 0:  # the last step is also the epoch's last: a resume starts the next
                        self.epoch, self.position = self.epoch + 1, 0
                    break
                # the epoch's last step is saved after its evaluation (`_end_epoch`): a resume then starts the
                # next epoch, rather than score this one again and rewrite its summary row without its lr
                if batches_left and self._should_checkpoint_now():
                    self.save()
                self._stop_if_signalled()
                yield self.step
            else:  # the loader ran dry: the epoch is complete
                self.epoch += 1
                self.position = 0
            if progress is not None:
                progress.close()
            self._end_epoch()
            if self.step >= self.total_steps:
                yield self.step

    @property
    def _global_batch(self) -> int:
        """Images every rank together consumes per micro-batch (what ``position`` counts)."""
        return self.train_loader.batch_size * self.world

    def _epoch_now(self) -> float:
        return self.epoch + self.position / self.train_sampler.length

    def _progress_bar(self, usable: int):
        """The epoch's progress (rank 0, ``log.progress``), starting where a resumed epoch stands."""
        if not (self.is_main and self.settings.progress):
            return None
        done = self.position // self._global_batch
        # a schedule.max_steps cap inside the epoch ends the bar where the run ends, not at the epoch's end
        left = (self.total_steps - self.step) * self.settings.accum_steps
        return progress_bar(done + min(usable, left), initial=done, desc=f"epoch {self.epoch}")

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor | None, progress) -> tuple[float, bool]:
        """One micro-batch through the objective (an optimiser step when accumulation completes): (lr,
        whether the optimiser stepped). Its terms are summed on the device, read on log steps only."""
        s, acc = self.settings, self.accelerator
        # the batch's seed, from its epoch and place; a negative index: never one of its samples' (their
        # augmentation's, data.seeding)
        seed = sample_seed(s.seed, self.epoch, -1 - self.position)
        x, y, handover = self.drive.feed(x, y, BatchPlace(acc.device, seed, self.objective.prepare))
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.base_lr, s.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        upcoming = self.step + 1
        self.objective.before_step(self._logs_at(upcoming))
        out = train_step(  # the forward, backward and optimiser step
            lambda: self.objective.loss(self.model, x, y, acc.autocast, handover),
            self.optimizer,
            acc,
            self.guard,
            (self.step, self.epoch),
            model=self.model,
            params=self.student.parameters(),
            clip_grad=s.clip_grad,
            kept=self.objective.kept_for_backward(),
        )
        logs = {k: v.detach() for k, v in (out.terms | out.logs).items()}
        # summary.csv's train_loss is the mean of the epoch's step losses, a step's the mean of its micro-batches':
        # counted in steps, an epoch that a resume re-split (other accumulation steps) weighs every step alike
        self._epoch_loss += logs["total"].double() / s.accum_steps
        self._epoch_batches += int(acc.sync_gradients)
        self._last_lr = lr
        self.position += self._global_batch  # global count: what every rank consumed together
        if progress is not None:
            progress.update(1)
        # a step's norm, taken once (its last micro-batch): a step's weight, also where a resume changed the
        # micro-batches a step has (at 1/accum_steps, the steps before a re-split weighed less in its mean)
        norm = logs.pop("grad_norm", None)
        self.window.add(logs, weight=1 / s.accum_steps)
        if norm is not None:
            self.window.add({"grad_norm": norm})
        return lr, acc.sync_gradients

    def _logs_at(self, step: int) -> bool:
        """Whether ``step`` is a log step (every log.every_steps, and the last): the window's means are read."""
        return step % self.settings.log_every == 0 or step == self.total_steps

    def _after_step(self, lr: float, progress, epoch_ends: bool = False) -> None:
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.student)
        if self._logs_at(self.step) or epoch_ends:  # an epoch's tail steps too (as timm logs its last batch)
            self.stop_if_non_finite()
            rec = self.window.means() | {"lr": lr}
            self.metrics.log("train", self.step, rec, epoch=self._epoch_now())
            if progress is not None:  # the total, and the two parts a transfer's total sums where it has them
                parts = {k: f"{rec[k]:.3f}" for k in ("task", "transfer") if k in rec}
                progress.set_postfix(loss=f"{rec['total']:.3f}", **parts, lr=f"{lr:.2e}")

    def _end_epoch(self) -> None:
        s = self.settings
        self.stop_if_non_finite()  # never score (or keep as best) weights after a non-finite loss
        try:
            final = self._evaluate_all()
        except UserError:  # the val data is at fault (a file it cannot read): the epoch's training is kept,
            # unscored, by a single process (DDP peers would wait in the eval's collectives)
            if self.accelerator.num_processes == 1:
                self.save_unless_saved()
            raise
        value = final[s.metric]
        if self.best is None or MetricMode(s.metric_mode).better(value, self.best):
            self.best = value
        final["best_" + s.metric.replace("val_", "")] = self.best  # best_top1, best_loss, best_ema_top1
        self.metrics.log("val", self.step, final, epoch=self._epoch_now())
        # timm's 0-based epoch index: the epoch just completed (or the one cut short by max_steps)
        epoch = self.epoch - 1 if self.position == 0 else self.epoch
        self.metrics.log_epoch(epoch, self._summary_row(final))
        if self.position == 0:
            self._epoch_loss, self._epoch_batches = torch.zeros_like(self._epoch_loss), 0
        self.history.append({"step": self.step, "epoch": self._epoch_now(), **final})
        if self.is_main:
            for draw in self.pictures:  # class-token maps, MAE reconstructions (built in attnxfer.apps)
                for tag, image in draw(self.student).items():
                    self.metrics.log_image(tag, self.step, image)
            name = s.metric.replace("ema_val_", "EMA val ").replace("val_", "val ")
            fmt = ".2f" if s.metric.endswith("val_top1") else ".4g"
            say(
                f"epoch {epoch}: step {self.step}/{self.total_steps} {name} {value:{fmt}} "
                f"(best {self.best:{fmt}})"
            )
        if s.checkpoint.every_epoch or self.step >= self.total_steps or self._should_checkpoint_now():
            self.save(metric=value)
        self._final = final
