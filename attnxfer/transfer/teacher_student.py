"""`TeacherStudent`: a frozen teacher and a trainable student, each running its own timm forward.

The teacher is a guest: frozen, ``eval()``, bf16 on GPU, under ``torch.no_grad()`` (not ``inference_mode``:
copied q/k are saved for the student's backward), and not a registered submodule, so it never reaches the
optimizer, EMA, ``state_dict`` or checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from ..models.attention import AttentionIO, attention_io, attention_layers, make_transfer_aware
from ..models.attention.partial_qkv import thaw_projections
from ..models.handover import Chunks, Signal
from ..speak import warn
from .comparisons import Comparison, LayerPair, Step
from .losses import CEPath, ce_path_for
from .plan import PlanError, TransferPlan, build_plan
from .step_loss import STEP_KEYS, Loss, compose_loss, marked_parts
from .teacher_pass import (
    TeacherHandover,
    TeacherNeeds,
    block_of,
    features_and_logits,
    images,
    run_teacher,
)


@dataclass
class TransferOutput:
    """The student's logits and each comparison of the plan with its unweighted `Loss` (``compared``, in the
    plan's order); ``loss`` is their weighted sum (None when nothing is compared)."""

    logits: torch.Tensor
    compared: list[tuple[Comparison, Loss]] = field(default_factory=list)

    @functools.cached_property
    def loss(self) -> torch.Tensor | None:
        return compose_loss(self.compared).total if self.compared else None

    @property
    def terms(self) -> dict[str, torch.Tensor]:
        return {k: v for _, parts, _ in marked_parts(self.compared) for k, v in parts.items()}

    @property
    def logs(self) -> dict[str, torch.Tensor]:
        return {k: v for _, _, logs in marked_parts(self.compared) for k, v in logs.items()}


class _FixedDropPath(nn.Module):
    """Applies given per-sample keep masks, the i-th call the i-th mask: shares drop-path draws between two
    blocks (one such module per block, so that each counts its own calls)."""

    def __init__(self, masks: list[torch.Tensor]):
        super().__init__()
        self.masks = masks
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        if x.shape[0] != mask.shape[0]:
            # SAM's windowed blocks apply drop_path1 to their batch of windows, image by image (B·windows
            # rows): each image's windows take its draw, else the mask does not broadcast
            mask = mask.repeat_interleave(x.shape[0] // mask.shape[0])
        return x * mask.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B, N, C) or NHWC stages


def _drop_rates(block: nn.Module) -> Iterator[tuple[str, float, int]]:
    """(name, rate, calls per forward) of the block's drop-path modules."""
    for name in ("drop_path1", "drop_path2"):
        yield name, float(getattr(getattr(block, name, None), "drop_prob", 0.0)), 1
    # CaiT's blocks have one ``drop_path`` that both residual branches call, each with its own draw: it was
    # not shared, so the student dropped branches the teacher kept
    yield "drop_path", float(getattr(getattr(block, "drop_path", None), "drop_prob", 0.0)), 2


@contextlib.contextmanager
def _shared_drop_path(
    pairs: list[tuple[nn.Module, nn.Module]], batch: int, device: torch.device
) -> Iterator[None]:
    """Draw the student's drop-path masks once per block, in its own forward's order, and use them in both."""
    saved = []
    try:
        for student_blk, teacher_blk in pairs:
            for name, rate, calls in _drop_rates(student_blk):
                if rate <= 0.0:
                    continue
                keep = 1.0 - rate
                masks = [torch.empty(batch, device=device).bernoulli_(keep).div_(keep) for _ in range(calls)]
                for blk in (student_blk, teacher_blk):
                    saved.append((blk, name, getattr(blk, name)))
                    setattr(blk, name, _FixedDropPath(masks))
        yield
    finally:
        for blk, name, mod in reversed(saved):
            setattr(blk, name, mod)


class TeacherStudent(nn.Module):
    """Teacher and student in lock-step (both made transfer-aware in place; the teacher may be None only for a
    plan that compares nothing with one); returns the student's logits and, in training mode, the transfer loss
    (None at eval, where nothing is compared). ``plan``: None builds ``mode``'s default; ``ce_path``: None
    picks by device (`ce_path_for`)."""

    def __init__(
        self,
        teacher: nn.Module | None,
        student: nn.Module,
        plan: TransferPlan | None = None,
        *,
        mode: str = "distill",
        teacher_dtype: torch.dtype | None = None,
        ce_path: CEPath | str | None = None,
    ) -> None:
        super().__init__()
        if teacher is student:  # freezing the teacher would freeze the student: nothing would train
            raise InputError(
                "teacher and student are one model: give the student its own, e.g. "
                "copy.deepcopy(teacher).requires_grad_(True) (a loaded teacher is frozen) or "
                "attnxfer.student_like(teacher)"
            )
        for role, model in (("teacher", teacher), ("student", student)):
            if isinstance(model, TeacherStudent):
                raise TypeError(f"the {role} is a TeacherStudent: pass its model, pair.{role}")
        if plan is not None and not isinstance(plan, TransferPlan):
            raise TypeError(
                f"plan is a {type(plan).__name__} ({plan!r:.40}): pass build_plan(teacher, student, ...), or "
                "mode=... by keyword for a mode's default plan"
            )
        # else torch's `.to()` refuses it only at the first step
        if not isinstance(teacher_dtype, torch.dtype | None):
            raise TypeError(f"teacher_dtype: a torch.dtype (torch.bfloat16) or None, got {teacher_dtype!r}")
        try:  # before the models are touched (the teacher frozen)
            ce_path = CEPath(ce_path) if ce_path is not None else None
        except ValueError:
            raise InputError(
                f"ce_path={ce_path!r}: choose one of {', '.join(CEPath)}, or None (by device)"
            ) from None
        self.student = make_transfer_aware(student)
        if teacher is not None:
            make_transfer_aware(teacher)
            teacher.requires_grad_(False)
            teacher.eval()
        # Not a submodule: keeps the teacher out of parameters(), state_dict(), EMA and DDP.
        self.__dict__["teacher"] = teacher
        self.plan = plan if plan is not None else build_plan(teacher, student, mode)
        self.teacher_dtype = teacher_dtype
        self.ce_path = ce_path
        # a path named here is honoured or refused; one `auto` resolved (apps/run/ce_choice.py sets this
        # False) may give way to the same CE by sdpa where a layer cannot hand out its log-sum-exp
        self.ce_path_forced = ce_path is not None
        # KL = CE − H(P_t) costs a teacher pass per layer and is only logged: the engine sets it per step
        self.log_kl = True
        self._kept: contextlib.ExitStack | None = None  # kept_for_backward's, while its block runs
        self._kept_used = False
        self._student_layers = attention_layers(student)
        self._teacher_layers = attention_layers(teacher) if teacher is not None else []
        self._student_attn = [m for _, m in self._student_layers]
        self._teacher_attn = [m for _, m in self._teacher_layers]
        s_far = max((s for s, _ in self.plan.pairs), default=-1)
        t_far = max((t for _, t in self.plan.pairs), default=-1)
        # what the plan was built for (0: a plan made by hand records none): another depth pairs other layers
        # silently, other heads fail deep in the first forward
        built = (
            self.plan.student_depth,
            self.plan.student_heads,
            self.plan.teacher_heads,
            self.plan.teacher_depth,
        )
        # without a teacher (a distilled student scored alone) only the student's side is checked, as its depth is
        t_heads = self._teacher_attn[0].num_heads if self._teacher_attn else built[2]
        t_depth = len(self._teacher_attn) if self._teacher_attn else built[3]
        given = (len(self._student_attn), self._student_attn[0].num_heads, t_heads, t_depth)
        if (
            s_far >= given[0]
            or (teacher is not None and t_far >= len(self._teacher_attn))
            or any(b not in (0, g) for b, g in zip(built, given))
        ):
            raise PlanError(  # an IndexError at the first forward otherwise
                f"the plan was built for a student of {built[0]} attention blocks with {built[1]} heads and a "
                f"teacher of {built[3]} blocks with {built[2]} heads (it pairs student layer {s_far} with teacher "
                f"layer {t_far}); this student has {given[0]} blocks with {given[1]} heads, this teacher "
                f"{len(self._teacher_attn)} blocks with {t_heads} heads: it was built for other models; "
                "build_plan(teacher, student, ...) with these two"
            )
        paired = {s for s, _ in self.plan.pairs}
        for s, attn in enumerate(self._student_attn):
            borrow = self.plan.mode.borrow if s in paired else Chunks()
            if getattr(attn, "borrowed_chunks", borrow) != borrow:  # a student reused from another copy pair
                thaw_projections(attn)
            attn.freeze_projections(borrow)
            attn.borrowed_chunks = borrow
        # the student in the pair's mode: a deep copy of a loaded teacher is in eval
        self.train(self.training)

    def train(self, mode: bool = True) -> TeacherStudent:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _teacher_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the teacher runs in next to ``device`` (bf16 on CUDA unless told otherwise)."""
        return self.teacher_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    def teacher_needs(self) -> TeacherNeeds:
        """What a step in the current mode (training or eval) needs of the teacher; empty: it need not run."""
        plan, mode = self.plan, self.plan.mode
        if self.teacher is None or not (self.training or mode.teacher_at_eval):
            return TeacherNeeds()
        needs = [TeacherNeeds({t: mode.borrow for _, t in plan.pairs if mode.is_copy})]
        for c in plan.comparisons if self.training else ():
            signals = frozenset() if c.signal.of_layer else {c.signal}
            needs.append(TeacherNeeds({t: c.chunks for _, t in c.pairs}, signals))
        return TeacherNeeds().union(*needs)

    @property
    def owns_teacher_pass(self) -> bool:
        """Whether this pair's teacher pass can be no other pair's (it takes the student's drop-path masks)."""
        pairs = self._drop_path_pairs(self.teacher_needs().last_layer)
        return any(rate > 0 for student_blk, _ in pairs for _, rate, _ in _drop_rates(student_blk))

    def teacher_pass(
        self, x: torch.Tensor | dict[str, torch.Tensor], needs: TeacherNeeds | None = None
    ) -> TeacherHandover:
        """The teacher's forward on ``x`` for ``needs`` (default: this pair's; several pairs sharing the teacher
        pass the union of theirs), the teacher moved next to the input in its dtype on first use (in place: the
        model passed in is cast)."""
        needs = self.teacher_needs() if needs is None else needs
        device = images(x).device
        dtype = self._teacher_dtype(device)
        p = next(self.teacher.parameters())
        if p.device != device or p.dtype != dtype:
            if p.is_floating_point() and torch.finfo(p.dtype).bits < torch.finfo(dtype).bits:
                warn(
                    f"the teacher's weights are {p.dtype} (cast in place by a pair of that teacher_dtype, or "
                    f"loaded so): this pair runs it in {dtype} from those rounded weights; load the teacher again "
                    "for its own"
                )
            self.teacher.to(device=device, dtype=dtype)
        # the batch in the teacher's dtype: floating tensors only (a NaFlex dict's coordinates and validity stay)
        if isinstance(x, dict):
            x = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in x.items()}
        else:
            x = x.to(dtype)
        return run_teacher(self.teacher, x, needs, self._teacher_layers)

    def forward(
        self, x: torch.Tensor | dict[str, torch.Tensor], handover: TeacherHandover | None = None
    ) -> TransferOutput:
        """``x``: images, or a NaFlexViT batch (padded tokens are left out of the maps' CE). ``handover``: the
        teacher's pass on ``x`` run for this pair and others; the result is the same given or not."""
        batch = images(x)
        needs = self.teacher_needs()
        if needs.empty:  # at eval too, unless the mode needs the teacher at inference
            return TransferOutput(self.student(x))
        if handover is not None and not isinstance(handover, TeacherHandover):  # pair(images, labels)
            raise TypeError(
                f"the second argument is the teacher's hand-over, got {type(handover).__name__}: the pair takes "
                "images only (its output's logits go to your task loss with the labels)"
            )
        if handover is not None:
            if self.owns_teacher_pass:
                raise ValueError(
                    "this pair's teacher takes the student's drop-path masks (share_drop_path with drop path in "
                    "training), so its teacher pass is its own: call it without a hand-over"
                )
            handover.check(self.teacher, needs, batch.shape[0], self._teacher_dtype(batch.device))
        with contextlib.ExitStack() as this_forward:
            lent = self._lent_through_backward(this_forward, needs)
            if handover is None:
                pairs = self._drop_path_pairs(needs.last_layer)
                lent.enter_context(_shared_drop_path(pairs, batch.shape[0], batch.device))
                handover = self.teacher_pass(x, needs)
            return self._student_pass(x, handover, lent)

    @contextlib.contextmanager
    def kept_for_backward(self) -> Iterator[None]:
        """Keeps what the pair's forward lends the student (the borrowed q/k/v, the captures, the shared
        drop-path masks) until the block ends: a student with gradient checkpointing (timm's
        ``set_grad_checkpointing``) recomputes its blocks in the backward pass, which must see them again.
        One forward and its backward inside: ``with pair.kept_for_backward(): pair(x).loss.backward()``."""
        if self._kept is not None:
            raise InputError("kept_for_backward does not nest: one forward and its backward inside each")
        with contextlib.ExitStack() as kept:
            self._kept = kept
            try:
                yield
            finally:
                self._kept, self._kept_used = None, False

    def _lent_through_backward(
        self, this_forward: contextlib.ExitStack, needs: TeacherNeeds
    ) -> contextlib.ExitStack:
        """Where the forward enters what it lends the student: the `kept_for_backward` block's stack, else
        this forward's. A checkpointing student outside such a block is refused where it is lent anything (a
        layer of the teacher's is needed: copied, or compared with a capture): its recomputed blocks would
        attend with their own q/k and capture nothing, a silently wrong gradient."""
        if self._kept is not None:
            if self._kept_used:
                raise InputError(
                    "one forward of the pair inside each kept_for_backward block (its backward next): a second "
                    "would lend the student's layers twice"
                )
            self._kept_used = True
            return self._kept
        # timm's flag sits on the model (ViT) or on its stages (Swin)
        if (
            needs.layers
            and torch.is_grad_enabled()
            and any(getattr(m, "grad_checkpointing", False) for m in self.student.modules())
        ):
            raise InputError(
                "the student recomputes its blocks in the backward pass (gradient checkpointing, timm's "
                "set_grad_checkpointing), which must see what the pair's forward lends them: run the forward "
                "and its backward inside `with pair.kept_for_backward():`"
            )
        return this_forward

    def _drop_path_pairs(self, last: int) -> list[tuple[nn.Module, nn.Module]]:
        """(student block, teacher block) of the layers up to teacher layer ``last`` (equal depths) whose
        drop-path draws the two share: none unless ``share_drop_path`` in training."""
        if not (self.plan.share_drop_path and self.training):
            return []
        layers = zip(self._student_layers[: last + 1], self._teacher_layers[: last + 1])
        return [(block_of(self.student, s), block_of(self.teacher, t)) for (s, _), (t, _) in layers]

    def _student_pass(
        self, x: torch.Tensor | dict, handover: TeacherHandover, lent: contextlib.ExitStack
    ) -> TransferOutput:
        """The student's forward borrowing what the mode borrows, capturing what the comparisons compare; the
        layers hold their `AttentionIO` until ``lent`` closes."""
        compared = self.plan.comparisons if self.training else ()
        ce_path = self.ce_path or ce_path_for(images(x).device)
        ios = self._student_ios(handover, compared, ce_path)
        for s, io in ios.items():
            lent.enter_context(attention_io(self._student_attn[s], io))
        if any(c.signal is Signal.FEATURES for c in compared):  # the features and logits of one forward
            student_whole = features_and_logits(self.student, x, logits=True)
        else:
            student_whole = {Signal.LOGITS: self.student(x)}
        out = TransferOutput(logits=student_whole[Signal.LOGITS])
        step = Step(self.student, self.teacher, ce_path, self.log_kl, self.ce_path_forced)
        for c in compared:
            if c.signal.of_layer:
                res = self._layer_loss(c, ios, handover, step)
            else:
                res = c.loss_fn.compare(c, student_whole[c.signal], handover.signals[c.signal], step)
                _check_numbers(c, res, "compare")
            # a total without a gradient (detached) would be trained on as a constant, training nothing
            if torch.is_grad_enabled() and not res.total.requires_grad:
                raise ValueError(_no_gradient(c, self.student))
            out.compared.append((c, res))
        return out

    def _student_ios(
        self, handover: TeacherHandover, compared: Sequence[Comparison], ce_path: CEPath
    ) -> dict[int, AttentionIO]:
        """Per student layer, one `AttentionIO`: the q/k/v it borrows and the capture its comparisons need."""
        mode, ios = self.plan.mode, {}
        for s, t in self.plan.pairs if mode.is_copy else ():
            borrowed = handover.layers[t]
            io = ios[s] = AttentionIO(**{str(c): borrowed[c] for c in mode.borrow})
            if set(Signal.MAPS.chunks) <= set(mode.borrow):  # the maps whole: their logit bias comes along
                io.bias = borrowed.get("bias")
                # borrowed logits keep the teacher's scale: its q rescaled by s_t / s_s where the two layers
                # scale q·kᵀ differently (a Swin V2 or Gemma4 layer's scale 1 against d^-0.5)
                ratio = self._teacher_attn[t].logit_scale(io.q) / self._student_attn[s].logit_scale(io.q)
                if ratio != 1:
                    io.q = io.q * ratio
        for c in compared:
            for s, t in c.pairs:
                io = ios.setdefault(s, AttentionIO())
                io.capture = Chunks((*io.capture, *c.chunks))
                # the teacher has run: whether its layer added a logit bias on this batch is known
                pair = self._pair(s, t, {}, handover.layers.get(t, {}))
                io.return_lse = io.return_lse or c.loss_fn.wants_lse(pair, ce_path)
        return ios

    def _layer_loss(
        self, c: Comparison, ios: dict[int, AttentionIO], handover: TeacherHandover, step: Step
    ) -> Loss:
        """A layer comparison over its pairs: the sum of the layers' losses, every layer's terms and logs."""
        losses, terms, logs = [], {}, {}
        for s, t in c.pairs:
            io = ios[s]
            student = io.captured if io.lse is None else {**io.captured, "lse": io.lse}
            res = c.loss_fn.compare_layer(c, self._pair(s, t, student, handover.layers[t]), step)
            _check_numbers(c, res, "compare_layer")
            if taken := sorted(res.terms.keys() & terms.keys() | res.logs.keys() & logs.keys()):
                raise ValueError(  # else the log keeps the last layer's value under a name that reads as all
                    f"{c.origin}: comparison loss {c.loss!r} returned from compare_layer {taken[0]!r} at student "
                    f"layer {s} and at an earlier one; name each layer's term apart, e.g. "
                    f"f'{taken[0]}/{{pair.student_layer}}'"
                )
            losses.append(res.total)
            terms.update(res.terms)
            logs.update(res.logs)
        return Loss(torch.stack(losses).sum(), terms, logs)

    def _pair(self, s: int, t: int, *signals: Mapping[str, Any]) -> LayerPair:
        """Student layer ``s`` and teacher layer ``t``, with what they handed over (student's, teacher's)."""
        return LayerPair(s, t, self._student_attn[s], self._teacher_attn[t], *signals)


def _no_gradient(c: Comparison, student: nn.Module) -> str:
    """Why ``c``'s total carries no gradient to the student: the student's own state where that explains it
    (then the loss is not at fault, a built-in one included), else the loss's doing."""
    head = f"{c.origin}: comparison loss {c.loss!r} returned a total that carries no gradient to the student"
    if not any(p.requires_grad for p in student.parameters()):
        return (
            f"{head}: none of the student's parameters requires grad (a copy of a frozen teacher is frozen "
            "too), so it would train nothing; call student.requires_grad_(True)"
        )
    # the pair sets its student's mode as it is built and on pair.train()/eval(), not when the student's is set
    if not student.training:
        return (
            f"{head}: the pair is in training mode but its student in eval mode (student.eval() after the pair was "
            "built), where a layer may give none (a hashing layer's codes are hard signs); call pair.train()"
        )
    return (
        f"{head} (detached, or computed under torch.no_grad()), so it would train nothing; compute it from the "
        "student's tensors as handed over, not detached copies"
    )


def _check_numbers(c: Comparison, res: Loss, method: str) -> None:
    """Refuse a `Loss` whose total, terms or logs are not one number each (0-d tensors): the step sums and
    logs them as such, and a vector would fail far from the loss that made it (or its layers' sum hide it)."""
    if not isinstance(res, Loss):  # a bare tensor: no terms, and the step reads ``.total``
        raise TypeError(
            f"{c.origin}: comparison loss {c.loss!r} returned from {method} a {type(res).__name__}, not a "
            "Loss(total, terms)"
        )
    if taken := sorted((res.terms.keys() | res.logs.keys()) & STEP_KEYS):
        raise ValueError(
            f"{c.origin}: comparison loss {c.loss!r} returned from {method} a term named {taken[0]!r}, which the "
            f"step logs itself; name it otherwise, e.g. '{c.loss}_{taken[0]}'"
        )
    if c.name in res.logs or res.terms.get(c.name, res.total) is not res.total:  # the step logs its total so
        raise ValueError(
            f"{c.origin}: comparison loss {c.loss!r} returned from {method} a part named {c.name!r}, the name the "
            f"step logs the comparison's total under, which would replace it; name the part otherwise, e.g. "
            f"'{c.name}_part'"
        )
    if both := sorted(res.terms.keys() & res.logs.keys()):  # the step logs terms and logs as one record
        head, slash, layer = both[0].partition("/")
        raise ValueError(
            f"{c.origin}: comparison loss {c.loss!r} returned from {method} {both[0]!r} as a term and as a log, "
            f"and the log keeps one value under that name (the log's); name the log otherwise, e.g. "
            f"'{head}_log{slash}{layer}'"
        )
    for name, value in [("total", res.total), *res.terms.items(), *res.logs.items()]:
        if torch.is_tensor(value) and value.dim() == 0:
            continue
        got = f"tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
        raise TypeError(
            f"{c.origin}: comparison loss {c.loss!r} returned from {method} a Loss whose {name!r} is a {got}; "
            "its total, terms and logs must be 0-d tensors (reduce them, e.g. with .mean())"
        )
