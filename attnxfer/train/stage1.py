"""Stage 1 of conversion: every efficient student layer fitted, all at once and independently, to the
teacher's attention on the teacher's hidden input for that layer, through the engine's optimiser step.

Nothing is read on the host on unlogged steps: the per-layer losses and metrics are summed on the device
(`TermWindow`) and watched by a `NonFiniteGuard` read at log steps (the last step among them), so a
non-finite loss raises `NonFiniteLossError` before stage 1 returns or saves. Until then the fused optimiser
skips every step from the bad one on (the guard is its ``found_inf``, as under a grad scaler; under several
ranks it rides in the gradients' all-reduce, so every rank skips, and raises, alike).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..models.attention import StopForward, attention_layers, capture_attention
from ..models.handover import Signal
from ..speak import say
from ..transfer.conversion import ConversionPlan, LayerConversion, layer_fit_loss, layer_tensors
from ..transfer.step_loss import Loss
from ..transfer.teacher_pass import block_of
from .distributed import RankAverage, gather_objects, sum_over_ranks
from .engine import train_step
from .objective import Autocast, Objective
from .optim import AdamWImplementation, build_adamw, optimizer_implementation
from .peak_memory import PeakMemory
from .schedule import lr_at
from .stop import StopRequested, stop_on_signals, stop_signal
from .terms import NonFiniteGuard, NonFiniteLossError, TermWindow


@dataclass
class Stage1Result:
    """What stage 1 did: its steps, seconds, one record per log step (the mean ``loss`` and each layer's
    ``metric/{block}`` since the previous record, the last ``lr``) and its peak memory (`_memory`)."""

    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed: bool = False
    memory: dict[str, Any] | None = None
    # the terms summed since the last record (`TermWindow.state`): a resume's next record covers the same steps
    window: list[list] = field(default_factory=list)


def teacher_signals(
    teacher: nn.Module, x: torch.Tensor, layers: Sequence[int], fields: Sequence[Signal | str]
) -> dict[int, dict[str, torch.Tensor]]:
    """Per-layer ``fields`` of the teacher on ``x`` (`Signal`s of a layer: its input, q, k, v, output);
    stops after the last needed block."""

    def stop_here(*_):  # the block of the last layer stage 1 needs has run: nothing after it is read
        raise StopForward

    last = block_of(teacher, attention_layers(teacher)[max(layers)][0])  # the block of the last attention
    stop = last.register_forward_hook(stop_here)
    try:
        with (
            torch.no_grad(),
            capture_attention(teacher, layers, fields) as store,
            contextlib.suppress(StopForward),
        ):
            teacher.forward_features(x)
    finally:
        stop.remove()
    return store


class Stage1Objective(Objective):
    """Stage 1's loss: each active layer's fit loss on the teacher's signals, summed. A batch is images or
    signals a caller computed once; the terms are the per-layer losses, named by the layer's place in
    ``plan.active`` (`watched` maps the names back, for the non-finite guard's message)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, plan: ConversionPlan) -> None:
        self.teacher, self.plan = teacher, plan
        self.module = self.trained = student
        self.description = plan.describe()
        self.watched: dict[str, LayerConversion] = {str(i): layer for i, layer in enumerate(plan.active)}
        self.fields = plan.teacher_signals  # what each fitted teacher layer hands over
        self._attentions = [attn for _, attn in attention_layers(student)]
        #: each active layer's (q shape, k shape) of the teacher on the first batch: what its whole maps are
        self.map_shapes: list[tuple[torch.Size, torch.Size]] | None = None
        self.images: int | None = None  # the first batch's images (None: fitted on cached signals)

    def loss(
        self, model: nn.Module, x: Any, y: Any = None, autocast: Autocast = contextlib.nullcontext
    ) -> Loss:
        """The batch's summed fit loss; ``model`` is the student (its attention layers were listed once)."""
        layers = [layer.layer for layer in self.plan.active]
        signals = x if isinstance(x, Mapping) else teacher_signals(self.teacher, x, layers, self.fields)
        if self.map_shapes is None:
            self.map_shapes = [(signals[i]["q"].shape, signals[i]["k"].shape) for i in layers]
            self.images = None if isinstance(x, Mapping) else len(x)
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        with autocast():
            for name, layer in self.watched.items():
                loss, metric = layer_fit_loss(
                    self._attentions[layer.layer], layer, signals[layer.layer], self.plan.output_mse
                )
                losses[name] = loss
                if metric is not None:
                    metrics[f"metric/{layer.layer}"] = metric
        total = sum(losses.values())
        return Loss(total, {**losses, "total": total}, metrics)

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any = None) -> dict[str, float]:
        """``loss``: the summed fit loss per image over a loader of images (``(x, y)`` batches) or of signals,
        without gradients (held-out fit), summed over ranks. Each batch's loss is a mean over its images, so
        it weighs by its images: a short last batch (or a rank's shorter share) counts as the images it holds,
        and the score does not depend on how the images were batched or shared out."""
        device = next(model.parameters()).device
        total, images = 0.0, 0
        with torch.no_grad():
            for item in loader:
                x = item[0] if isinstance(item, (tuple, list)) else item
                if isinstance(x, torch.Tensor):
                    x = x.to(device)
                n = _batch_rows(x)
                total += float(self.loss(model, x).total) * n
                images += n
        total, images = sum_over_ranks([total, images], device)
        return {"loss": total / max(1, images)}


def _batch_rows(x: Any) -> int:
    """A batch's weight, proportional to its images: the images of a tensor batch, or the leading size of the
    first tensor of its first layer's signals (the same one in every batch; a windowed layer's q and k have
    a row per image and window)."""
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    first = next(iter(x.values()))
    return next(v for v in first.values() if isinstance(v, torch.Tensor)).shape[0]


def stage1_transfer(
    teacher: nn.Module,
    student: nn.Module,
    plan: ConversionPlan,
    batches: Iterator[torch.Tensor] | Iterator[Mapping[int, Mapping[str, torch.Tensor]]],
    **options: Any,
) -> Stage1Result:
    """`Stage1Fit` (its keyword ``options``) stepped to its end, one batch of ``batches`` a step: images on
    the models' device, or the teacher's signals per layer computed once and reused (`attnxfer.search` fits
    hundreds of candidates to the same inputs). With ``on_save``, a SIGTERM ends the loop at the next step
    boundary: that step is saved, then `StopRequested`."""
    if plan.stage1_steps <= 0 or not plan.active:
        return Stage1Result()
    fit = Stage1Fit(teacher, student, plan, **options)
    saves = fit.on_save is not None
    # SIGTERM only sets a flag while the loop can save on it
    with fit, stop_on_signals() if saves else contextlib.nullcontext():
        while not fit.finished:
            fit.step(next(batches))
            signum = stop_signal() if saves else None
            if signum:  # SIGTERM: save this step (never weights after a non-finite loss), then stop
                raise fit.stopped(signum)
        return fit.finish()


class Stage1Fit:
    """Stage 1 of one student, one step at a time: `stage1_transfer` drives one to its end; a convert study
    (`attnxfer.apps.convert.conversion_study`) drives several in lock step on signals of one teacher pass.

    Entered (``with``), the student is in eval mode (fixed random features, no dropout) with gradients only
    for the tensors the plan fits and the optimiser is built (from ``optimizer_state`` where given); left,
    the student's modes and flags are restored. With ``on_save``, every ``save_every`` steps and on a stop,
    ``on_save(steps_done, optimizer_state, partial_result)`` saves (the guard read first) and returns where;
    ``start_step``, ``optimizer_state`` and ``history`` continue from such a save (the batches must then
    start at that step's batch)."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        plan: ConversionPlan,
        *,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        clip_grad: float | None = None,
        log_every: int = 20,
        start_step: int = 0,
        optimizer_state: Mapping[str, Any] | None = None,
        history: Sequence[dict[str, Any]] = (),
        on_save: Callable[[int, dict[str, Any], Stage1Result], str | None] | None = None,
        save_every: int | None = None,
        log_window: Sequence[list] = (),
    ) -> None:
        self.teacher, self.student, self.plan = teacher, student, plan
        self.warmup_steps, self.weight_decay, self.clip_grad = warmup_steps, weight_decay, clip_grad
        self.log_every = max(1, log_every)
        self.optimizer_state, self.on_save, self.save_every = optimizer_state, on_save, save_every
        self.done = start_step  # optimiser steps taken (an earlier run's included)
        self.result = Stage1Result(history=list(history))
        self.objective = Stage1Objective(teacher, student, plan)
        self.guard, self.window = NonFiniteGuard(), TermWindow()
        self._log_window = list(log_window)  # a stopped stage 1's terms since its last record
        self._stack = contextlib.ExitStack()
        self._saved: tuple[int, str | None] | None = None  # (step, where) of the last save

    @property
    def finished(self) -> bool:
        return self.done >= self.plan.stage1_steps

    def __enter__(self) -> Stage1Fit:
        self.device = next(self.student.parameters()).device
        self.window = TermWindow.restored(self._log_window, self.device)
        groups = self._stack.enter_context(_fitting_only(self.student, self.plan, self.weight_decay))
        self.optimizer = build_adamw(groups, lr=self.plan.stage1_lr, device=self.device)
        if self.optimizer_state is not None:  # a stopped stage 1's
            self.optimizer.load_state_dict(self.optimizer_state)
        if optimizer_implementation(self.optimizer) == AdamWImplementation.FUSED:
            # torch's fused kernel skips its update (moments and step counters too) while ``found_inf`` is 1.0:
            # the non-finite guard sets it, as a grad scaler would
            self.optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        self.gradients = RankAverage(self.optimizer)  # data parallel: every rank's gradients averaged
        self.start = time.monotonic()
        self._meter = PeakMemory(self.device).start()  # the teacher's maps are built a row chunk at a time
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def step(self, x: Any) -> int:
        """One optimiser step on batch ``x`` (the engine's `train_step`; only the per-layer losses go to the
        guard); returns the steps done. Nothing is read on the host but on log steps, and the last step
        always logs: stage 1 never ends without reading the guard."""
        step, steps, lr0, objective = self.done, self.plan.stage1_steps, self.plan.stage1_lr, self.objective
        lr = lr_at(step, steps, self.warmup_steps, lr0, lr0 * 0.01)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = train_step(
            lambda: objective.loss(objective.module, x),
            self.optimizer,
            self.gradients,
            self.guard,
            (step, 0),
            model=objective.module,
            params=[p for g in self.optimizer.param_groups for p in g["params"]],
            clip_grad=self.clip_grad,
            watched=list(objective.watched),
        )
        self.window.add({"loss": out.total, **out.logs})
        if (step + 1) % self.log_every == 0 or step + 1 == steps or step == 0:
            self._log(step, lr)
        self.done = step + 1
        if self.on_save and self.save_every and self.done % self.save_every == 0 and self.done < steps:
            self._save()
        return self.done

    def _log(self, step: int, lr: float) -> None:
        self._stop_if_non_finite()
        means = self.window.means()
        rec = {"step": step + 1, "loss": means.pop("loss"), "lr": lr, **means}
        self.result.history.append(rec)
        per_layer = " ".join(f"{v:.3g}" for v in means.values())
        kinds = "/".join(sorted({layer.loss.metric for layer in self.plan.active}))
        say(
            f"stage 1 step {step + 1}/{self.plan.stage1_steps}: loss {rec['loss']:.4f} lr {lr:.2e} | "
            f"per-layer {kinds}: {per_layer}"
        )

    def _save(self) -> str | None:
        """Save the steps done through ``on_save``; every rank reads the guard first, so no weights after a
        non-finite loss are saved."""
        self._stop_if_non_finite()
        self.result.steps, self.result.seconds = self.done, time.monotonic() - self.start
        self.result.window = self.window.state()  # every rank (a collective), before rank 0 writes
        where = self.on_save(self.done, self.optimizer.state_dict(), self.result)
        self._saved = (self.done, where)
        return where

    def stopped(self, signum: int) -> StopRequested:
        """A stop signal after `done` steps: save them (unless just saved); where, in the stop to raise."""
        where = self._saved[1] if self._saved and self._saved[0] == self.done else self._save()
        return StopRequested(signum, self.done, where, self.plan.stage1_steps)

    def finish(self) -> Stage1Result:
        """The result of the whole stage 1 (call once `finished`): its steps, seconds and peak memory."""
        self.result.steps = self.plan.stage1_steps
        self.result.seconds = time.monotonic() - self.start
        self.result.memory = _memory(self._meter, self.objective)
        m, images = self.result.memory, self.objective.images
        # a windowed layer's rows are its windows: B is the images' batch times the windows of each
        rows = f"B = {m['batch']}"
        if images and m["batch"] > images and m["batch"] % images == 0:
            rows += f": {m['batch'] // images} windows x a batch of {images}"
        say(
            f"stage 1 memory: peak {_mib(m['peak_bytes'])} ({m['measured']}); whole teacher maps would "
            f"take {_mib(m['whole_maps_bytes_per_layer'])} per layer, {_mib(m['whole_maps_bytes'])} "
            f"for {m['layers']} layer{'s' * (m['layers'] != 1)} (B·H·N²·4 bytes at N = {m['tokens']:,} "
            f"tokens, {rows})"
        )
        return self.result

    def _stop_if_non_finite(self) -> None:
        """Raise `NonFiniteLossError` if a layer's loss was NaN/inf on any rank since stage 1 started: one read
        and a collective, so every rank raises at the same step; then (rare) the ranks share their first bad
        step, so every rank's message names the earliest one."""
        if not self.guard.any_rank_tripped():
            return
        mine = self.guard.first()
        step, term = min(f for f in gather_objects(mine and (mine.step, mine.term)) if f is not None)
        layer = self.objective.watched[term]
        raise NonFiniteLossError(
            f"stage 1: non-finite {layer.objective or layer.loss} loss in block {layer.layer} "
            f"({layer.attention}) at step {step + 1}; lower convert.stage1_lr or set convert.stage1_clip_grad"
        )


def _memory(meter: PeakMemory, objective: Stage1Objective) -> dict[str, Any]:
    """Stage 1's peak memory beside what the teacher's whole maps would take (B·H·N_q·N_k·4 bytes a layer)."""
    shapes = objective.map_shapes or []
    # each layer's (q shape, k shape), both (B, H, N, d): windows and mask units are rows of B
    maps = [int(q[0]) * int(q[1]) * int(q[2]) * int(k[2]) * 4 for q, k in shapes]
    widest = shapes[maps.index(max(maps))] if maps else None
    tokens, batch = (int(widest[0][2]), int(widest[0][0])) if widest else (0, 0)
    return {
        "peak_bytes": meter.peak(),
        "measured": meter.how,
        "whole_maps_bytes_per_layer": max(maps, default=0),
        "whole_maps_bytes": sum(maps),
        "layers": len(maps),
        "tokens": tokens,
        "batch": batch,
    }


@contextlib.contextmanager
def _fitting_only(student: nn.Module, plan: ConversionPlan, weight_decay: float) -> Iterator[list[dict]]:
    """The student in eval mode with gradients only for the tensors the plan fits (q/k rows of a fused qkv
    through a row mask, with no weight decay, so the v rows stay bit-identical); yields the parameter groups."""
    was_training = student.training
    requires = {name: p.requires_grad for name, p in student.named_parameters()}
    student.eval().requires_grad_(False)
    plain, masked, hooks = [], [], []
    for _, p, mask in layer_tensors(student, plan):
        p.requires_grad_(True)
        if mask is None:
            plain.append(p)
        else:
            masked.append(p)
            hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
    groups = [{"params": plain, "weight_decay": weight_decay}, {"params": masked, "weight_decay": 0.0}]
    try:
        yield [g for g in groups if g["params"]]
    finally:
        for h in hooks:
            h.remove()
        for name, p in student.named_parameters():
            p.requires_grad_(requires[name])
        student.train(was_training)


def _mib(size: float) -> str:
    """Bytes as the log says them: whole MiB, and a size under 1 MiB in KiB, not as 0 MiB."""
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"
