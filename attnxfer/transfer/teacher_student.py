"""`TeacherStudent`: a frozen teacher and a trainable student, each running its own timm forward.

The teacher runs first, its own ``forward_features`` (any family: rope passed to blocks, relative
position biases, class-attention blocks are timm's business), with a per-layer `AttentionIO` on each
transferred layer that captures q/k(/v) as they enter the logits (and the logit bias); the last one
raises `StopForward` once it has captured, so the teacher runs only as deep as the plan needs. Then the
student runs its own forward with per-layer `AttentionIO`s that consume the teacher's signals (copy)
or capture its own (distill). Shared drop path swaps both models' drop-path modules for the student's
per-sample masks around the two passes.

The teacher is a guest: frozen, ``eval()``, under ``torch.no_grad()`` (not
``inference_mode``: copied q/k are saved for the student's backward), bf16 on
GPU, and not a registered submodule, so it never reaches the optimizer, EMA,
``state_dict`` or checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.attention import (
    AttentionIO,
    MapKind,
    StopForward,
    attached_ios,
    attention_io,
    attention_layers,
    make_transfer_aware,
)
from ..models.attention.key_pooling import KeyPooling
from ..models.attention.numerics import fp32_section
from ..models.handover import Chunks, Signal
from .feature_loss import feature_distill_loss, final_tokens, num_prefix_tokens
from .losses import CEPath, ce_path_for, padding_from_mask
from .map_losses import LayerLogits, map_distillation_loss
from .plan import TransferPlan, build_plan

__all__ = ["TeacherStudent", "TransferOutput"]


@dataclass
class TransferOutput:
    """Student logits plus the transfer loss.

    ``loss`` is the weighted sum the optimiser sees (None when nothing is
    distilled); ``terms`` holds each layer's unweighted differentiable term
    (e.g. ``"attn_ce/3"``), the logit and feature distillation terms (``logit_kd``;
    ``feat_cos``, ``feat_smooth_l1`` and both per token group, detached), and ``logs``
    detached extras such as per-layer KL.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class _FixedDropPath(nn.Module):
    """Applies a given per-sample keep mask: shares one drop-path draw between two blocks."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B, N, C) or NHWC stages


@contextlib.contextmanager
def _shared_drop_path(
    pairs: list[tuple[nn.Module, nn.Module]], batch: int, device: torch.device
) -> Iterator[None]:
    """For each (student block, teacher block), in order, draw the student's per-sample drop-path masks once
    and use them in both blocks (the draws in the order the student's own forward would make them)."""
    saved = []
    try:
        for student_blk, teacher_blk in pairs:
            for name in ("drop_path1", "drop_path2"):
                rate = float(getattr(getattr(student_blk, name, None), "drop_prob", 0.0))
                if rate <= 0.0:
                    continue
                keep = 1.0 - rate
                mask = torch.empty(batch, device=device).bernoulli_(keep).div_(keep)
                for blk in (student_blk, teacher_blk):
                    saved.append((blk, name, getattr(blk, name)))
                    setattr(blk, name, _FixedDropPath(mask))
        yield
    finally:
        for blk, name, mod in reversed(saved):
            setattr(blk, name, mod)


@contextlib.contextmanager
def _eager(module: nn.Module) -> Iterator[None]:
    """Run ``module`` uncompiled for the duration (``nn.Module.compile`` keeps its compiled call in
    ``_compiled_call_impl``); its other calls stay compiled."""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is None:
        yield
        return
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def _parent(model: nn.Module, name: str) -> nn.Module:
    """The module that holds the attention called ``name`` (its block)."""
    return model.get_submodule(name.rpartition(".")[0])


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch, in fp32 (Hinton et al.'s scaling keeps
    the gradient's size independent of T)."""
    with fp32_section(student_logits.device.type):
        t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class TeacherStudent(nn.Module):
    """Teacher and student in lock-step; returns student logits and the transfer loss.

    Args:
        teacher: a timm vision transformer of any family with adapters (ViT/DeiT, EVA/DINOv3/PE, BEiT,
            ...: `attnxfer.models.attention.families`; made transfer-aware in place). May be None only
            for ``mode=none`` without logit distillation.
        student: the timm model to train (made transfer-aware in place): the teacher's family, a plain
            ViT with the teacher's token layout, or zoo attentions (`attnxfer.models.efficient`), for
            the modes their map kind supports.
        plan: a `TransferPlan`, or None to build a default one for ``mode``.
        teacher_dtype: dtype the teacher runs in; default bf16 on CUDA, fp32 elsewhere.
        ce_path: how softmax student layers' exact CE is evaluated (`CEPath`); None picks by device
            (`ce_path_for`). ``attention_lse`` has each distilled softmax layer hand out its log-sum-exp.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        plan: TransferPlan | None = None,
        *,
        mode: str = "distill",
        teacher_dtype: torch.dtype | None = None,
        ce_path: CEPath | str | None = None,
    ):
        super().__init__()
        self.student = make_transfer_aware(student)
        if teacher is not None:
            make_transfer_aware(teacher)
            teacher.requires_grad_(False)
            teacher.eval()
        # Not a submodule: keeps the teacher out of parameters(), state_dict(), EMA and DDP.
        self.__dict__["teacher"] = teacher
        self.plan = plan if plan is not None else build_plan(teacher, student, mode)
        self.teacher_dtype = teacher_dtype
        self.ce_path = CEPath(ce_path) if ce_path is not None else None
        # KL = CE − H(P_t) costs one more teacher pass per layer and is only logged: the engine
        # switches it on for the steps it logs.
        self.log_kl = True
        self._student_names, self._student_attn = _unzip(attention_layers(student))
        self._teacher_names, self._teacher_attn = (
            _unzip(attention_layers(teacher)) if teacher is not None else ([], [])
        )
        if self.plan.mode.borrow:
            for s_layer, _ in self.plan.pairs:
                self._student_attn[s_layer].freeze_projections(self.plan.mode.borrow)

    # -- the guest -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TeacherStudent:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _teacher_ready(self, device: torch.device) -> torch.dtype:
        """Move the teacher next to the input on first use (bf16 on CUDA unless told otherwise)."""
        dtype = self.teacher_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        p = next(self.teacher.parameters())
        if p.device != device or p.dtype != dtype:
            self.teacher.to(device=device, dtype=dtype)
        return dtype

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> TransferOutput:
        """``x``: images, or a NaFlexViT batch (``patches``, ``patch_coord``, ``patch_valid``) whose samples
        have different numbers of patches: padded tokens are left out of the maps' CE."""
        mode = self.plan.mode
        if not self.training and not mode.teacher_at_eval:
            return TransferOutput(self.student(x))
        if not self.plan.pairs and not self._wants_features:
            out = TransferOutput(self.student(x))
            if self.training and self.plan.logit_weight > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(_cast(x, self._teacher_ready(_device(x))))
                self._add_logit_loss(out, teacher_logits)
            return out
        return self._teacher_then_student(x)

    def _add_logit_loss(self, out: TransferOutput, teacher_logits: torch.Tensor) -> None:
        kd = logit_distillation_loss(out.logits, teacher_logits, self.plan.logit_temperature)
        out.terms["logit_kd"] = kd
        weighted = self.plan.logit_weight * kd
        out.loss = weighted if out.loss is None else out.loss + weighted

    def _drop_path_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student block, teacher block) of the layers up to the last transferred one (equal depths)."""
        last = self.plan.last_teacher_layer
        return [
            (_parent(self.student, s), _parent(self.teacher, t))
            for s, t in zip(self._student_names[: last + 1], self._teacher_names[: last + 1])
        ]

    @property
    def _wants_features(self) -> bool:
        """Training compares the final token features (feature distillation)."""
        return self.training and Signal.FEATURES in self.plan.compares

    def _teacher_pass(
        self, x: torch.Tensor, wanted: Chunks, model_signals: frozenset[Signal]
    ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[Signal, torch.Tensor]]:
        """The teacher's own forward with a capturing `AttentionIO` on each transferred layer: the
        captured ``wanted`` q/k/v (and logit bias) per teacher layer, and the whole model's
        ``model_signals`` (its final token features, its logits: one forward for both). Without those the
        last transferred layer stops the forward (`StopForward`) once it has captured: its attention core,
        output projection, MLP and every later block would be computed for nothing."""
        plan, teacher = self.plan, self.teacher
        ios = {t: AttentionIO(capture=wanted) for t in sorted(plan.teacher_layers)}
        stop = not model_signals
        if stop:
            ios[plan.last_teacher_layer].stop = True
        whole: dict[Signal, torch.Tensor] = {}
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if stop:  # the stopping block runs eagerly: a raise inside a compiled graph would break it
                stack.enter_context(_eager(_parent(teacher, self._teacher_names[plan.last_teacher_layer])))
            stack.enter_context(attached_ios(self._teacher_attn, ios))
            with contextlib.suppress(StopForward):
                if Signal.FEATURES in model_signals:
                    whole = _features_and_logits(teacher, x, Signal.LOGITS in model_signals)
                elif Signal.LOGITS in model_signals:
                    whole = {Signal.LOGITS: teacher(x)}
                else:
                    _features(teacher, x)
        return {t: io.captured for t, io in ios.items()}, whole

    def _student_io(
        self, layer: int, signals: dict[int, dict[str, torch.Tensor]], ce_path: CEPath
    ) -> AttentionIO:
        """Copy: the teacher's chunks (q and k together bring the teacher's logit bias); distill: capture."""
        mode = self.plan.mode
        if mode.is_copy:
            borrowed = signals[self.plan.teacher_for[layer]]
            io = AttentionIO(**{str(c): borrowed[c] for c in mode.borrow})
            if set(Signal.MAPS.chunks) <= set(mode.borrow):  # the maps whole: their logit bias comes along
                io.bias = borrowed.get("bias")
                io.q = _in_student_scale(
                    io.q, self._teacher_attn[self.plan.teacher_for[layer]], self._student_attn[layer]
                )
            return io
        return AttentionIO(capture=mode.chunks, return_lse=self._wants_lse(layer, ce_path))

    def _teacher_then_student(self, x: torch.Tensor) -> TransferOutput:
        mode, plan = self.plan.mode, self.plan
        tdtype = self._teacher_ready(_device(x))
        share = plan.share_drop_path and self.training
        # what the whole models hand over besides their layers' signals (training only)
        whole = frozenset(s for s in plan.compares if not s.of_layer) if self.training else frozenset()
        ce_path = self.ce_path or ce_path_for(_device(x))

        drop = (
            _shared_drop_path(self._drop_path_pairs(), _batch(x), _device(x))
            if share
            else contextlib.nullcontext()
        )
        with drop:
            signals, teacher_whole = self._teacher_pass(_cast(x, tdtype), mode.chunks, whole)
            ios = {s: self._student_io(s, signals, ce_path) for s, _ in plan.pairs}
            with contextlib.ExitStack() as stack:
                for s, io in ios.items():
                    stack.enter_context(attention_io(self._student_attn[s], io))
                if Signal.FEATURES in whole:  # the features and the logits of one student forward
                    student_whole = _features_and_logits(self.student, x, logits=True)
                    out = TransferOutput(logits=student_whole[Signal.LOGITS])
                else:
                    out = TransferOutput(logits=self.student(x))
        if mode.is_distill and plan.pairs:
            losses = [
                self._layer_loss(s, signals[t], ios[s].captured, out, ce_path, ios[s].lse)
                for s, t in plan.pairs
            ]
            out.loss = plan.weight * torch.stack(losses).sum()
        if Signal.LOGITS in teacher_whole:
            self._add_logit_loss(out, teacher_whole[Signal.LOGITS])
        if Signal.FEATURES in whole:
            self._add_feature_loss(out, student_whole[Signal.FEATURES], teacher_whole[Signal.FEATURES])
        return out

    def _add_feature_loss(self, out: TransferOutput, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Feature distillation between the two final token sets (`feature_distill_loss`), weighted."""
        res = feature_distill_loss(
            final_tokens(student, self.student),
            final_tokens(teacher, self.teacher),
            num_prefix_tokens(self.teacher),
        )
        out.terms.update(res.terms)
        weighted = self.plan.feature_weight * res.loss
        out.loss = weighted if out.loss is None else out.loss + weighted

    def _wants_lse(self, layer: int, ce_path: CEPath) -> bool:
        """Whether student ``layer`` hands out its log-sum-exp: distilled maps, a softmax layer, a path
        that takes the log-sum-exp from the attention kernel."""
        return (
            ce_path.needs_student_lse
            and self.plan.mode.distills_maps
            and self._student_attn[layer].map_kind is MapKind.SOFTMAX
            and not self._student_attn[layer].has_logit_bias
            and not self._teacher_attn[self.plan.teacher_for[layer]].has_logit_bias
        )

    def _layer_loss(
        self,
        layer: int,
        teacher_sig: dict[str, torch.Tensor],
        student_sig: dict[str, torch.Tensor],
        out: TransferOutput,
        ce_path: CEPath | None = None,
        lse_s: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mode = self.plan.mode
        if mode.distills_maps:
            # the student layer's map kind picks the loss (softmax: the exact O(N) CE; see map_losses)
            s_attn = self._student_attn[layer]
            t_attn = self._teacher_attn[self.plan.teacher_for[layer]]
            q_s, q_t = student_sig["q"], teacher_sig["q"]
            res = map_distillation_loss(
                s_attn,
                LayerLogits(
                    q_s,
                    student_sig["k"],
                    scale=_scale_if_own(s_attn, q_s),
                    bias=student_sig.get("bias"),
                    valid=padding_from_mask(student_sig.get("mask"), q_s.shape[-2]),
                    lse=lse_s,
                ),
                LayerLogits(
                    q_t,
                    teacher_sig["k"],
                    scale=_scale_if_own(t_attn, q_t),
                    bias=teacher_sig.get("bias"),
                    key_pooling=_pooled_keys(teacher_sig, student_sig["k"]),
                ),
                with_metric=self.log_kl,
                ce_path=ce_path,
            )
            out.terms[f"{res.kind.term}/{layer}"] = res.loss
            if res.metric is not None and res.kind.logged_metric:
                out.logs[f"{res.kind.logged_metric}/{layer}"] = res.metric
            return res.loss
        c = mode.distill
        with fp32_section(student_sig[c].device.type):
            loss = F.mse_loss(student_sig[c].float(), teacher_sig[c].detach().float())
        out.terms[f"{c}_mse/{layer}"] = loss
        return loss


def _pooled_keys(teacher_sig: dict, k_s: torch.Tensor) -> KeyPooling | None:
    """The teacher layer's `KeyPooling` where its keys reduce the tokens the student layer keys (a PVTv2
    teacher's spatial reduction, a zoo student over every token: the plan's pooled pairs), else None."""
    pooling = teacher_sig.get("key_pooling")
    if pooling is None or k_s.shape[-2] != pooling.num_tokens or teacher_sig["k"].shape[-2] == k_s.shape[-2]:
        return None
    return pooling


def _device(x: torch.Tensor | dict) -> torch.device:
    """The device of a batch: an image tensor, or NaFlexViT's dict (patches, coordinates, validity)."""
    return x["patches"].device if isinstance(x, dict) else x.device


def _batch(x: torch.Tensor | dict) -> int:
    return x["patches"].shape[0] if isinstance(x, dict) else x.shape[0]


def _features(model: nn.Module, x: torch.Tensor | dict) -> torch.Tensor:
    """``model.forward_features`` of a batch (NaFlexViT takes a dict's entries as arguments)."""
    if isinstance(x, dict):
        keys = ("patch_coord", "patch_valid", "attn_mask")
        return model.forward_features(x["patches"], **{k: x[k] for k in keys if k in x})
    return model.forward_features(x)


def _features_and_logits(
    model: nn.Module, x: torch.Tensor | dict, logits: bool
) -> dict[Signal, torch.Tensor]:
    """The model's final token features (``forward_features``) and, with ``logits``, its head's output on
    them: what ``model(x)`` computes, in one forward, with the features kept."""
    if isinstance(x, dict):
        raise ValueError(
            "feature distillation compares final tokens of image batches; a patch batch (a dict of patches, "
            "coordinates and validity) has per-sample token counts: set transfer.feature_distill=0"
        )
    features = model.forward_features(x)
    return {Signal.FEATURES: features, **({Signal.LOGITS: model.forward_head(features)} if logits else {})}


def _cast(x: torch.Tensor | dict, dtype: torch.dtype) -> torch.Tensor | dict:
    """The batch in the teacher's dtype: floating tensors only (a NaFlex dict's coordinates and validity
    stay as they are)."""
    if isinstance(x, dict):
        return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in x.items()}
    return x.to(dtype)


def _unzip(layers: list[tuple[str, nn.Module]]) -> tuple[list[str], list[nn.Module]]:
    return [n for n, _ in layers], [m for _, m in layers]


def _in_student_scale(q_t: torch.Tensor, teacher_attn: nn.Module, student_attn: nn.Module) -> torch.Tensor:
    """Borrowed logits keep the teacher's scale: the teacher's q rescaled by s_t / s_s, where the two layers
    scale q·kᵀ differently (a Swin V2 or Gemma4 layer's scale 1 against d^-0.5)."""
    ratio = teacher_attn.logit_scale(q_t) / student_attn.logit_scale(q_t)
    return q_t if ratio == 1 else q_t * ratio


def _scale_if_own(attn: nn.Module, q: torch.Tensor) -> float | None:
    """The layer's logit scale where it is not timm's default d^-0.5 (None: the default)."""
    scale = attn.logit_scale(q)
    return None if scale == q.shape[-1] ** -0.5 else scale
