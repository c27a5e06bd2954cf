"""The training loop: one `train(cfg)` for a laptop, torchrun, accelerate or a SLURM task.

accelerate owns devices, DDP and autocast; we own the data order (a resumable
sampler), the schedule (per-iteration warmup + cosine), checkpoints (atomic
safetensors + JSON) and the teacher (a frozen guest inside `DualViT`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.store import (CheckpointManager, atomic_write_json, atomic_write_text,
                                 optimizer_state_from_tensors, optimizer_state_to_tensors)
from ..checkpoints.rng import capture_rng_state, restore_rng_state
from ..config import TrainConfig, dump_config, to_dict
from .distributed import backend_for, barrier, init_distributed, joined_process_group
from .metrics import MetricsLogger
from ..transfer.dual import DualViT, TransferOutput
from .ema import StudentEMA
from .optim import student_param_groups
from ..transfer.plan import build_plan
from ..apps.run_parts import RunParts, build_run_parts

__all__ = ["train", "evaluate", "TrainResult", "NonFiniteLossError", "lr_at"]

_log = logging.getLogger("attnxfer")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; nothing was saved over the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    epochs_done: float
    best_top1: Optional[float]
    final: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Per-iteration linear warmup then half-cosine to ``minimum``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but no CUDA device is visible; use device=cpu or auto")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if want_cuda else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    # Join the group ourselves before accelerate would: gloo for device=cpu even on a GPU node, and a clear
    # error where ranks would have to share a GPU. (A no-op for one process or an existing group.)
    init_distributed(backend_for(cfg.device))
    return Accelerator(cpu=not want_cuda, mixed_precision=mixed,
                       gradient_accumulation_steps=cfg.optim.accum_steps), precision


def _set_seed(seed: int) -> None:
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _task_loss(cfg: TrainConfig, num_classes: int):
    """Returns (mixup_fn or None, loss_fn(logits, targets))."""
    aug = cfg.aug
    if aug.mixup > 0 or aug.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                      switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    smoothing = aug.label_smoothing
    return None, lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=smoothing)


def _check_finite(terms: Dict[str, torch.Tensor], step: int, epoch: int, last_ckpt: Optional[str]) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite loss term {name!r} = {value.item()} at step {step} (epoch {epoch}); stopping without "
                f"saving ({where}). Try a lower optim.lr, optim.clip_grad=1.0, or a lower transfer.atd_weight.")


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, max_batches: Optional[int] = None) -> Dict[str, float]:
    """Top-1/top-5 and loss of ``model`` (a DualViT or a bare student) over ``loader``, summed over ranks."""
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
    return {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n, "loss": totals[2].item() / n}


def _weights_checksum(model: nn.Module) -> str:
    """A bit-exact fingerprint of the weights (ranks compare them before every save)."""
    import hashlib
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class _Trainer:
    """State of one run; `train` below is the public entry point."""

    def __init__(self, cfg: TrainConfig, parts: Optional[RunParts] = None):
        self.cfg = cfg
        self.accelerator, self.precision = _accelerator(cfg)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        _set_seed(cfg.seed)  # same init on every rank
        self.run_dir = Path(cfg.run_dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self.parts = parts or build_run_parts(cfg, rank=self.rank, world_size=self.world)
        p = self.parts
        self.plan = build_plan(p.teacher, p.student, cfg.transfer.mode, end_layer=cfg.transfer.end_layer,
                               layers=cfg.transfer.layers, weight=cfg.transfer.atd_weight,
                               share_drop_path=cfg.transfer.share_drop_path,
                               logit_weight=cfg.transfer.logit_distill,
                               logit_temperature=cfg.transfer.logit_temperature)
        teacher_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16,
                         "fp16": torch.float16}[cfg.teacher.dtype]
        self.dual = DualViT(p.teacher, p.student, self.plan, teacher_dtype=teacher_dtype)
        self.dual.to(acc.device)
        self.ema = StudentEMA(self.dual.student, cfg.ema.decay) if cfg.ema.decay else None
        # What evaluates the EMA weights: with the teacher when the mode attends with its q/k at eval.
        self.ema_eval = None
        if self.ema is not None:
            self.ema_eval = (DualViT(self.dual.teacher, self.ema.module, self.plan)
                             if self.plan.mode.teacher_at_eval else self.ema.module)
        global_batch = cfg.data.batch_size * self.world * cfg.optim.accum_steps
        self.base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * global_batch / 256
        groups = student_param_groups(self.dual, weight_decay=cfg.optim.weight_decay,
                                      layer_decay=cfg.optim.layer_decay)
        fused = {"fused": True} if acc.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                           eps=cfg.optim.eps, **fused)
        self.model, self.optimizer = acc.prepare(self.dual, self.optimizer)
        self.steps_per_epoch = len(p.train_loader) // cfg.optim.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set gives {len(p.train_loader)} batches per epoch, fewer than "
                             f"optim.accum_steps={cfg.optim.accum_steps}; lower data.batch_size")
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        if cfg.schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.schedule.max_steps)
        self.warmup_steps = int(round(cfg.schedule.warmup_epochs * self.steps_per_epoch))
        self.mixup, self.loss_fn = _task_loss(cfg, p.num_classes)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.checkpoint.keep_last)
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard, enabled=self.is_main)
        self.step, self.epoch, self.position = 0, 0, 0
        self.best_top1: Optional[float] = None
        self.last_ckpt: Optional[str] = None
        self.history: List[Dict[str, float]] = []

    # -- persistence ------------------------------------------------------------------------
    def write_run_files(self) -> None:
        if not self.is_main:
            return
        atomic_write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
        info = {"teacher": self.parts.teacher_record, "student": self.parts.student_spec,
                "plan": self.plan.describe(), "mode": self.plan.mode.name, "num_classes": self.parts.num_classes,
                "class_names": self.parts.class_names, "mean": self.parts.mean, "std": self.parts.std,
                "world_size": self.world, "precision": self.precision, "base_lr": self.base_lr,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}
        atomic_write_json(self.run_dir / "run.json", info)

    def save(self, metric: Optional[float] = None) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes."""
        rng = capture_rng_state()
        checksum = _weights_checksum(self.dual.student)
        if self.world > 1:
            import torch.distributed as dist
            gathered: List[Any] = [None] * self.world
            dist.all_gather_object(gathered, (rng, checksum))
            rng_all = [g[0] for g in gathered]
            checksums = [g[1] for g in gathered]
            if len(set(checksums)) != 1:
                raise RuntimeError(f"ranks hold different student weights at step {self.step} "
                                   f"(checksums {checksums}); the run is not data-parallel consistent")
        else:
            rng_all, checksums = [rng], [checksum]
        if self.is_main:
            opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
            tensors = {"model": self.dual.student.state_dict(), "optimizer": opt_tensors}
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            state = {"step": self.step, "epoch": self.epoch, "position": self.position,
                     "best_top1": self.best_top1, "rng": rng_all, "optimizer_meta": opt_meta,
                     "world_size": self.world, "rank_checksums": checksums,
                     "teacher": self.parts.teacher_record,
                     "config": to_dict(self.cfg)}
            info = self.ckpt.save(self.step, tensors, state, metric=metric)
            self.last_ckpt = str(info)
        barrier()
        self._last_save_time = time.monotonic()

    def resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return
        if mode == "auto":
            info = self.ckpt.latest()
            if info is None:
                return
        else:
            from ..checkpoints.store import verify_checkpoint
            if not Path(mode).exists():
                raise FileNotFoundError(f"checkpoint.resume={mode!r} does not exist; use auto, none, or a "
                                        "checkpoint directory such as RUN_DIR/checkpoints/step-00000100")
            info = verify_checkpoint(mode)
        tensors, state = self.ckpt.load(info)
        self.dual.student.load_state_dict(tensors["model"])
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        self.optimizer.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], state["optimizer_meta"]))
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_top1 = state.get("best_top1")
        rng = state["rng"]
        if len(rng) == self.world:
            restore_rng_state(rng[self.rank])
        elif self.is_main:
            _log.warning("checkpoint was written by %d processes, this run has %d: RNG streams restart",
                         len(rng), self.world)
        self.last_ckpt = str(info)
        if self.is_main:
            print(f"resumed from {info} (step {self.step}, epoch {self.epoch}, position {self.position})",
                  flush=True)

    # -- the loop ---------------------------------------------------------------------------
    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.base_lr, self.cfg.optim.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], bool]:
        acc, cfg = self.accelerator, self.cfg
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
            if acc.sync_gradients and cfg.optim.clip_grad:
                terms["grad_norm"] = acc.clip_grad_norm_(self.dual.student.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        logs = {k: v.detach() for k, v in terms.items()}
        logs.update({k: v.detach() for k, v in out.logs.items()})
        return logs, acc.sync_gradients

    def _should_checkpoint_now(self) -> bool:
        c = self.cfg.checkpoint
        if c.every_steps and self.step % c.every_steps == 0:
            return True
        if c.every_minutes and time.monotonic() - self._last_save_time >= 60 * c.every_minutes:
            return True
        return False

    def _evaluate_all(self) -> Dict[str, float]:
        p = self.parts
        res = {f"val_{k}": v for k, v in evaluate(self.model, p.val_loader, self.accelerator).items()}
        if self.ema_eval is not None:
            res.update({f"ema_val_{k}": v
                        for k, v in evaluate(self.ema_eval, p.val_loader, self.accelerator).items()})
        return res

    def run(self) -> TrainResult:
        cfg, p, acc = self.cfg, self.parts, self.accelerator
        start = time.monotonic()
        self._last_save_time = start
        self.write_run_files()
        if self.is_main:
            print(self.plan.describe(), flush=True)
        self.resume()
        if cfg.eval_only:
            final = self._evaluate_all()
            return TrainResult(str(self.run_dir), self.step, self.epoch, self.best_top1, final)
        self.model.train()
        sampler = p.train_sampler
        final: Dict[str, float] = {}
        progress = None
        global_batch = cfg.data.batch_size * self.world
        epoch_len = sampler.length
        while self.step < self.total_steps:
            sampler.set_epoch(self.epoch)
            sampler.set_position(self.position)
            if self.is_main and cfg.log.progress:
                from tqdm.auto import tqdm
                progress = tqdm(total=self.position // global_batch + len(p.train_loader),
                                initial=self.position // global_batch, desc=f"epoch {self.epoch}",
                                leave=False, dynamic_ncols=True)
            window: Dict[str, List[float]] = {}
            for x, y in p.train_loader:
                x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
                lr = self._set_lr()
                upcoming = self.step + 1
                self.dual.log_kl = upcoming % cfg.log.every_steps == 0 or upcoming == self.total_steps
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
                if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps:
                    rec = {k: sum(v) / len(v) for k, v in window.items()}
                    rec["lr"] = lr
                    self.metrics.log("train", self.step, rec, epoch=self.epoch + self.position / epoch_len)
                    if progress is not None:
                        progress.set_postfix(loss=f"{rec['total']:.3f}", lr=f"{lr:.2e}")
                    window = {}
                if self.step >= self.total_steps:
                    break
                if self._should_checkpoint_now():
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
            self.history.append({"step": self.step, "epoch": self.epoch + self.position / epoch_len, **final})
            if self.is_main:
                print(f"epoch {self.epoch}: step {self.step}/{self.total_steps} val top1 {top1:.2f} "
                      f"(best {self.best_top1:.2f})", flush=True)
            if cfg.checkpoint.every_epoch or self.step >= self.total_steps:
                self.save(metric=top1)
        if not final:  # resumed a finished run: report where it stands
            final = self._evaluate_all()
            final["best_top1"] = self.best_top1 if self.best_top1 is not None else final["val_top1"]
        self.metrics.close()
        return TrainResult(str(self.run_dir), self.step, self.epoch, self.best_top1, final, self.history,
                           time.monotonic() - start)


def train(cfg: TrainConfig, parts: Optional[RunParts] = None) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; ``parts`` lets a notebook pass models/data it built.

    Under torchrun or a submitted job it joins the ranks' process group (and leaves it again if it
    was the one to create it)."""
    with joined_process_group(backend_for(cfg.device)):
        return _Trainer(cfg, parts).run()
