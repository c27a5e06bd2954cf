"""Stage 1 of conversion, layer-parallel attention transfer: its own schedule and saves, the engine's step.

Every efficient student layer receives the teacher's hidden input for that layer and is fitted to the
teacher's attention there (`attnxfer.transfer.conversion` says with which loss and which tensors); the
layers train at once and independently. Its loss is an `Objective` (`Stage1Objective`: the per-layer
fit losses and their agreement metrics, `attnxfer.train.objective`'s protocol, as the engine's objectives
are); it shares the engine's optimiser step (`attnxfer.train.engine.train_step`, with `RankAverage` as its
gradients: data parallel, each rank its batches, gradients averaged), schedule (`attnxfer.train.schedule`),
optimiser (`build_adamw`: fused on CUDA and CPU) and step contracts.

The step contracts: nothing is read on the host on unlogged steps. The per-layer losses and
metrics are summed on the device (`TermWindow`) and read at log steps; the per-layer losses go through a
`NonFiniteGuard`, read (and combined over ranks) at log steps, the last step among them, so a non-finite
loss still raises `NonFiniteLossError` naming the block, its attention and objective and the step before
stage 1 returns, and nothing it trained is saved or handed on. Until then the fused optimiser skips every
step from the bad one on (the guard is its ``found_inf``, as under a grad scaler): the student keeps the
weights it had before that step, as when the check ran in Python on every step. Under several ranks the
flag rides in the gradients' all-reduce, so every rank skips from that step on and every rank raises
the same error (the earliest bad step of any rank) at the same log step.
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
from .distributed import RankAverage, gather_objects, min_over_ranks, rank_and_world, sum_over_ranks
from .engine import train_step
from .objective import Autocast, Objective
from .optim import AdamWImplementation, build_adamw, optimizer_implementation
from .peak_memory import PeakMemory, describe_memory
from .schedule import lr_at
from .stop import StopRequested, stop_on_signals, stop_signal
from .terms import NO_STEP, NonFiniteGuard, NonFiniteLossError, TermWindow


@dataclass
class Stage1Result:
    """What stage 1 did: its steps and seconds, and one record per log step (``loss``: the mean summed loss
    over the steps since the previous record, ``metric/{block}``: each layer's mean agreement metric over
    the same steps, ``lr``: the last step's). ``memory``: its peak memory beside what the teacher's whole maps
    would take (`_memory`), None where it did not run here."""

    steps: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed: bool = False
    memory: dict[str, Any] | None = None


def teacher_signals(
    teacher: nn.Module, x: torch.Tensor, layers: Sequence[int], fields: Sequence[Signal | str]
) -> dict[int, dict[str, torch.Tensor]]:
    """Per-layer ``fields`` of the teacher on ``x`` (`Signal`s of a layer: its input, q, k, v, output);
    stops after the last needed block."""

    def stop_here(*_):  # the block of the last layer stage 1 needs has run: nothing after it is read
        raise StopForward

    last = attention_layers(teacher)[max(layers)][0].rsplit(".", 1)[0]  # the block holding that attention
    stop = teacher.get_submodule(last).register_forward_hook(stop_here)
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
    """Stage 1's loss, meeting the `Objective` protocol: each active layer's fit loss
    (`attnxfer.transfer.conversion.layer_fit_loss`) on the teacher's signals, summed.

    A batch ``x`` is input images (the teacher's signals are computed here, `teacher_signals`) or signals a
    caller computed once. The terms are the per-layer losses, named by the layer's position in
    ``plan.active`` (`watched` maps the names back, for the non-finite guard's message), plus ``total``;
    the logs are each layer's agreement metric (``metric/{block}``), where its loss has one.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, plan: ConversionPlan) -> None:
        self.teacher, self.plan = teacher, plan
        self.module = self.trained = student
        self.description = plan.describe()
        self.watched: dict[str, LayerConversion] = {str(i): layer for i, layer in enumerate(plan.active)}
        self.fields = plan.teacher_signals  # what each fitted teacher layer hands over
        self._attentions = [attn for _, attn in attention_layers(student)]
        #: each active layer's (q shape, k shape) of the teacher on the first batch: what its whole maps are
        self.map_shapes: list[tuple[torch.Size, torch.Size]] | None = None

    def signals(self, x: torch.Tensor | Mapping[int, Mapping[str, torch.Tensor]]):
        """The teacher's per-layer signals for a batch of images (or ``x`` itself, already signals)."""
        if isinstance(x, Mapping):
            return x
        return teacher_signals(self.teacher, x, [layer.layer for layer in self.plan.active], self.fields)

    def loss(
        self, model: nn.Module, x: Any, y: Any = None, autocast: Autocast = contextlib.nullcontext
    ) -> Loss:
        """The batch's summed fit loss; ``model`` is the student (its attention layers were listed once)."""
        signals = self.signals(x)
        if self.map_shapes is None:
            self.map_shapes = [
                (signals[layer.layer]["q"].shape, signals[layer.layer]["k"].shape)
                for layer in self.plan.active
            ]
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
        """``loss``: the mean summed fit loss over a loader of images (``(x, y)`` batches) or of signals,
        without gradients (held-out fit; this rank's batches)."""
        device = next(model.parameters()).device
        total, batches = 0.0, 0
        with torch.no_grad():
            for item in loader:
                x = item[0] if isinstance(item, (tuple, list)) else item
                if isinstance(x, torch.Tensor):
                    x = x.to(device)
                total += float(self.loss(model, x).total)
                batches += 1
        return {"loss": total / max(1, batches)}


def stage1_transfer(
    teacher: nn.Module,
    student: nn.Module,
    plan: ConversionPlan,
    batches: Iterator[torch.Tensor] | Iterator[Mapping[int, Mapping[str, torch.Tensor]]],
    **options: Any,
) -> Stage1Result:
    """Fit each efficient layer to the teacher's attention on the teacher's hidden inputs: `Stage1Fit` (its
    keyword ``options``: warm-up, weight decay, clipping, logging, where a stopped run goes on from, saving)
    stepped to its end, one batch of ``batches`` a step.

    Only the tensors the plan names get gradients (q/k rows of a fused qkv through a row mask, with no
    weight decay, so the v rows stay bit-identical); the student runs in eval mode (fixed random
    features, no dropout). ``batches`` yields input images (already on the models' device), or the
    teacher's signals per layer (``teacher_signals``'s result) that a caller computed once and reuses
    (`attnxfer.search` fits hundreds of candidates to the same teacher inputs). With ``on_save``, a SIGTERM
    (`attnxfer.train.stop`) ends the loop at the next step boundary: that step is saved, then `StopRequested`.
    """
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
    (`attnxfer.apps.convert.conversion_study`) drives several in lock step, each step on signals of one teacher pass.

    Entered (``with``), the student is in eval mode with gradients only for the tensors the plan fits and
    the optimiser is built (from ``optimizer_state`` where given); left, the student's modes and flags are
    restored. `step` takes one batch (images, or the teacher's signals per layer: a mapping holding at least
    the layers and fields of `objective`), logs every ``log_every`` steps (reading the non-finite guard there)
    and saves every ``save_every`` steps through ``on_save``; `stopped` saves the step reached after a stop
    signal; `finish` closes the result (its steps, seconds and peak memory).

    With ``on_save``, every save reads the guard first (no non-finite weights are saved) and
    ``on_save(steps_done, optimizer_state, partial_result)`` saves them and returns where. ``start_step``,
    ``optimizer_state`` and ``history`` continue from such a save (the batches must then start at that step's
    batch)."""

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
        prefix: str = "",
        start_step: int = 0,
        optimizer_state: Mapping[str, Any] | None = None,
        history: Sequence[dict[str, Any]] = (),
        on_save: Callable[[int, dict[str, Any], Stage1Result], str | None] | None = None,
        save_every: int | None = None,
    ) -> None:
        self.teacher, self.student, self.plan = teacher, student, plan
        self.warmup_steps, self.weight_decay, self.clip_grad = warmup_steps, weight_decay, clip_grad
        self.log_every, self.prefix = max(1, log_every), prefix
        self.optimizer_state, self.on_save, self.save_every = optimizer_state, on_save, save_every
        self.done = start_step  # optimiser steps taken (an earlier run's included)
        self.result = Stage1Result(history=list(history))
        self.objective = Stage1Objective(teacher, student, plan)
        self._stack = contextlib.ExitStack()
        self._fit: _Fit | None = None
        self._meter: PeakMemory | None = None
        self._saved: tuple[int, str | None] | None = None  # (step, where) of the last save

    @property
    def finished(self) -> bool:
        return self.done >= self.plan.stage1_steps

    def __enter__(self) -> Stage1Fit:
        device = next(self.student.parameters()).device
        groups = self._stack.enter_context(_fitting_only(self.student, self.plan, self.weight_decay))
        optimizer = _stage1_optimizer(groups, self.plan.stage1_lr, device, self.optimizer_state)
        steps = self.plan.stage1_steps
        self._fit = _Fit(self.objective, optimizer, device, steps, self.result)
        self._meter = PeakMemory(
            device
        ).start()  # the teacher's maps are built a row chunk at a time: measured
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def step(self, x: Any) -> int:
        """One optimiser step on batch ``x`` (nothing read on the host but on log steps); returns the steps
        done. The last step always logs: stage 1 never ends without reading the guard."""
        assert self._fit is not None, "enter the Stage1Fit (with ...) before stepping it"
        step, steps, lr0 = self.done, self.plan.stage1_steps, self.plan.stage1_lr
        lr = lr_at(step, steps, self.warmup_steps, lr0, lr0 * 0.01)
        self._fit.step(x, step, lr, self.clip_grad)
        if (step + 1) % self.log_every == 0 or step + 1 == steps or step == 0:
            self._say(self._fit.log_step(step, lr))
        self.done = step + 1
        if self.on_save and self.save_every and self.done % self.save_every == 0 and self.done < steps:
            self._save()
        return self.done

    def _save(self) -> str | None:
        assert self._fit is not None and self.on_save is not None
        where = self._fit.saved(self.done, self.on_save)
        self._saved = (self.done, where)
        return where

    def stopped(self, signum: int) -> StopRequested:
        """A stop signal after `done` steps: save them (unless just saved; never weights after a non-finite
        loss) and say where."""
        where = self._saved[1] if self._saved and self._saved[0] == self.done else self._save()
        stop = StopRequested(signum, self.done, where)
        self._say(f"stage 1: {stop} (step {self.done} of {self.plan.stage1_steps})")
        return stop

    def finish(self) -> Stage1Result:
        """The result of the whole stage 1 (call once `finished`): its steps, seconds and peak memory."""
        assert self._fit is not None and self._meter is not None
        self.result.steps = self.plan.stage1_steps
        self.result.seconds = time.monotonic() - self._fit.start
        self.result.memory = _memory(self._meter, self.objective)
        self._say(describe_memory(self.result.memory))
        return self.result

    def _say(self, line: str) -> None:
        """A stage-1 line, after ``prefix`` (a study's student name)."""
        say(f"{self.prefix}{line}")


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
    """The student in eval mode (fixed random features, no dropout) with gradients only for the tensors
    the plan fits: q/k rows of a fused qkv through a row mask, with no weight decay, so the v rows stay
    bit-identical. Yields the optimiser's parameter groups; restores modes and flags after."""
    was_training = student.training
    requires = {name: p.requires_grad for name, p in student.named_parameters()}
    student.eval().requires_grad_(False)
    plain, masked, hooks = [], [], []
    for _, tensors in layer_tensors(student, plan):
        for _, p, mask in tensors:
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


def _stage1_optimizer(
    groups: list[dict], lr: float, device: torch.device, state: Mapping[str, Any] | None
) -> torch.optim.Optimizer:
    """AdamW over the fitted tensors, from a stopped stage 1's ``state`` if given. A fused AdamW gets a
    ``found_inf`` flag: torch's fused kernel skips its update (moments and step counters included) while it
    is 1.0, and the non-finite guard sets it (as under a grad scaler)."""
    optimizer = build_adamw(groups, lr=lr, device=device)
    if state is not None:
        optimizer.load_state_dict(state)
    if optimizer_implementation(optimizer) == AdamWImplementation.FUSED:
        optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=device)
    return optimizer


@dataclass
class _Fit:
    """One stage-1 run's moving parts: the objective, the optimiser, the non-finite guard (read at log
    steps only), the window of logged terms summed on the device, and the result so far."""

    objective: Stage1Objective
    optimizer: torch.optim.Optimizer
    device: torch.device
    steps: int
    result: Stage1Result
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    window: TermWindow = field(default_factory=TermWindow)
    start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.gradients = RankAverage(self.optimizer)

    def step(self, x: Any, step: int, lr: float, clip_grad: float | None) -> None:
        """One optimiser step at ``lr`` on batch ``x``, the engine's (`train_step`, its gradients averaged
        over ranks with the guard's ``found_inf``: every rank skips once any rank's guard tripped); only the
        per-layer losses go to the guard. Nothing is read on the host."""
        optimizer, objective = self.optimizer, self.objective
        for g in optimizer.param_groups:
            g["lr"] = lr
        out = train_step(
            lambda: objective.loss(objective.module, x),
            optimizer,
            self.gradients,
            self.guard,
            (step, 0),
            model=objective.module,
            params=[p for g in optimizer.param_groups for p in g["params"]],
            clip_grad=clip_grad,
            watched=list(objective.watched),
        )
        self.window.add({"loss": out.total, **out.logs})

    def log_step(self, step: int, lr: float) -> str:
        """Read the guard and the window: one history record, and its line to say."""
        _stop_if_non_finite(self.guard, self.objective.watched)
        means = self.window.means()
        # every rank's mean over its own batches, then the mean over ranks (equal batch sizes)
        _, world = rank_and_world()
        means = dict(zip(means, (v / world for v in sum_over_ranks(list(means.values()), self.device))))
        rec = {"step": step + 1, "loss": means.pop("loss"), "lr": lr, **means}
        self.result.history.append(rec)
        per_layer = " ".join(f"{v:.3g}" for v in means.values())
        kinds = "/".join(sorted({layer.loss.metric for layer in self.objective.plan.active}))
        return (
            f"stage 1 step {step + 1}/{self.steps}: loss {rec['loss']:.4f} lr {lr:.2e} | per-layer "
            f"{kinds}: {per_layer}"
        )

    def saved(
        self, done: int, on_save: Callable[[int, dict[str, Any], Stage1Result], str | None]
    ) -> str | None:
        """Save the ``done`` steps through ``on_save`` (never weights after a non-finite loss: every rank reads
        the guard first) and say where."""
        _stop_if_non_finite(self.guard, self.objective.watched)
        self.result.steps, self.result.seconds = done, time.monotonic() - self.start
        return on_save(done, self.optimizer.state_dict(), self.result)


def _stop_if_non_finite(guard: NonFiniteGuard, watched: Mapping[str, LayerConversion]) -> None:
    """Raise `NonFiniteLossError` if a layer's loss was NaN/inf on any rank since stage 1 started.

    One read of the guard and a collective over ranks, so every rank raises at the same step; then (rare)
    the ranks share their first bad step, so every rank's message names the earliest one.
    """
    earliest = guard.earliest
    if earliest is None or min_over_ranks(earliest) == NO_STEP:
        return
    mine = guard.first()
    found = [f for f in gather_objects(mine and (mine.step, mine.term)) if f is not None]
    step, term = min(found)
    layer = watched[term]
    raise NonFiniteLossError(
        f"stage 1: non-finite {layer.objective or layer.loss} loss in block {layer.layer} "
        f"({layer.attention}) at step {step}; lower convert.stage1_lr or set convert.stage1_clip_grad"
    )
