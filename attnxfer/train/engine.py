"""The training loop: one `Engine` for a laptop, torchrun, accelerate or a SLURM task.

It takes objects (a `DualViT`, an optimiser, loaders, `LoopSettings`), never a config:
`attnxfer.apps.training` builds those from one. accelerate owns devices, DDP and autocast;
the engine owns the data order (a resumable sampler), the schedule (per-iteration warmup +
cosine), checkpoints (atomic safetensors + JSON) and the teacher (a frozen guest inside `DualViT`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..analysis import class_token_maps, layer_qk
from ..analysis.pictures import class_token_figure, display_image, figure_array
from ..checkpoints.rng import capture_rng_state, restore_rng_state
from ..checkpoints.store import (
    STATE_NAME,
    CheckpointError,
    CheckpointManager,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    verify_checkpoint,
)
from ..transfer.dual import DualViT, TransferOutput
from .distributed import barrier
from .ema import StudentEMA
from .metrics import MetricsLogger
from .runtime import Runtime

__all__ = [
    "CheckpointPolicy",
    "Engine",
    "LoopSettings",
    "NonFiniteLossError",
    "TrainResult",
    "evaluate",
    "lr_at",
]

_log = logging.getLogger("attnxfer")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; nothing was saved over the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    epochs_done: float
    best_top1: float | None
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Per-iteration linear warmup then half-cosine to ``minimum``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _check_finite(terms: dict[str, torch.Tensor], step: int, epoch: int, last_ckpt: str | None) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite loss term {name!r} = {value.item()} at step {step} (epoch {epoch}); stopping without "
                f"saving ({where}). Try a lower optim.lr, optim.clip_grad=1.0, or a lower transfer.atd_weight."
            )


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, max_batches: int | None = None) -> dict[str, float]:
    """Top-1/top-5 and loss of ``model`` (a DualViT or a bare student) over ``loader``, summed over ranks,
    and the number of images scored (``count``)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with accelerator.autocast():
            out = model(x)
        logits = (out.logits if isinstance(out, TransferOutput) else out).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        totals[0] += (top5[:, 0] == y).sum()
        totals[1] += (top5 == y[:, None]).any(-1).sum()
        totals[2] += F.cross_entropy(logits, y, reduction="sum")
        totals[3] += y.numel()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    n = max(1.0, totals[3].item())
    return {
        "top1": 100.0 * totals[0].item() / n,
        "top5": 100.0 * totals[1].item() / n,
        "loss": totals[2].item() / n,
        "count": int(totals[3].item()),  # images scored: what a 95 % interval of top1 needs
    }


def _weights_checksum(model: nn.Module) -> str:
    """A bit-exact fingerprint of the weights (ranks compare them before every save)."""

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the engine saves, how many it keeps, and what it resumes from."""

    every_steps: int | None = None
    every_minutes: float | None = None
    every_epoch: bool = True
    keep_last: int = 3
    resume: str = "auto"  # auto | none | a checkpoint directory


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
    tensorboard: bool = True
    progress: bool = True
    attention_images: int = 0  # validation images whose class-token maps go to TensorBoard at each eval
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    eval_only: bool = False


@dataclass
class TaskLoss:
    """The task's loss and its batch transform (timm's Mixup/CutMix, or None)."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixup: Callable | None = None


class Engine:
    """One run's state and loop. ``record`` is what checkpoints carry besides tensors (the run's
    config as a dict, the teacher's record): plain JSON, opaque to the engine."""

    def __init__(
        self,
        runtime: Runtime,
        dual: DualViT,
        optimizer: torch.optim.Optimizer,
        *,
        train_loader: Any,
        val_loader: Any,
        train_sampler: Any,
        task: TaskLoss,
        settings: LoopSettings,
        ema: StudentEMA | None = None,
        record: dict[str, Any] | None = None,
    ):
        self.runtime = runtime
        self.accelerator = acc = runtime.accelerator
        self.rank, self.world, self.is_main = runtime.rank, runtime.world, runtime.is_main
        self.settings = s = settings
        self.record = dict(record or {})
        self.run_dir = Path(s.run_dir)
        self.dual, self.ema, self.plan = dual, ema, dual.plan
        self.train_loader, self.val_loader, self.train_sampler = train_loader, val_loader, train_sampler
        self.mixup, self.loss_fn = task.mixup, task.loss_fn
        # What evaluates the EMA weights: with the teacher when the mode attends with its q/k at eval.
        self.ema_eval = None
        if ema is not None:
            self.ema_eval = (
                DualViT(dual.teacher, ema.module, self.plan) if self.plan.mode.teacher_at_eval else ema.module
            )
        self.base_lr = s.base_lr
        self.model, self.optimizer = acc.prepare(dual, optimizer)
        self.steps_per_epoch = len(train_loader) // s.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set gives {len(train_loader)} batches per epoch, fewer than "
                f"optim.accum_steps={s.accum_steps}; lower data.batch_size"
            )
        self.total_steps = self.steps_per_epoch * s.epochs
        if s.max_steps is not None:
            self.total_steps = min(self.total_steps, s.max_steps)
        self.warmup_steps = round(s.warmup_epochs * self.steps_per_epoch)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=s.checkpoint.keep_last)
        self.metrics = MetricsLogger(self.run_dir, tensorboard=s.tensorboard, enabled=self.is_main)
        self.step, self.epoch, self.position = 0, 0, 0
        self.best_top1: float | None = None
        self.last_ckpt: str | None = None
        self.history: list[dict[str, float]] = []
        self._picture_x: torch.Tensor | None = None

    def save(self, metric: float | None = None) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes."""
        rng = capture_rng_state()
        checksum = _weights_checksum(self.dual.student)
        if self.world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (rng, checksum))
            rng_all = [g[0] for g in gathered]
            checksums = [g[1] for g in gathered]
            if len(set(checksums)) != 1:
                raise RuntimeError(
                    f"ranks hold different student weights at step {self.step} "
                    f"(checksums {checksums}); the run is not data-parallel consistent"
                )
        else:
            rng_all, checksums = [rng], [checksum]
        if self.is_main:
            opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
            tensors = {"model": self.dual.student.state_dict(), "optimizer": opt_tensors}
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "best_top1": self.best_top1,
                "rng": rng_all,
                "optimizer_meta": opt_meta,
                "world_size": self.world,
                "rank_checksums": checksums,
                **self.record,
            }
            info = self.ckpt.save(self.step, tensors, state, metric=metric, replace=self._make_room(checksum))
            self.last_ckpt = str(info)
        barrier()
        self._last_save_time = time.monotonic()

    def _make_room(self, checksum: str) -> bool:
        """Whether this step's save replaces an intact checkpoint of the same step (never a crash).

        Same weights (a periodic save that an epoch save follows, a finished run extended): the new one,
        with the newer metric and best, takes its place atomically. Other weights (a run resumed from an
        older checkpoint with a changed lr): the old one is set aside, not deleted, and reported.
        """
        existing = self.ckpt.path_for(self.step)
        if not existing.is_dir():
            return False
        try:
            verify_checkpoint(existing)
            old_state = json.loads((existing / STATE_NAME).read_text(encoding="utf-8"))
        except (CheckpointError, OSError, ValueError):
            return False  # broken: the store moves it aside and writes a fresh one
        if old_state.get("rank_checksums", [None])[0] == checksum:
            return True
        aside = self.ckpt.set_aside(existing, "replaced")
        _log.warning("a different checkpoint for step %d existed; kept it as %s", self.step, aside)
        return False

    def no_checkpoint_message(self) -> str:
        return (
            f"{self.run_dir} has no intact checkpoint in {self.ckpt.dir}; nothing to evaluate "
            "(train it first, or point -c at the config.yaml of a run that has checkpoints)"
        )

    def resume(self) -> None:
        mode = self.settings.checkpoint.resume
        if mode == "none":
            self.metrics.truncate_after(0)  # a fresh start: records of an earlier attempt would repeat
            return
        if mode == "auto":
            info = self.ckpt.latest()
            if info is None:
                self.metrics.truncate_after(0)
                return
        else:
            if not Path(mode).exists():
                raise FileNotFoundError(
                    f"checkpoint.resume={mode!r} does not exist; use auto, none, or a "
                    "checkpoint directory such as RUN_DIR/checkpoints/step-00000100"
                )
            info = verify_checkpoint(mode)
        tensors, state = self.ckpt.load(info)
        try:
            self.dual.student.load_state_dict(tensors["model"])
        except RuntimeError as e:
            detail = str(e).strip().splitlines()
            raise CheckpointError(
                f"{info} does not fit this run's student ({detail[-1].strip() if detail else e}); "
                "resume it with the config it was trained with, or start a new run elsewhere (run_dir=...)"
            ) from None
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        self.optimizer.load_state_dict(
            optimizer_state_from_tensors(tensors["optimizer"], state["optimizer_meta"])
        )
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_top1 = state.get("best_top1")
        rng = state["rng"]
        if len(rng) == self.world:
            restore_rng_state(rng[self.rank])
        elif self.is_main:
            _log.warning(
                "checkpoint was written by %d processes, this run has %d: RNG streams restart",
                len(rng),
                self.world,
            )
        self.last_ckpt = str(info)
        if self.is_main:
            self.metrics.truncate_after(self.step)
            print(
                f"resumed from {info} (step {self.step}, epoch {self.epoch}, position {self.position})",
                flush=True,
            )

    # -- the loop ---------------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.base_lr, self.settings.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        acc, clip = self.accelerator, self.settings.clip_grad
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with acc.accumulate(self.model):
            with acc.autocast():
                out: TransferOutput = self.model(x)
            task = self.loss_fn(out.logits.float(), y)
            terms = {"task": task, **out.terms}
            if out.loss is not None:
                terms["attn"] = out.loss
            total = task + out.loss if out.loss is not None else task
            terms["total"] = total
            _check_finite(terms, self.step, self.epoch, self.last_ckpt)
            acc.backward(total)
            if acc.sync_gradients and clip:
                terms["grad_norm"] = acc.clip_grad_norm_(self.dual.student.parameters(), clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        logs = {k: v.detach() for k, v in terms.items()}
        logs.update({k: v.detach() for k, v in out.logs.items()})
        return logs, acc.sync_gradients

    def _should_checkpoint_now(self) -> bool:
        c = self.settings.checkpoint
        if c.every_steps and self.step % c.every_steps == 0:
            return True
        return bool(c.every_minutes and time.monotonic() - self._last_save_time >= 60 * c.every_minutes)

    def _evaluate_all(self) -> dict[str, float]:
        res = {f"val_{k}": v for k, v in evaluate(self.model, self.val_loader, self.accelerator).items()}
        if self.ema_eval is not None:
            res.update(
                {
                    f"ema_val_{k}": v
                    for k, v in evaluate(self.ema_eval, self.val_loader, self.accelerator).items()
                }
            )
        return res

    def evaluate_checkpoint(self) -> dict[str, float]:
        """Load the checkpoint to evaluate (newest, or ``checkpoint.resume=PATH``) and score it; writes nothing."""
        mode = self.settings.checkpoint.resume
        if mode == "none" or (mode == "auto" and self.ckpt.latest() is None):
            raise CheckpointError(self.no_checkpoint_message())
        self.metrics.enabled = False  # resume must not touch the run's metrics
        self.resume()
        return self._evaluate_all()

    @torch.no_grad()
    def _log_attention_pictures(self) -> None:
        """Class-token maps (layer × head) of a few fixed validation images, the teacher's beside the
        student's, to TensorBoard: rank 0, at evaluations only."""
        n = max(0, self.settings.attention_images)
        if not (n and self.is_main and self.metrics.has_tensorboard):
            return
        if self._picture_x is None:
            self._picture_x = next(iter(self.val_loader))[0][:n]
        x = self._picture_x.to(self.accelerator.device)
        teacher, student = self.dual.teacher, self.dual.student
        was = student.training
        student.eval()
        try:
            borrow, t_cls = {}, None
            if teacher is not None:
                t_qk = layer_qk(teacher, x)
                t_cls = class_token_maps(teacher, x, qk=t_qk)
                chunks = self.plan.mode.borrow
                borrow = {
                    s: {c: t_qk[t][c] for c in chunks if c in "qk"} for s, t in self.plan.pairs if chunks
                }
            s_cls = class_token_maps(student, x, borrow)
        finally:
            student.train(was)
        for b in range(x.shape[0]):
            pick = lambda maps, b=b: [m[b] if m is not None else None for m in maps]
            image = display_image(x[b])
            fig = (
                class_token_figure(image, pick(t_cls), pick(s_cls))
                if t_cls is not None
                else class_token_figure(image, pick(s_cls), names=("student", ""))
            )
            self.metrics.log_image(f"attention/cls_maps_{b}", self.step, figure_array(fig))

    def run(self) -> TrainResult:
        s, acc = self.settings, self.accelerator
        start = time.monotonic()
        self._last_save_time = start
        if s.eval_only:
            final = self.evaluate_checkpoint()
            return TrainResult(str(self.run_dir), self.step, self.epoch, self.best_top1, final)
        self.resume()
        self.model.train()
        sampler, loader = self.train_sampler, self.train_loader
        final: dict[str, float] = {}
        progress = None
        global_batch = loader.batch_size * self.world
        epoch_len = sampler.length
        while self.step < self.total_steps:
            sampler.set_epoch(self.epoch)
            sampler.set_position(self.position)
            if self.is_main and s.progress:
                progress = tqdm(
                    total=self.position // global_batch + len(loader),
                    initial=self.position // global_batch,
                    desc=f"epoch {self.epoch}",
                    leave=False,
                    dynamic_ncols=True,
                )
            window: dict[str, list[float]] = {}
            batches_left = len(loader)
            for x, y in loader:
                batches_left -= 1
                x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
                lr = self._set_lr()
                upcoming = self.step + 1
                self.dual.log_kl = upcoming % s.log_every == 0 or upcoming == self.total_steps
                logs, stepped = self._train_step(x, y)
                self.position += global_batch  # global count: what every rank consumed together
                if progress is not None:
                    progress.update(1)
                for k, v in logs.items():
                    window.setdefault(k, []).append(float(v))
                if not stepped:
                    continue
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.dual.student)
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    rec = {k: sum(v) / len(v) for k, v in window.items()}
                    rec["lr"] = lr
                    self.metrics.log("train", self.step, rec, epoch=self.epoch + self.position / epoch_len)
                    if progress is not None:
                        progress.set_postfix(loss=f"{rec['total']:.3f}", lr=f"{lr:.2e}")
                    window = {}
                if self.step >= self.total_steps:
                    if batches_left == 0:  # the last step is also the epoch's last: a resume starts the next
                        self.epoch, self.position = self.epoch + 1, 0
                    break
                # the epoch's last step is saved by the epoch save below (one save per step)
                if self._should_checkpoint_now() and not (batches_left == 0 and s.checkpoint.every_epoch):
                    self.save()
            else:  # the loader ran dry: the epoch is complete
                self.epoch += 1
                self.position = 0
            if progress is not None:
                progress.close()
                progress = None
            final = self._evaluate_all()
            top1 = final["val_top1"]
            if self.best_top1 is None or top1 > self.best_top1:
                self.best_top1 = top1
            final["best_top1"] = self.best_top1
            self.metrics.log("val", self.step, final, epoch=self.epoch + self.position / epoch_len)
            self._log_attention_pictures()
            self.history.append({"step": self.step, "epoch": self.epoch + self.position / epoch_len, **final})
            if self.is_main:
                print(
                    f"epoch {self.epoch}: step {self.step}/{self.total_steps} val top1 {top1:.2f} "
                    f"(best {self.best_top1:.2f})",
                    flush=True,
                )
            if s.checkpoint.every_epoch or self.step >= self.total_steps:
                self.save(metric=top1)
        if not final:  # resumed a finished run: report where it stands
            final = self._evaluate_all()
            final["best_top1"] = self.best_top1 if self.best_top1 is not None else final["val_top1"]
        self.metrics.close()
        return TrainResult(
            str(self.run_dir),
            self.step,
            self.epoch,
            self.best_top1,
            final,
            self.history,
            time.monotonic() - start,
        )
