"""The teacher's forward on a batch, run once for whatever the pairs that share it need (`TeacherNeeds.union`),
stopping after the last needed layer where nothing later is wanted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..models.attention import AttentionIO, StopForward, attached_ios, attention_layers
from ..models.attention.capture import require_image_batch
from ..models.handover import Chunks, Signal


@dataclass(frozen=True)
class TeacherNeeds:
    """What a step needs of the teacher's forward: per layer the q/k/v it hands over (with q and k also its
    ``bias``, ``mask`` and ``key_pooling``), whole-model signals, and whether the pass may stop early."""

    layers: Mapping[int, Chunks] = field(default_factory=dict)
    signals: frozenset[Signal] = frozenset()
    may_stop: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", {int(t): Chunks(c) for t, c in sorted(self.layers.items())})
        object.__setattr__(self, "signals", frozenset(Signal(s) for s in self.signals))
        model_signals = {s for s in self.signals if s.of_layer}
        if model_signals:
            raise ValueError(f"TeacherNeeds.signals are whole-model signals, not {sorted(model_signals)}")

    @property
    def empty(self) -> bool:
        """Nothing of the teacher is needed: it need not run."""
        return not self.layers and not self.signals

    @property
    def last_layer(self) -> int:
        return max(self.layers, default=-1)

    @property
    def stops(self) -> bool:
        """The pass ends right after the last needed layer has handed over."""
        return self.may_stop and not self.signals and bool(self.layers)

    def union(self, *others: TeacherNeeds) -> TeacherNeeds:
        """What a pass must give for this step and ``others`` alike (an early stop only where all allow one)."""
        every = (self, *others)
        layers = {t: Chunks({c for n in every for c in n.layers.get(t, ())}) for n in every for t in n.layers}
        signals = frozenset().union(*(n.signals for n in every))
        return TeacherNeeds(layers, signals, all(n.may_stop for n in every))

    def missing(self, given: TeacherNeeds) -> list[str]:
        """What these needs want that a pass run for ``given`` does not hand over, in words."""
        out = []
        for t, chunks in self.layers.items():
            lacking = [c for c in chunks if c not in given.layers.get(t, ())]
            if lacking:
                out.append(f"teacher layer {t}: {Chunks(lacking)}")
        out += [f"the teacher's {s}" for s in sorted(self.signals - given.signals)]
        return out


@dataclass(frozen=True)
class TeacherHandover:
    """What one teacher forward on one batch handed over, with what a pair checks it against (`check`)."""

    teacher: nn.Module
    needs: TeacherNeeds
    layers: Mapping[int, Mapping[str, Any]]
    signals: Mapping[Signal, torch.Tensor]
    batch: int
    dtype: torch.dtype

    def check(self, teacher: nn.Module, needs: TeacherNeeds, batch: int, dtype: torch.dtype) -> None:
        """A `ValueError` unless this is ``teacher``'s pass on this batch and dtype, handing over all of ``needs``."""
        if teacher is not self.teacher:
            raise ValueError("the hand-over is another teacher's pass: a pair takes its own teacher's")
        if batch != self.batch or dtype != self.dtype:
            raise ValueError(
                f"the hand-over is of a batch of {self.batch} in {self.dtype}; this pair runs a batch of {batch} "
                f"with its teacher in {dtype}"
            )
        missing = needs.missing(self.needs)
        if missing:
            raise ValueError(
                f"the teacher's hand-over lacks what this pair needs: {'; '.join(missing)}; run the teacher for "
                "the union of the pairs' needs (TeacherNeeds.union)"
            )


def run_teacher(
    teacher: nn.Module,
    x: torch.Tensor | dict[str, torch.Tensor],
    needs: TeacherNeeds,
    layers: Sequence[tuple[str, nn.Module]] | None = None,
) -> TeacherHandover:
    """``teacher``'s own forward on ``x`` (already in its dtype and on its device) for ``needs``, under
    ``torch.no_grad()`` (not ``inference_mode``: copy saves the teacher's q/k for the student's backward),
    stopped (`StopForward`) once the last needed layer has captured, where ``needs`` allow."""
    layers = list(layers if layers is not None else attention_layers(teacher))
    names, attns = [n for n, _ in layers], [m for _, m in layers]
    ios = {t: AttentionIO(capture=chunks) for t, chunks in needs.layers.items()}
    stop = needs.stops
    if stop:
        ios[needs.last_layer].stop = True
    whole: dict[Signal, torch.Tensor] = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if stop:  # the stopping block runs eagerly: a raise inside a compiled graph would break it
            stack.enter_context(_eager(block_of(teacher, names[needs.last_layer])))
        stack.enter_context(attached_ios(attns, ios))
        with contextlib.suppress(StopForward):
            if Signal.FEATURES in needs.signals:
                whole = features_and_logits(teacher, x, Signal.LOGITS in needs.signals)
            elif Signal.LOGITS in needs.signals:
                whole = {Signal.LOGITS: teacher(x)}
            elif isinstance(x, dict):  # NaFlexViT takes a dict's entries as arguments
                keys = ("patch_coord", "patch_valid", "attn_mask")
                teacher.forward_features(x["patches"], **{k: x[k] for k in keys if k in x})
            else:
                teacher.forward_features(x)
    dtype = next(teacher.parameters()).dtype
    return TeacherHandover(
        teacher, needs, {t: io.captured for t, io in ios.items()}, whole, images(x).shape[0], dtype
    )


def images(x: torch.Tensor | dict) -> torch.Tensor:
    """A batch's images: an image tensor, or the patches of NaFlexViT's dict (patches, coordinates, validity)."""
    require_image_batch(x)
    return x["patches"] if isinstance(x, dict) else x


def block_of(model: nn.Module, name: str) -> nn.Module:
    """The module that holds the attention called ``name`` (its block)."""
    return model.get_submodule(name.rpartition(".")[0])


@contextlib.contextmanager
def _eager(module: nn.Module) -> Iterator[None]:
    """Run ``module`` uncompiled for the duration (``nn.Module.compile`` keeps it in ``_compiled_call_impl``)."""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is None:
        yield
        return
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def features_and_logits(model: nn.Module, x: torch.Tensor | dict, logits: bool) -> dict[Signal, torch.Tensor]:
    """``model(x)``'s final token features and, with ``logits``, its head's output, in one forward."""
    if isinstance(x, dict):
        raise ValueError(
            "feature distillation compares final tokens of image batches; a patch batch (a dict of patches, "
            "coordinates and validity) has per-sample token counts: set transfer.feature_distill=0"
        )
    features = model.forward_features(x)
    return {Signal.FEATURES: features, **({Signal.LOGITS: model.forward_head(features)} if logits else {})}
