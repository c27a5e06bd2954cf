"""The conversion plan (which student layers stage 1 fits to the teacher's attention, with which loss, training
which tensors), validated before any work and printed at start-up, and stage 1's per-layer fitting loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from ..models.attention import MapKind, TransferableAttention, attention_layers, attention_name_of
from ..models.attention.bias_rows import full_bias
from ..models.efficient import check_softmax_teacher
from ..models.handover import Chunks, Signal
from .map_losses import LayerLogits, MapLoss, agreement, check_map_loss, map_distillation_loss, output_mse
from .pairing import reduced_keys

#: the projections a layer's map is made of, as ``project`` takes them ("qk")
_MAP_CHUNKS = str(Chunks(Signal.MAPS))


class Stage1Train(StrEnum):
    """What stage 1 trains in each efficient layer."""

    NEW = "new"  # the attention's new parameters (no softmax counterpart: feature maps, gains, projections)
    QK = "qk"  # the attention's q and k projections (qkv rows of q and k, q/k norms)
    NEW_QK = "new+qk"  # both

    @property
    def new(self) -> bool:
        return self in (Stage1Train.NEW, Stage1Train.NEW_QK)

    @property
    def qk(self) -> bool:
        return self in (Stage1Train.QK, Stage1Train.NEW_QK)


@dataclass
class LayerConversion:
    """One block of the conversion: its attention, how stage 1 fits it, and what it trains."""

    layer: int
    attention: str
    map_kind: MapKind
    loss: MapLoss | None  # None for softmax layers, which are the teacher's already
    trainable: list[str] = field(default_factory=list)
    num_trainable: int = 0
    #: the attention's own stage-1 objective (``fit_objective``), minimised instead of ``loss`` (then a metric)
    objective: str | None = None
    #: how the teacher's keys reduce the stage's tokens ("4x4 blocks"), onto which stage 1 pools the student's rows
    teacher_keys: str | None = None


@dataclass
class ConversionPlan:
    """What `convert` will do, validated before any work; printed at start-up and kept in the report."""

    layers: list[LayerConversion]
    stage1_steps: int
    stage1_lr: float
    stage1_batch_size: int
    stage1_train: Stage1Train
    output_mse: float
    attention_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> list[LayerConversion]:
        """Layers stage 1 trains."""
        return [layer for layer in self.layers if layer.num_trainable > 0]

    @property
    def num_trainable(self) -> int:
        return sum(layer.num_trainable for layer in self.layers)

    @property
    def teacher_signals(self) -> tuple[Signal, ...]:
        """What stage 1 takes from each fitted teacher layer: its input, q and k, and its output where compared."""
        outputs = self.output_mse or any(layer.loss is MapLoss.OUTPUT for layer in self.active)
        return (Signal.INPUT, *Signal.MAPS.chunks) + ((Signal.OUTPUT,) if outputs else ())

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
            lines.append(
                f"  stage 1: layer-parallel attention transfer, {self.stage1_steps} steps, lr "
                f"{self.stage1_lr:g}, batch {self.stage1_batch_size}, trains {self.stage1_train} "
                f"({self.num_trainable:,} values){extra}"
            )
        for layer in self.layers:
            if layer.loss is None:
                what = (
                    "none (attention-free: the block keeps its MLP"
                    if layer.map_kind is MapKind.NONE
                    else "softmax (the teacher's own attention"
                )
                lines.append(f"    block {layer.layer}: {what}; nothing to fit)")
                continue
            pooled = f" on the teacher's keys ({layer.teacher_keys} of tokens)" if layer.teacher_keys else ""
            fits = f"objective {layer.objective} (metric {layer.loss.metric})" if layer.objective else ""
            where = ", ".join(n.split(".attn.", 1)[-1] for n in layer.trainable)
            lines.append(
                f"    block {layer.layer}: {layer.attention} ({layer.map_kind}) {fits or f'loss {layer.loss}'}"
                f"{pooled}, trains {layer.num_trainable:,} values" + (f" in {where}" if where else "")
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stage1_tensors(
    attn: TransferableAttention, what: Stage1Train, prefix: str
) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """(name, parameter, row mask or None) that stage 1 trains in one attention layer."""
    out: list[tuple[str, nn.Parameter, torch.Tensor | None]] = []
    if what.new:
        out += [(f"{prefix}.{n}", attn.get_parameter(n), None) for n in attn.new_parameter_names()]
    if what.qk:
        if hasattr(attn, "qkv"):
            rows = 2 * attn.attn_dim  # fused qkv: the q and k row blocks come first
            for pname in ("weight", "bias"):
                p = getattr(attn.qkv, pname, None)
                if p is not None:
                    mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
                    mask[:rows] = 1
                    out.append((f"{prefix}.qkv.{pname}[q,k rows]", p, mask))
        else:
            # a slot that keeps the teacher's separate projections (Gemma4's q_proj, k_proj) has no fused
            # qkv: its q and k projections train whole (reading attn.qkv was an AttributeError)
            for proj in ("q_proj", "k_proj"):
                out += [(f"{prefix}.{proj}.{n}", p, None) for n, p in getattr(attn, proj).named_parameters()]
        for norm in ("q_norm", "k_norm"):
            out += [(f"{prefix}.{norm}.{n}", p, None) for n, p in getattr(attn, norm).named_parameters()]
    return out


def layer_tensors(student: nn.Module, plan: ConversionPlan):
    """(name, parameter, row mask or None) of every tensor stage 1 trains, layer by layer of ``plan.active``."""
    layers = attention_layers(student)  # blocks.* of a ViT; stages.*.blocks.* of PVTv2, layers.* of Swin
    for layer in plan.active:
        name, attn = layers[layer.layer]
        yield from _stage1_tensors(attn, plan.stage1_train, name)


def build_conversion_plan(
    teacher: nn.Module,
    student: nn.Module,
    *,
    stage1_steps: int = 200,
    stage1_lr: float = 1e-2,
    stage1_batch_size: int = 128,
    stage1_train: str = "new",
    map_loss: str = "auto",
    output_mse: float = 0.0,
    attention_kwargs: dict[str, Any] | None = None,
) -> ConversionPlan:
    """Validate a conversion of ``teacher`` into ``student``; every problem is an InputError saying what to change."""
    check_softmax_teacher(teacher)
    if stage1_train not in list(Stage1Train):
        raise InputError(f"convert.stage1_train={stage1_train!r}; choose one of {', '.join(Stage1Train)}")
    train = Stage1Train(stage1_train)
    if stage1_steps < 0 or stage1_lr <= 0 or output_mse < 0:
        raise InputError(
            "convert.stage1_steps must be >= 0, convert.stage1_lr > 0 and convert.output_mse >= 0"
        )
    try:
        student_layers = attention_layers(student)
    except TypeError as e:
        raise InputError(f"student: {e}; convert students use registered attentions") from None
    teacher_layers = attention_layers(teacher)
    if len(student_layers) != len(teacher_layers):
        raise InputError(
            f"student has {len(student_layers)} attention layers, teacher {len(teacher_layers)}: conversion "
            "keeps the teacher's depth (build the student with build_efficient_student)"
        )
    layers = []
    for i, (qualified, attn) in enumerate(student_layers):
        if not isinstance(attn, TransferableAttention):
            raise InputError(
                f"student {qualified} is {type(attn).__name__}; convert students use registered "
                "attentions (attnxfer.models.efficient)"
            )
        name, kind = attention_name_of(attn), attn.map_kind
        reduced = reduced_keys(teacher_layers[i][1])
        # nothing to fit: softmax over the teacher's keys, or reducing them as the teacher does (its own
        # attention class), or `none` (no attention branch)
        if (
            kind is MapKind.SOFTMAX
            and (reduced is None or attn.token_partition() == teacher_layers[i][1].token_partition())
        ) or getattr(attn, "attention_free", False):
            layers.append(LayerConversion(i, name, kind, None))
            continue
        loss = check_map_loss(map_loss, kind, where=f"convert.map_loss for block {i} ({name}): ")
        tensors = _stage1_tensors(attn, train, qualified)
        count = sum(int(p.numel() if m is None else m.sum().item() * p[0].numel()) for _, p, m in tensors)
        layers.append(
            LayerConversion(
                i, name, kind, loss, [n for n, _, _ in tensors], count, attn.fit_objective, reduced
            )
        )
    plan = ConversionPlan(
        layers, stage1_steps, stage1_lr, stage1_batch_size, train, output_mse, dict(attention_kwargs or {})
    )
    if stage1_steps > 0 and plan.num_trainable == 0:
        kinds = sorted({layer.attention for layer in layers if layer.loss is not None})
        if not kinds:  # softmax (the teacher's own) or none (no map) in every block: no map to fit
            names = ", ".join(sorted({layer.attention for layer in layers}))
            raise InputError(
                f"stage 1 has nothing to train: no block's attention ({names}) has a map to fit to the "
                "teacher's (softmax is the teacher's own; none attends to nothing); name an efficient attention "
                "in convert.attention, or set convert.stage1_steps=0 to skip stage 1"
            )
        qk = "convert.stage1_train=qk to fit its q/k projections to the teacher's maps, or "
        raise InputError(
            f"stage 1 has nothing to train: {', '.join(kinds)} attention has no new parameters with "
            f"convert.stage1_train={stage1_train!r}. Set {qk if stage1_train != 'qk' else ''}"
            "convert.stage1_steps=0 to skip stage 1"
        )
    return plan


def layer_fit_loss(
    attn: nn.Module, layer: LayerConversion, signals: dict[str, torch.Tensor], output_weight: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage 1's loss for one layer on the teacher's input and its agreement metric: the layer's map loss, or
    its attention's own ``fit_objective`` (hashing's) with the map metric beside it."""
    x = signals[Signal.INPUT]
    # a rope teacher's rotary embedding: the student's q and k are rotated as the teacher's were
    call = {"rope": signals["rope"]} if signals.get("rope") is not None else {}
    if layer.loss is MapLoss.OUTPUT and not layer.objective:
        loss = output_mse(attn(x, **call), signals[Signal.OUTPUT])
        return loss, loss.detach()
    own = attn.project(x, _MAP_CHUNKS, **call)
    if layer.objective:
        loss = attn.fit_loss(own[Signal.Q], own[Signal.K], signals[Signal.Q], _keys_per_token(signals))
        with torch.no_grad():  # the map agreement logged beside the attention's own objective
            if layer.loss is MapLoss.OUTPUT:
                metric = output_mse(attn(x, **call), signals[Signal.OUTPUT]).detach()
            else:
                q, k = own[Signal.Q].detach(), own[Signal.K].detach()
                metric = agreement(_map_loss(attn, layer, q, k, signals))
    else:
        res = _map_loss(attn, layer, own[Signal.Q], own[Signal.K], signals)
        loss, metric = res.total, agreement(res)
        region = getattr(attn, "region_log_mass", None)  # zoo attention in Swin's shifted windows
        if region is not None and signals.get("bias") is not None and layer.loss is MapLoss.CE:
            correction = region(own[Signal.Q], own[Signal.K], full_bias(signals["bias"]))
            loss = loss + correction
            metric = metric + correction.detach() if metric is not None else None
    if output_weight:
        loss = loss + output_weight * output_mse(attn(x, **call), signals[Signal.OUTPUT])
    return loss, metric


def _map_loss(attn: nn.Module, layer: LayerConversion, q: torch.Tensor, k: torch.Tensor, signals):
    """The layer's map loss against the teacher's signals: with its logit bias (Swin: relative positions and the
    shifted-window mask), pooled onto its reduced keys (PVTv2), at its logit scale."""
    teacher = LayerLogits(
        signals[Signal.Q],
        signals[Signal.K],
        scale=getattr(attn, "teacher_logit_scale", None),  # Gemma4: 1 (the student folds it into q, k)
        bias=signals.get("bias"),
        key_pooling=signals.get("key_pooling"),
    )
    return map_distillation_loss(attn, LayerLogits(q, k), teacher, layer.loss)


def _keys_per_token(signals: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's k with one row per token: a reduced key repeated over the tokens it was made from, so an
    objective on (query, key) pairs (hashing's) reads the teacher's logit for each token's block."""
    pooling = signals.get("key_pooling")
    k = signals[Signal.K]
    return k if pooling is None else k.index_select(-2, pooling.key_of_token(k.device))
