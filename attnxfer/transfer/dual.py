"""`DualViT`: a frozen teacher and a trainable student run block by block in lock-step.

The teacher is a guest: frozen, ``eval()``, under ``torch.no_grad()`` (not
``inference_mode``: copied q/k are saved for the student's backward), bf16 on
GPU, and not a registered submodule, so it never reaches the optimizer, EMA,
``state_dict`` or checkpoints. It runs only as deep as the plan needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from ..models.attention import AttentionIO, MapKind, attention_io, make_transfer_aware, transfer_attentions
from ..models.attention.numerics import fp32_section
from .losses import CEPath, ce_path_for
from .map_losses import map_distillation_loss
from .plan import TransferPlan, build_plan

__all__ = ["PRE_NORM_BLOCKS", "DualViT", "TransferOutput"]

#: Block types whose attention reads ``norm1(x)`` (and nothing else of the block): for these the teacher
#: can stop at the q/k/v projection of its last transferred layer.
PRE_NORM_BLOCKS: tuple[type[nn.Module], ...] = (Block,)


@dataclass
class TransferOutput:
    """Student logits plus the transfer loss.

    ``loss`` is the weighted sum the optimiser sees (None when nothing is
    distilled); ``terms`` holds each layer's unweighted differentiable term
    (e.g. ``"attn_ce/3"``) and ``logs`` detached extras such as per-layer KL.
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
        return x * self.mask.to(x.dtype)


@contextlib.contextmanager
def _shared_drop_path(student_blk: nn.Module, teacher_blk: nn.Module, batch: int, device) -> Iterator[None]:
    """Draw the student's per-sample drop-path masks once and use them in both blocks."""
    saved = []
    for name in ("drop_path1", "drop_path2"):
        rate = float(getattr(getattr(student_blk, name, None), "drop_prob", 0.0))
        if rate <= 0.0:
            continue
        keep = 1.0 - rate
        mask = torch.empty(batch, 1, 1, device=device).bernoulli_(keep).div_(keep)
        for blk in (student_blk, teacher_blk):
            saved.append((blk, name, getattr(blk, name)))
            setattr(blk, name, _FixedDropPath(mask))
    try:
        yield
    finally:
        for blk, name, mod in reversed(saved):
            setattr(blk, name, mod)


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer.forward_features up to the blocks."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the batch, in fp32 (Hinton et al.'s scaling keeps
    the gradient's size independent of T)."""
    with fp32_section(student_logits.device.type):
        t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class DualViT(nn.Module):
    """Teacher and student in lock-step; returns student logits and the transfer loss.

    Args:
        teacher: a timm ViT (any timm ``Attention``-based one; made transfer-aware in place).
            May be None only for ``mode=none`` without logit distillation.
        student: the timm ViT to train (made transfer-aware in place); its attentions may be zoo
            attentions (`attnxfer.models.efficient`), for the modes their map kind supports.
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
        self._student_attn = transfer_attentions(student)
        self._teacher_attn = transfer_attentions(teacher) if teacher is not None else []
        if self.plan.mode.borrow:
            for s_layer, _ in self.plan.pairs:
                self._student_attn[s_layer].freeze_projections(self.plan.mode.borrow)

    # -- the guest -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DualViT:
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
    def forward(self, x: torch.Tensor) -> TransferOutput:
        mode = self.plan.mode
        if not self.training and not mode.teacher_at_eval:
            return TransferOutput(self.student(x))
        if not self.plan.pairs:
            out = TransferOutput(self.student(x))
            if self.training and self.plan.logit_weight > 0:
                with torch.no_grad():
                    teacher_logits = self.teacher(x.to(self._teacher_ready(x.device)))
                self._add_logit_loss(out, teacher_logits)
            return out
        return self._lockstep(x)

    def _teacher_stop_layer(self, wants_logits: bool) -> int | None:
        """The teacher layer at which the teacher's forward can stop after the q/k/v projection, or None.

        The plan's last teacher layer hands over only its q/k(/v): its attention core, output projection
        and MLP would be computed for nothing (1/depth of the teacher's forward with every layer
        transferred). Only for blocks that feed ``attn(norm1(x))`` (timm's pre-norm `Block`), and not
        when the teacher's logits are wanted (logit distillation).
        """
        last = self.plan.last_teacher_layer
        if wants_logits or last < 0 or type(self.teacher.blocks[last]) not in PRE_NORM_BLOCKS:
            return None
        return last

    def _add_logit_loss(self, out: TransferOutput, teacher_logits: torch.Tensor) -> None:
        kd = logit_distillation_loss(out.logits, teacher_logits, self.plan.logit_temperature)
        out.terms["logit_kd"] = kd
        weighted = self.plan.logit_weight * kd
        out.loss = weighted if out.loss is None else out.loss + weighted

    def _lockstep(self, x: torch.Tensor) -> TransferOutput:
        mode, plan = self.plan.mode, self.plan
        teacher, student = self.teacher, self.student
        tdtype = self._teacher_ready(x.device)
        wanted = mode.signals
        teacher_for = plan.teacher_for
        share = plan.share_drop_path and self.training
        wants_logits = self.training and plan.logit_weight > 0
        stop_at = self._teacher_stop_layer(wants_logits)
        ce_path = self.ce_path or ce_path_for(x.device)

        with torch.no_grad():
            xt = _embed(teacher, x.to(tdtype))
        xs = _embed(student, x)
        out = TransferOutput(logits=x.new_empty(0))
        losses: list[torch.Tensor] = []
        signals: dict[int, dict[str, torch.Tensor]] = {}  # teacher layer -> its captured q/k/v
        next_t = 0
        for i, blk in enumerate(student.blocks):
            # With shared drop path the teacher walks block by block beside the student
            # (equal depths); otherwise it only advances as far as the next needed layer.
            target = i if share else teacher_for.get(i)
            if target is not None and target > plan.last_teacher_layer:
                target = None
            drop = (
                _shared_drop_path(blk, teacher.blocks[i], x.shape[0], x.device)
                if share and target is not None
                else contextlib.nullcontext()
            )
            with drop:
                while target is not None and next_t <= target:
                    if next_t == stop_at:
                        # the last layer the plan reads: its q/k(/v) are all the teacher has to give
                        with torch.no_grad():
                            normed = teacher.blocks[next_t].norm1(xt)
                            signals[next_t] = self._teacher_attn[next_t].project(normed, wanted)
                        next_t += 1
                        continue
                    t_io = AttentionIO(capture=wanted) if next_t in plan.teacher_layers else None
                    with torch.no_grad(), attention_io(self._teacher_attn[next_t], t_io):
                        xt = teacher.blocks[next_t](xt)
                    if t_io is not None:
                        signals[next_t] = t_io.captured
                    next_t += 1
                own: dict[str, torch.Tensor] | None = None
                own_lse: torch.Tensor | None = None
                if i not in teacher_for:
                    xs = blk(xs)
                elif mode.is_copy:
                    borrowed = signals[teacher_for[i]]
                    with attention_io(
                        self._student_attn[i], AttentionIO(**{c: borrowed[c] for c in mode.borrow})
                    ):
                        xs = blk(xs)
                else:
                    s_io = AttentionIO(capture=wanted, return_lse=self._wants_lse(i, ce_path))
                    with attention_io(self._student_attn[i], s_io):
                        xs = blk(xs)
                    own, own_lse = s_io.captured, s_io.lse
            if own is not None and mode.is_distill:
                losses.append(self._layer_loss(i, signals[teacher_for[i]], own, out, ce_path, own_lse))
        xs = student.norm(xs)
        out.logits = student.forward_head(xs)
        if losses:
            out.loss = plan.weight * torch.stack(losses).sum()
        if self.training and plan.logit_weight > 0:
            with torch.no_grad():
                for j in range(next_t, len(teacher.blocks)):
                    xt = teacher.blocks[j](xt)
                teacher_logits = teacher.forward_head(teacher.norm(xt))
            self._add_logit_loss(out, teacher_logits)
        return out

    def _wants_lse(self, layer: int, ce_path: CEPath) -> bool:
        """Whether student ``layer`` hands out its log-sum-exp: distilled maps, a softmax layer, a path
        that takes the log-sum-exp from the attention kernel."""
        return (
            ce_path.needs_student_lse
            and self.plan.mode.distills_maps
            and self._student_attn[layer].map_kind is MapKind.SOFTMAX
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
            res = map_distillation_loss(
                self._student_attn[layer],
                student_sig["q"],
                student_sig["k"],
                teacher_sig["q"],
                teacher_sig["k"],
                with_metric=self.log_kl,
                ce_path=ce_path,
                lse_s=lse_s,
            )
            out.terms[f"{res.kind.term}/{layer}"] = res.loss
            if res.metric is not None and res.kind.logged_metric:
                out.logs[f"{res.kind.logged_metric}/{layer}"] = res.metric
            return res.loss
        c = mode.distill.chunks
        with fp32_section(student_sig[c].device.type):
            loss = F.mse_loss(student_sig[c].float(), teacher_sig[c].detach().float())
        out.terms[f"{c}_mse/{layer}"] = loss
        return loss
