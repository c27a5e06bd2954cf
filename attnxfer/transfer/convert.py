"""`attnxfer convert`: a pretrained softmax teacher becomes an efficient-attention student.

* **Swap.** The student is a copy of the teacher whose blocks use zoo attentions
  (`efficient_student_from_teacher`): every weight with a counterpart is the teacher's, only the
  new attention parameters start fresh.
* **Stage 1, layer-parallel attention transfer** (the LoLCATs/Hedgehog recipe, for ViTs). Every
  student attention layer receives the *teacher's* hidden input for that layer and learns to
  reproduce the teacher's attention there. The layers train at once and independently; nothing
  else moves. The loss follows the layer's map kind: row-stochastic -> CE between teacher rows and
  the student's implicit map rows; signed -> MSE on maps; none -> MSE on attention outputs; plus an
  optional attention-output MSE (`attnxfer.transfer.map_losses`).
* **Stage 2, end-to-end fine-tuning** through the training engine: task loss, logit distillation
  from the teacher (``transfer.logit_distill``), optional attention distillation
  (``transfer.mode=distill``).
* **Report** (``report.json`` + ``report.md`` in the run dir): per-layer map agreement before stage
  1, after stage 1 and after stage 2 (with the teacher's hidden inputs, and end to end on each
  model's own); teacher vs student top-1 and the recovered share; the student's forward speed
  relative to the teacher (one run, same input, median of interleaved repeats).
"""
from __future__ import annotations

import dataclasses
import json
from enum import Enum
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..config import ConvertConfig, TrainConfig, apply_overrides, dump_config
from ..models.attention import (MapKind, TransferableAttention, attention_name_of, capture_attention,
                                get_attention_class, make_transfer_aware, transfer_attentions)
from ..models.efficient import efficient_student_from_teacher
from .map_losses import MapLoss, check_map_loss, default_map_loss, map_distillation_loss, output_mse

__all__ = ["STAGE1_TRAIN", "Stage1Train", "LayerConversion", "ConversionPlan", "Stage1Result", "ConvertResult",
           "check_softmax_teacher", "build_efficient_student", "set_drop_path", "build_conversion_plan",
           "stage1_transfer", "map_agreement", "relative_speed", "evaluate_top1", "convert", "convert_main",
           "render_report"]

#: what stage 1 may train in each efficient layer
STAGE1_TRAIN = {
    "new": "the attention's new parameters (no softmax counterpart: feature maps, gains, projections)",
    "qk": "the attention's q and k projections (qkv rows of q and k, q/k norms)",
    "new+qk": "both",
}


class Stage1Train(str, Enum):
    """What stage 1 trains in each efficient layer (`STAGE1_TRAIN` describes each)."""

    NEW = "new"
    QK = "qk"
    NEW_QK = "new+qk"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def new(self) -> bool:
        return self in (Stage1Train.NEW, Stage1Train.NEW_QK)

    @property
    def qk(self) -> bool:
        return self in (Stage1Train.QK, Stage1Train.NEW_QK)

_REPORT_VERSION = 1
_NO_TEACHER = ("attnxfer convert needs a teacher: set teacher.spec (timm name, hf-hub:ORG/NAME, local-dir:PATH or a "
               "weights file)")


# ----------------------------------------------------------------------------------------------- building
def check_softmax_teacher(teacher: nn.Module) -> None:
    """A teacher for conversion runs softmax attention in every block (its maps are the target).

    Makes the teacher transfer-aware in place (timm's ``Attention`` -> ``TransferAttention``, a class swap
    as `DualViT` does), then reads each layer's declared map kind.
    """
    if getattr(teacher, "blocks", None) is None:
        raise ValueError(f"the teacher ({type(teacher).__name__}) is not a timm VisionTransformer (no `blocks`)")
    for i, attn in enumerate(transfer_attentions(make_transfer_aware(teacher))):
        if attn.map_kind is not MapKind.SOFTMAX:
            name = attention_name_of(attn)
            raise ValueError(f"the teacher's blocks.{i}.attn is {name!r}, not softmax attention: conversion needs a "
                             "softmax teacher (its attention maps are what the student learns). Use the original "
                             "pretrained model as teacher, not an already converted student")


def _attention_names(attention: str | Sequence[str], depth: int) -> List[str]:
    names = [attention] * depth if isinstance(attention, str) else list(attention)
    if len(names) != depth:
        raise ValueError(f"convert.attention lists {len(names)} attentions but the teacher has {depth} blocks; give "
                         "one name for all blocks or exactly one per block")
    for name in names:
        try:
            get_attention_class(name)
        except KeyError as e:
            raise ValueError(f"convert.attention: {e.args[0]}") from None
    return names


def build_efficient_student(teacher: nn.Module, attention: str | Sequence[str], *,
                            num_classes: Optional[int] = None, **attention_kwargs: Any) -> nn.Module:
    """The converted student: a trainable copy of ``teacher`` with zoo attention in every block.

    ``num_classes`` gives a headless teacher (``num_classes=0``, e.g. an MAE encoder) a fresh head;
    a teacher whose head has another number of classes is an error (its head would not fit).
    """
    check_softmax_teacher(teacher)
    names = _attention_names(attention, len(teacher.blocks))
    try:
        student = efficient_student_from_teacher(teacher, names, **attention_kwargs)
    except TypeError as e:
        raise ValueError(f"convert.attention_kwargs: {e}") from None
    student.requires_grad_(True)  # a loaded teacher is frozen, and so is its deep copy
    if num_classes is not None and num_classes != student.num_classes:
        if student.num_classes:
            raise ValueError(f"the teacher classifies {student.num_classes} classes but the data has {num_classes}; "
                             "convert on the teacher's label set, or use a headless teacher (num_classes=0) "
                             "whose student gets a new head")
        student.reset_classifier(num_classes)
    return student


def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth for fine-tuning a converted student, timm's rule: block i drops with
    ``rate * i / (depth - 1)``. (A loaded teacher, and so its copy, has none.)"""
    from timm.layers import DropPath
    if rate < 0 or rate >= 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate * i / max(1, depth - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())
    return model


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class LayerConversion:
    """One block of the conversion: its attention, how stage 1 fits it, and what it trains."""

    layer: int
    attention: str
    map_kind: MapKind
    loss: Optional[MapLoss]  # None for softmax layers, which are the teacher's already
    trainable: List[str] = field(default_factory=list)
    num_trainable: int = 0


@dataclass
class ConversionPlan:
    """What `convert` will do, validated before any work; printed at start-up and kept in the report."""

    layers: List[LayerConversion]
    stage1_steps: int
    stage1_lr: float
    stage1_batch_size: int
    stage1_train: Stage1Train
    output_mse: float
    attention_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> List[LayerConversion]:
        """Layers stage 1 trains."""
        return [layer for layer in self.layers if layer.num_trainable > 0]

    @property
    def num_trainable(self) -> int:
        return sum(layer.num_trainable for layer in self.layers)

    def describe(self) -> str:
        names = [layer.attention for layer in self.layers]
        what = names[0] if len(set(names)) == 1 else ", ".join(names)
        lines = [f"conversion plan: softmax teacher -> {what} student ({len(self.layers)} blocks)"]
        if self.attention_kwargs:
            lines.append(f"  attention options: {self.attention_kwargs}")
        if self.stage1_steps <= 0:
            lines.append("  stage 1: skipped (stage1_steps=0)")
        else:
            extra = f" + {self.output_mse:g} x attention-output MSE" if self.output_mse else ""
            lines.append(f"  stage 1: layer-parallel attention transfer, {self.stage1_steps} steps, lr "
                         f"{self.stage1_lr:g}, batch {self.stage1_batch_size}, trains {self.stage1_train} "
                         f"({self.num_trainable:,} values){extra}")
        for layer in self.layers:
            if layer.loss is None:
                lines.append(f"    block {layer.layer}: softmax (the teacher's own attention; nothing to fit)")
                continue
            lines.append(f"    block {layer.layer}: {layer.attention} ({layer.map_kind}) loss {layer.loss}, trains "
                         f"{layer.num_trainable:,} values"
                         + (f" in {', '.join(_short(n) for n in layer.trainable)}" if layer.trainable else ""))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _short(name: str) -> str:
    return name.split(".attn.", 1)[-1]


def _stage1_tensors(attn: TransferableAttention, what: Stage1Train,
                    prefix: str) -> List[Tuple[str, nn.Parameter, Optional[torch.Tensor]]]:
    """(name, parameter, row mask or None) that stage 1 trains in one attention layer."""
    out: List[Tuple[str, nn.Parameter, Optional[torch.Tensor]]] = []
    if what.new:
        out += [(f"{prefix}.{n}", attn.get_parameter(n), None) for n in attn.new_parameter_names()]
    if what.qk:
        rows = 2 * attn.attn_dim  # fused qkv: the q and k row blocks come first
        for pname in ("weight", "bias"):
            p = getattr(attn.qkv, pname, None)
            if p is not None:
                mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
                mask[:rows] = 1
                out.append((f"{prefix}.qkv.{pname}[q,k rows]", p, mask))
        for norm in ("q_norm", "k_norm"):
            out += [(f"{prefix}.{norm}.{n}", p, None) for n, p in getattr(attn, norm).named_parameters()]
    return out


def _layer_tensors(student: nn.Module, plan: ConversionPlan):
    for layer in plan.active:
        yield layer, _stage1_tensors(student.blocks[layer.layer].attn, plan.stage1_train, f"blocks.{layer.layer}.attn")


def build_conversion_plan(teacher: nn.Module, student: nn.Module, cfg: ConvertConfig,
                          batch_size: int = 128) -> ConversionPlan:
    """Validate ``cfg`` against the two models; every problem is a ValueError that says what to change."""
    check_softmax_teacher(teacher)
    if cfg.stage1_train not in STAGE1_TRAIN:
        raise ValueError(f"convert.stage1_train={cfg.stage1_train!r}; choose one of {', '.join(STAGE1_TRAIN)}")
    train = Stage1Train(cfg.stage1_train)
    if cfg.stage1_steps < 0 or cfg.stage1_lr <= 0 or cfg.output_mse < 0:
        raise ValueError("convert.stage1_steps must be >= 0, convert.stage1_lr > 0 and convert.output_mse >= 0")
    if len(student.blocks) != len(teacher.blocks):
        raise ValueError(f"student has {len(student.blocks)} blocks, teacher {len(teacher.blocks)}: conversion keeps "
                         "the teacher's depth (build the student with build_efficient_student)")
    layers = []
    for i, blk in enumerate(student.blocks):
        attn = blk.attn
        if not isinstance(attn, TransferableAttention):
            raise ValueError(f"student blocks.{i}.attn is {type(attn).__name__}; convert students use registered "
                             "attentions (attnxfer.models.efficient)")
        name, kind = attention_name_of(attn), attn.map_kind
        if kind is MapKind.SOFTMAX:
            layers.append(LayerConversion(i, name, kind, None))
            continue
        loss = check_map_loss(cfg.map_loss, kind, where=f"convert.map_loss for block {i} ({name}): ")
        tensors = _stage1_tensors(attn, train, f"blocks.{i}.attn")
        count = sum(int(p.numel() if m is None else m.sum().item() * p[0].numel()) for _, p, m in tensors)
        layers.append(LayerConversion(i, name, kind, loss, [n for n, _, _ in tensors], count))
    plan = ConversionPlan(layers, cfg.stage1_steps, cfg.stage1_lr, cfg.stage1_batch_size or batch_size,
                          train, cfg.output_mse, dict(cfg.attention_kwargs))
    if cfg.stage1_steps > 0 and plan.num_trainable == 0:
        kinds = sorted({layer.attention for layer in layers if layer.loss is not None})
        raise ValueError(f"stage 1 has nothing to train: {', '.join(kinds) or 'softmax'} attention has no new "
                         f"parameters with convert.stage1_train={cfg.stage1_train!r}. Set convert.stage1_train=qk to "
                         "fit its q/k projections to the teacher's maps, or convert.stage1_steps=0 to skip stage 1")
    return plan


# ----------------------------------------------------------------------------------------------- stage 1
class _StopForward(Exception):
    """Raised by a hook once the teacher has run every layer stage 1 needs."""


@dataclass
class Stage1Result:
    steps: int = 0
    seconds: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)
    resumed: bool = False


def _teacher_signals(teacher: nn.Module, x: torch.Tensor, layers: Sequence[int], fields: Sequence[str]):
    """Per-layer attention input/q/k/output of the teacher on ``x``; stops after the last needed block."""
    def stop_here(*_):
        raise _StopForward

    stop = teacher.blocks[max(layers)].register_forward_hook(stop_here)
    try:
        with torch.no_grad(), capture_attention(teacher, layers, fields) as store:
            try:
                teacher.forward_features(x)
            except _StopForward:
                pass
    finally:
        stop.remove()
    return store


def _layer_fit_loss(attn: nn.Module, layer: LayerConversion, signals: Dict[str, torch.Tensor],
                    output_weight: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stage 1's loss for one layer on the teacher's input, and its agreement metric (KL, map MSE or output MSE)."""
    x = signals["input"]
    if layer.loss is MapLoss.OUTPUT:
        loss = output_mse(attn(x), signals["output"])
        return loss, loss.detach()
    own = attn.project(x, "qk")
    res = map_distillation_loss(attn, own["q"], own["k"], signals["q"], signals["k"], layer.loss)
    loss = res.loss
    if output_weight:
        loss = loss + output_weight * output_mse(attn(x), signals["output"])
    return loss, res.metric


def _world() -> Tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _average_gradients_over_ranks(optimizer: torch.optim.Optimizer) -> None:
    """Data-parallel stage 1: every rank steps with the mean gradient, so the weights stay identical."""
    _, world = _world()
    if world == 1:
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _sum_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    if _world()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def stage1_transfer(
        teacher: nn.Module,
        student: nn.Module,
        plan: ConversionPlan,
        batches: Iterator[torch.Tensor],
        *,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        clip_grad: Optional[float] = None,
        log_every: int = 20,
        log: Callable[[str], None] = print,
) -> Stage1Result:
    """Fit each efficient layer to the teacher's attention on the teacher's hidden inputs.

    Only the tensors the plan names get gradients (q/k rows of a fused qkv through a row mask, with no
    weight decay, so the v rows stay bit-identical); the student runs in eval mode (fixed random
    features, no dropout). ``batches`` yields input images (already on the models' device).
    """
    from ..train.engine import NonFiniteLossError, lr_at

    result = Stage1Result()
    steps = plan.stage1_steps
    if steps <= 0 or not plan.active:
        return result
    was_training = student.training
    requires = {name: p.requires_grad for name, p in student.named_parameters()}
    student.eval().requires_grad_(False)
    plain, masked, hooks = [], [], []
    for _, tensors in _layer_tensors(student, plan):
        for _, p, mask in tensors:
            p.requires_grad_(True)
            if mask is None:
                plain.append(p)
            else:
                masked.append(p)
                hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
    groups = [{"params": plain, "weight_decay": weight_decay}, {"params": masked, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=plan.stage1_lr)
    fields = ("input", "q", "k") + (("output",) if plan.output_mse or
                                    any(layer.loss is MapLoss.OUTPUT for layer in plan.active) else ())
    layers = plan.active
    start = time.monotonic()
    window: List[float] = []
    try:
        for step in range(steps):
            lr = lr_at(step, steps, warmup_steps, plan.stage1_lr, plan.stage1_lr * 0.01)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = next(batches)
            signals = _teacher_signals(teacher, x, [layer.layer for layer in layers], fields)
            total, metrics = 0.0, {}
            for layer in layers:
                loss, metric = _layer_fit_loss(student.blocks[layer.layer].attn, layer, signals[layer.layer],
                                               plan.output_mse)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"stage 1: non-finite {layer.loss} loss in block {layer.layer} "
                                             f"({layer.attention}) at step {step}; lower convert.stage1_lr or set "
                                             "convert.stage1_clip_grad")
                total = total + loss
                metrics[layer.layer] = float(metric)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            _average_gradients_over_ranks(optimizer)
            if clip_grad:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
            optimizer.step()
            window.append(float(total.detach()))
            if (step + 1) % max(1, log_every) == 0 or step + 1 == steps or step == 0:
                # every rank's mean over its own batches, then the mean over ranks (equal batch sizes)
                _, world = _world()
                logged = _sum_over_ranks([sum(window) / len(window), *metrics.values()], x.device)
                loss_mean, metrics = logged[0] / world, dict(zip(metrics, (v / world for v in logged[1:])))
                rec = {"step": step + 1, "loss": loss_mean, "lr": lr,
                       **{f"metric/{i}": v for i, v in metrics.items()}}
                result.history.append(rec)
                per_layer = " ".join(f"{v:.3g}" for v in metrics.values())
                log(f"stage 1 step {step + 1}/{steps}: loss {rec['loss']:.4f} lr {lr:.2e} | per-layer "
                    f"{'/'.join(sorted({lay.loss.metric for lay in layers}))}: {per_layer}")
                window = []
    finally:
        for h in hooks:
            h.remove()
        for name, p in student.named_parameters():
            p.requires_grad_(requires[name])
        student.train(was_training)
    result.steps, result.seconds = steps, time.monotonic() - start
    return result


# ----------------------------------------------------------------------------------------------- measuring
#: ``map_agreement(inputs=...)``: whether each model runs on its own hidden states
_INPUTS = {"teacher": False, "own": True}


@torch.no_grad()
def map_agreement(teacher: nn.Module, student: nn.Module, batches: Iterable[torch.Tensor], *,
                  inputs: str = "teacher") -> List[Dict[str, Any]]:
    """Per-layer agreement of the student's attention with the teacher's, averaged over ``batches``
    (over every rank's batches in a process group).

    ``inputs="teacher"``: each student layer sees the teacher's hidden input for that layer (what stage
    1 optimises). ``inputs="own"``: both models run end to end on the image and each layer sees its own
    model's hidden input (what the deployed student does). Metric by the student layer's map kind:
    KL(P_t ‖ A_s) for row-stochastic maps, mean squared map difference for signed ones, attention-output
    MSE where there is no map; ``output_mse`` (attention outputs) is reported for every layer.
    """
    if inputs not in _INPUTS:
        raise ValueError(f"inputs must be 'teacher' or 'own', got {inputs!r}")
    own_inputs = _INPUTS[inputs]
    check_softmax_teacher(teacher)
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    depth = len(student.blocks)
    sums: Dict[int, List[float]] = {i: [0.0, 0.0] for i in range(depth)}
    count = 0
    for x in batches:
        with capture_attention(teacher, fields=("input", "q", "k", "output")) as t:
            teacher.forward_features(x)
        if own_inputs:
            with capture_attention(student, fields=("q", "k", "output")) as s:
                student.forward_features(x)
        for i in range(depth):
            attn = student.blocks[i].attn
            if own_inputs:
                q, k, out = s[i]["q"], s[i]["k"], s[i]["output"]
            else:
                own = attn.project(t[i]["input"], "qk")
                q, k = own["q"], own["k"]
                out = attn(t[i]["input"])
            out_mse = float(output_mse(out, t[i]["output"]))
            if attn.map_kind.has_map:  # the metric of the kind's own map loss (KL beside CE, map MSE)
                value = float(map_distillation_loss(attn, q, k, t[i]["q"], t[i]["k"]).metric)
            else:
                value = out_mse
            sums[i][0] += value * x.shape[0]
            sums[i][1] += out_mse * x.shape[0]
        count += x.shape[0]
    teacher.train(was[0]), student.train(was[1])
    device = next(student.parameters()).device
    flat = _sum_over_ranks([v for i in range(depth) for v in sums[i]] + [count], device)
    sums = {i: flat[2 * i:2 * i + 2] for i in range(depth)}
    count = flat[-1]
    rows = []
    for i in range(depth):
        attn = student.blocks[i].attn
        kind = attn.map_kind
        rows.append({"layer": i, "attention": attention_name_of(attn), "map_kind": kind,
                     "metric": default_map_loss(kind).metric,
                     "value": sums[i][0] / max(1, count), "output_mse": sums[i][1] / max(1, count)})
    return rows


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device: torch.device) -> Optional[float]:
    """Top-1 (%) over ``loader`` (summed over ranks in a process group); None without a classifier head."""
    if not getattr(model, "num_classes", 0):
        return None
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    model.train(was)
    correct, total = _sum_over_ranks([correct, total], device)
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def relative_speed(teacher: nn.Module, student: nn.Module, x: torch.Tensor, repeats: int = 20,
                   warmup: int = 3) -> Dict[str, Any]:
    """Forward time of student and teacher on the same input, measured interleaved in one process.

    Returns both medians (ms) and ``speedup`` = teacher / student (> 1: the student is faster).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was = teacher.training, student.training
    teacher.eval(), student.eval()
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def timed(model: nn.Module) -> float:
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        return 1000.0 * (time.perf_counter() - start)

    for _ in range(warmup):
        timed(teacher), timed(student)
    times: Dict[str, List[float]] = {"teacher": [], "student": []}
    for r in range(repeats):
        order = ("teacher", "student") if r % 2 == 0 else ("student", "teacher")
        for who in order:
            times[who].append(timed(teacher if who == "teacher" else student))
    teacher.train(was[0]), student.train(was[1])
    t_ms, s_ms = statistics.median(times["teacher"]), statistics.median(times["student"])
    return {"batch": int(x.shape[0]), "input": list(x.shape[1:]), "tokens": _tokens(teacher),
            "repeats": repeats, "teacher_ms": t_ms, "student_ms": s_ms, "speedup": t_ms / s_ms,
            "device": x.device.type, "threads": torch.get_num_threads()}


def _tokens(model: nn.Module) -> Optional[int]:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return int(math.prod(grid)) + int(getattr(model, "num_prefix_tokens", 0)) if grid else None


# ----------------------------------------------------------------------------------------------- the command
@dataclass
class ConvertResult:
    run_dir: str
    report: Dict[str, Any]


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but no CUDA device is visible; use device=cpu or auto")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def _cycle(loader, sampler) -> Iterator[torch.Tensor]:
    """Input batches forever, a new shuffle each pass."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        sampler.set_position(0)
        for x, _ in loader:
            yield x
        epoch += 1


def _stage1_batches(cfg: TrainConfig, parts, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    from ..data import ResumableSampler, build_loader
    dataset = parts.train_loader.dataset
    rank, world = _world()
    if len(dataset) < batch_size * world:
        raise ValueError(f"convert.stage1_batch_size={batch_size} per rank x {world} rank(s) is larger than "
                         f"the training set ({len(dataset)})")
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=cfg.seed + 1, rank=rank, world_size=world,
                               drop_last=True)
    loader = build_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                          drop_last=True, seed=cfg.seed + 1)
    return (x.to(device, non_blocking=True) for x in _cycle(loader, sampler))


def _stage2_steps(cfg: TrainConfig, parts) -> int:
    steps = (len(parts.train_loader) // cfg.optim.accum_steps) * cfg.schedule.epochs
    return steps if cfg.schedule.max_steps is None else min(steps, cfg.schedule.max_steps)


def _save_stage1(student: nn.Module, folder: Path, result: Stage1Result, plan: ConversionPlan) -> None:
    from safetensors.torch import save_file
    from ..checkpoints.store import atomic_write_json
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "student.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp))
    tmp.replace(folder / "student.safetensors")
    atomic_write_json(folder / "stage1.json", {"steps": result.steps, "seconds": result.seconds,
                                               "history": result.history, "plan": plan.to_dict()})


def _load_stage1(student: nn.Module, folder: Path, plan: ConversionPlan) -> Optional[Stage1Result]:
    from safetensors.torch import load_file
    weights, info = folder / "student.safetensors", folder / "stage1.json"
    if not (weights.is_file() and info.is_file()):
        return None
    meta = json.loads(info.read_text())
    if meta.get("plan") != json.loads(json.dumps(plan.to_dict())):
        raise ValueError(f"{folder} holds a stage-1 result of a different conversion plan; use a new run_dir or "
                         "checkpoint.resume=none to redo stage 1")
    student.load_state_dict(load_file(str(weights), device=str(next(student.parameters()).device)))
    return Stage1Result(meta["steps"], meta["seconds"], meta["history"], resumed=True)


def _merge_agreement(stages: Dict[str, Optional[List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """Per layer: metric value at each stage (None where a stage did not run)."""
    first = next(rows for rows in stages.values() if rows is not None)
    merged = []
    for i, row in enumerate(first):
        entry = {k: row[k] for k in ("layer", "attention", "map_kind", "metric")}
        for stage, rows in stages.items():
            entry[stage] = rows[i]["value"] if rows is not None else None
            entry[f"output_mse_{stage}"] = rows[i]["output_mse"] if rows is not None else None
        merged.append(entry)
    return merged


def convert(cfg: TrainConfig, *, skip_stage1: bool = False, parts=None,
            log: Callable[[str], None] = print) -> ConvertResult:
    """Run the whole conversion described by ``cfg`` (the library function behind `attnxfer convert`).

    ``parts`` (a `RunParts` whose student came from `build_efficient_student`) lets a notebook pass
    models and data it built. Writes ``report.json`` / ``report.md`` (and ``stage1/``, ``stage2/``)
    under ``cfg.run_dir``.

    Under torchrun or a submitted multi-task job every rank runs this: stage 1 is data parallel
    (each rank its share of the batches, gradients averaged), stage 2 is the engine's DDP, the
    measurements sum over ranks, and rank 0 alone writes files and logs.
    """
    from ..train.distributed import backend_for, joined_process_group
    with joined_process_group(backend_for(cfg.device)) as info:
        return _convert(cfg, info, skip_stage1=skip_stage1, parts=parts, log=log)


def _convert(cfg: TrainConfig, info, *, skip_stage1: bool, parts, log: Callable[[str], None]) -> ConvertResult:
    from ..checkpoints.store import atomic_write_json, atomic_write_text
    from ..apps.training import train
    from .plan import build_plan
    from ..apps.run_parts import build_run_parts

    if skip_stage1:
        cfg = apply_overrides(cfg, {"convert.stage1_steps": 0})
    c = cfg.convert
    main = info.is_main_process
    if not main:
        log = _silent
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)

    def make_student(teacher: Optional[nn.Module], num_classes: int) -> nn.Module:
        if teacher is None:
            raise ValueError(_NO_TEACHER)
        student = build_efficient_student(teacher, c.attention, num_classes=num_classes, **c.attention_kwargs)
        return set_drop_path(student, cfg.model.drop_path_rate)

    if parts is None:
        parts = build_run_parts(cfg, rank=info.rank, world_size=info.world_size, student_fn=make_student)
    teacher, student = parts.teacher, parts.student
    if teacher is None:
        raise ValueError(_NO_TEACHER)
    plan = build_conversion_plan(teacher, student, c, batch_size=cfg.data.batch_size)
    stage2_plan = build_plan(teacher, student, cfg.transfer.mode, end_layer=cfg.transfer.end_layer,
                             layers=cfg.transfer.layers, weight=cfg.transfer.atd_weight,
                             logit_weight=cfg.transfer.logit_distill,
                             logit_temperature=cfg.transfer.logit_temperature)
    stage2_steps = _stage2_steps(cfg, parts)
    log(plan.describe())
    if stage2_steps:
        log(f"stage 2: end-to-end fine-tuning, {stage2_steps} steps (schedule/optim sections); "
            + stage2_plan.describe().replace("\n", "\n  "))
    else:
        log("stage 2: skipped (0 steps: schedule.epochs or schedule.max_steps is 0)")

    run_dir = Path(cfg.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    device = _device(cfg)
    # Stage 1 and every measurement run the teacher in fp32: its maps are regression targets and the report
    # compares stages in one precision. Stage 2 runs it in teacher.dtype (bf16 on GPU by default).
    teacher.to(device=device, dtype=torch.float32).eval()
    student.to(device)
    probe = [x.to(device) for x, _ in _take(parts.val_loader, c.agreement_batches)]
    if not probe:
        raise ValueError("the validation set is empty: convert measures map agreement on it")
    seconds: Dict[str, float] = {}

    def checkpoint_stage(name: str) -> Dict[str, Any]:
        start = time.monotonic()
        res = {"teacher_input": map_agreement(teacher, student, probe, inputs="teacher"),
               "end_to_end": map_agreement(teacher, student, probe, inputs="own"),
               "val_top1": evaluate_top1(student, parts.val_loader, device)}
        seconds[f"measure_{name}"] = time.monotonic() - start
        top1 = res["val_top1"]
        kl = [row["value"] for row in res["end_to_end"]]
        log(f"{name}: student val top-1 {top1 if top1 is None else round(top1, 2)}, end-to-end per-layer "
            f"agreement {', '.join(f'{v:.3g}' for v in kl)}")
        return res

    teacher_top1 = evaluate_top1(teacher, parts.val_loader, device)
    log(f"teacher val top-1 {teacher_top1 if teacher_top1 is None else round(teacher_top1, 2)}")
    measured: Dict[str, Optional[Dict[str, Any]]] = {"before_stage1": checkpoint_stage("before stage 1")}

    # -- stage 1
    stage1 = Stage1Result()
    if plan.stage1_steps > 0:
        folder = run_dir / "stage1"
        resumed = _load_stage1(student, folder, plan) if cfg.checkpoint.resume != "none" else None
        if resumed is not None:
            stage1 = resumed
            log(f"stage 1: resumed from {folder} ({stage1.steps} steps done earlier)")
        else:
            batches = _stage1_batches(cfg, parts, plan.stage1_batch_size, device)
            stage1 = stage1_transfer(teacher, student, plan, batches, warmup_steps=c.stage1_warmup_steps,
                                     weight_decay=c.stage1_weight_decay, clip_grad=c.stage1_clip_grad,
                                     log_every=cfg.log.every_steps, log=log)
            if main:
                _save_stage1(student, folder, stage1, plan)
        seconds["stage1"] = stage1.seconds
        measured["after_stage1"] = checkpoint_stage("after stage 1")
    else:
        measured["after_stage1"] = None

    # -- stage 2
    stage2: Dict[str, Any] = {"steps": stage2_steps, "plan": stage2_plan.describe()}
    if stage2_steps > 0:
        cfg2 = apply_overrides(cfg, {"run_dir": str(run_dir / "stage2")})
        result = train(cfg2, parts)
        teacher.to(device=device, dtype=torch.float32)  # stage 2 may have cast it to teacher.dtype
        student.to(device)
        stage2.update(run_dir=result.run_dir, seconds=result.seconds, final=result.final, history=result.history,
                      best_top1=result.best_top1)
        seconds["stage2"] = result.seconds
        measured["after_stage2"] = checkpoint_stage("after stage 2")
    else:
        measured["after_stage2"] = None

    # -- speed and report
    x = torch.randn(c.speed_batch_size, *probe[0].shape[1:], generator=torch.Generator().manual_seed(0)).to(device)
    speed = relative_speed(teacher, student, x, repeats=c.speed_repeats)
    log(f"speed: student {speed['student_ms']:.2f} ms vs teacher {speed['teacher_ms']:.2f} ms per batch of "
        f"{speed['batch']} -> {speed['speedup']:.2f}x")
    seconds["total"] = time.monotonic() - t0
    final_stage = next(s for s in ("after_stage2", "after_stage1", "before_stage1") if measured[s] is not None)
    student_top1 = measured[final_stage]["val_top1"]
    top1 = {"teacher": teacher_top1, **{s: (m["val_top1"] if m else None) for s, m in measured.items()}}
    report = {
        "version": _REPORT_VERSION,
        "run_dir": str(run_dir),
        "teacher": {"spec": cfg.teacher.spec, "record": parts.teacher_record, "val_top1": teacher_top1},
        "student": {"attention": [layer.attention for layer in plan.layers], "attention_kwargs": plan.attention_kwargs,
                    "spec": parts.student_spec, "new_parameters": _count_new(student)},
        "data": {"dataset": cfg.data.dataset, "val_size": _dataset_size(parts.val_loader),
                 "agreement_images": sum(x.shape[0] for x in probe)},
        "plan": plan.to_dict(),
        "stage1": {"steps": stage1.steps, "skipped": plan.stage1_steps <= 0, "resumed": stage1.resumed,
                   "seconds": stage1.seconds, "history": stage1.history,
                   "batch_size": plan.stage1_batch_size, "lr": plan.stage1_lr, "train": plan.stage1_train},
        "stage2": stage2,
        "top1": top1,
        "student_top1": student_top1,
        "recovered_pct": (100.0 * student_top1 / teacher_top1
                          if teacher_top1 and student_top1 is not None else None),
        "agreement": {
            which: _merge_agreement({s: (m[which] if m else None) for s, m in measured.items()})
            for which in ("teacher_input", "end_to_end")},
        "speed": speed,
        "seconds": seconds,
    }
    if main:
        atomic_write_json(run_dir / "report.json", report)
        atomic_write_text(run_dir / "report.md", render_report(report))
        log(f"report: {run_dir / 'report.md'}")
    return ConvertResult(str(run_dir), report)


def convert_main(cfg: TrainConfig) -> Dict[str, Any]:
    """`convert` as a job's main (``attnxfer submit --command convert``): the report is the job's result."""
    return convert(cfg).report


def _silent(_: str) -> None:
    """The log of ranks other than 0."""


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def _dataset_size(loader) -> Optional[int]:
    try:
        return len(loader.dataset)
    except TypeError:
        return None


def _count_new(student: nn.Module) -> int:
    from ..models.efficient import new_parameters
    return sum(p.numel() for _, p in new_parameters(student))


# ----------------------------------------------------------------------------------------------- report
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def render_report(report: Dict[str, Any]) -> str:
    """The markdown view of ``report.json``."""
    top1, speed = report["top1"], report["speed"]
    names = report["student"]["attention"]
    what = names[0] if len(set(names)) == 1 else "per-layer " + ", ".join(names)
    lines = [f"# Conversion report: softmax teacher -> {what}", "",
             f"- teacher: `{report['teacher']['spec']}`",
             f"- data: {report['data']['dataset']} (val {report['data']['val_size']} images; map agreement on "
             f"{report['data']['agreement_images']})",
             "- stage 1: " + ("skipped" if report["stage1"]["skipped"] else
                               f"{report['stage1']['steps']} steps, lr {report['stage1']['lr']:g}, batch "
                               f"{report['stage1']['batch_size']}, trains {report['stage1']['train']} "
                               f"({report['stage1']['seconds']:.0f} s)"),
             f"- stage 2: {report['stage2']['steps']} steps"
             + (f" ({report['stage2'].get('seconds', 0):.0f} s)" if report["stage2"]["steps"] else " (skipped)"),
             "", "## Top-1 (validation)", "",
             "| model | top-1 (%) | of teacher's |", "|---|---|---|"]
    teacher = top1["teacher"]
    for key, label in (("teacher", "teacher (softmax)"), ("before_stage1", "student, weights swapped in"),
                       ("after_stage1", "student after stage 1"), ("after_stage2", "student after stage 2")):
        v = top1.get(key)
        share = f"{100 * v / teacher:.1f}%" if v is not None and teacher else "—"
        lines.append(f"| {label} | {_fmt(v, 4)} | {share} |")
    lines += ["", f"Recovered: **{_fmt(report['recovered_pct'], 4)}%** of the teacher's top-1.", ""]
    for which, title in (("teacher_input", "teacher's hidden inputs (what stage 1 fits)"),
                         ("end_to_end", "end to end (each model on its own hidden states)")):
        lines += [f"## Per-layer map agreement, {title}", "",
                  "KL(P_teacher ‖ A_student) for row-stochastic maps (nats per row), mean squared map difference "
                  "for signed maps, attention-output MSE for attentions without a map.", "",
                  "| block | attention | metric | before stage 1 | after stage 1 | after stage 2 |",
                  "|---|---|---|---|---|---|"]
        for row in report["agreement"][which]:
            lines.append(f"| {row['layer']} | {row['attention']} | {row['metric']} | {_fmt(row['before_stage1'])} | "
                         f"{_fmt(row['after_stage1'])} | {_fmt(row['after_stage2'])} |")
        lines.append("")
    lines += ["## Speed", "",
              f"Forward pass, batch {speed['batch']} of {speed['input']} ({speed['tokens']} tokens), {speed['device']}"
              f" ({speed['threads']} threads), median of {speed['repeats']} interleaved repeats: student "
              f"{speed['student_ms']:.2f} ms, teacher {speed['teacher_ms']:.2f} ms: the student runs at "
              f"**{speed['speedup']:.2f}x** the teacher's speed.", ""]
    return "\n".join(lines)
