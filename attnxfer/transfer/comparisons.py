"""What a transfer plan compares: `Comparison` entries, and the registry of the losses they name.

Each comparison is data (signal, registered loss, weight, options, layer pairs), so a new loss is one
`ComparisonLoss` subclass registered with `comparison_loss` in any file, which ``transfer.losses`` entries
then name (docs/distillation.md). A comparison returns its loss unweighted; `step_loss.compose_loss` weighs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

from ..models.handover import Chunks, Signal
from ..plugins import LOSS_GROUP, load_entry_points
from .losses import CEPath
from .modes import PlanError
from .step_loss import STEP_KEYS, Loss


@dataclass(frozen=True)
class Comparison:
    """The student's ``signal`` against its teacher's by the registered ``loss`` at ``weight`` (at each layer pair)."""

    signal: Signal
    loss: str
    weight: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)
    pairs: tuple[tuple[int, int], ...] = ()
    #: per pair, what the loss compares there, in words (printed with the plan; empty where it says nothing)
    notes: tuple[str, ...] = ()
    #: who asked for it, in the config's words ("transfer.losses[0]"): what a message about it names
    origin: str = ""
    #: the student layers its entry limits it to, as written (negatives from the end); None: the transfer's
    layers: tuple[int, ...] | None = None

    @property
    def loss_fn(self) -> ComparisonLoss:
        return get_comparison_loss(self.loss)

    @property
    def name(self) -> str:
        """Its logged term: the loss's name, with the signal where the loss compares several (``mse_q``)."""
        return self.loss if len(self.loss_fn.signals) == 1 else f"{self.loss}_{self.signal}"

    def option(self, name: str) -> Any:
        """The loss's option ``name``: as the entry set it, else the loss's default."""
        return self.options.get(name, self.loss_fn.options[name])

    @property
    def chunks(self) -> Chunks:
        """The q/k/v each of its teacher layers hands over and each of its student layers captures."""
        return self.loss_fn.chunks(self)


@dataclass(frozen=True)
class PlanModels:
    """The two models as a plan checks a comparison against them: attention layers and token partitions."""

    teacher: nn.Module | None
    student: nn.Module
    teacher_attn: Sequence[nn.Module] = ()
    student_attn: Sequence[nn.Module] = ()
    teacher_parts: Sequence[dict] = ()
    student_parts: Sequence[dict] = ()


@dataclass(frozen=True)
class LayerPair:
    """One layer pair of a comparison as it runs: the two attention layers and, once the models have run, what
    each handed over (q/k/v, ``bias``, ``mask``; the student's ``lse``, the teacher's ``key_pooling``)."""

    student_layer: int
    teacher_layer: int
    student_attn: nn.Module
    teacher_attn: nn.Module
    student: Mapping[str, Any] = field(default_factory=dict)
    teacher: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """What a loss may read on a step beside the two signals (KL beside CE costs a teacher pass per layer)."""

    student: nn.Module
    teacher: nn.Module | None
    ce_path: CEPath
    with_metric: bool
    #: ``ce_path`` was named (``transfer.ce_path``, ``TeacherStudent(ce_path=...)``), not resolved by ``auto``:
    #: where it cannot run on a call the loss raises `CEPathUnavailable` rather than take another path
    ce_path_forced: bool = True


class ComparisonLoss:
    """One way to compare a student's signal with its teacher's: override `compare` (whole-model signals) or
    `compare_layer` (maps, q, k, v); the plan-time hooks refuse what cannot be compared (a `PlanError`)."""

    #: the name it is registered under (set by `comparison_loss`)
    name: str = ""
    #: the signals it compares; a ``transfer.losses`` entry that names none takes the first
    signals: ClassVar[tuple[Signal, ...]] = ()
    #: its options and their defaults: a ``transfer.losses`` entry may set these, and no others
    options: ClassVar[Mapping[str, Any]] = {}
    #: it computes softmax students' exact CE on the run's ``transfer.ce_path`` (what `ce_select` times)
    uses_ce_path: ClassVar[bool] = False

    def check(self, comparison: Comparison, models: PlanModels) -> None:
        """Refuse a comparison these models cannot make (before its layer pairs are checked one by one)."""
        if models.teacher is None:
            raise PlanError(f"{comparison.origin or self.name} compares with a teacher; set teacher.spec")

    def check_pair(self, comparison: Comparison, models: PlanModels, s: int, t: int, where: str) -> None:
        """Refuse a (student layer ``s``, teacher layer ``t``) pair this loss cannot compare."""

    def pools_teacher_keys(self, comparison: Comparison, models: PlanModels, s: int, t: int) -> bool:
        """Whether the pair may partition its tokens otherwise (student rows pooled onto the teacher's keys)."""
        return False

    def note(self, comparison: Comparison, models: PlanModels, s: int, t: int) -> str:
        """What the pair's loss compares, in words, for the plan's table (empty: nothing to say)."""
        return ""

    def describe(self, comparison: Comparison) -> list[str]:
        """The plan's lines for it."""
        # every option at the value the run uses, defaults included: run.json's plan is its record
        options = "".join(f", {k} {comparison.option(k)}" for k in self.options)
        line = f"  {self.name} of {comparison.signal}: weight {comparison.weight:g}{options}"
        if comparison.pairs:
            line += ", student layers " + ", ".join(f"{s}<-{t}" for s, t in comparison.pairs)
        return [line]

    def chunks(self, comparison: Comparison) -> Chunks:
        """What each teacher layer hands over and each student layer captures: what the signal is made of."""
        return Chunks(comparison.signal) if comparison.signal.chunks else Chunks()

    def wants_lse(self, pair: LayerPair, ce_path: CEPath) -> bool:
        """Whether the student layer hands out its rows' log-sum-exp; asked after the teacher's pass
        (``pair.teacher``: what its layer handed over on this batch) and before the student's."""
        return False

    def compare_layer(self, comparison: Comparison, pair: LayerPair, step: Step) -> Loss:
        """One layer pair, with what its two layers handed over (``pair.student``, ``pair.teacher``)."""
        raise NotImplementedError(f"comparison loss {self.name!r} compares no layer signal")

    def compare(
        self, comparison: Comparison, student: torch.Tensor, teacher: torch.Tensor, step: Step
    ) -> Loss:
        """A whole-model signal: the student's (with its gradient) against the teacher's."""
        raise NotImplementedError(f"comparison loss {self.name!r} compares no whole-model signal")


#: every comparison loss by its name: filled by `comparison_loss`, in this package and in any other file
COMPARISON_LOSSES: dict[str, ComparisonLoss] = {}

_L = TypeVar("_L", bound=type[ComparisonLoss])


def comparison_loss(name: str) -> Callable[[_L], _L]:
    """Class decorator: register the `ComparisonLoss` under ``name`` (what ``transfer.losses`` entries say)."""

    def register(cls: _L) -> _L:
        # a name a config's `{name: ...}` could not match as typed ('MSE', 'v_mse ') is refused here
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"comparison loss names are lower-case words (a-z, 0-9, _), got {name!r}")
        if name in STEP_KEYS:
            raise ValueError(
                f"comparison loss {name!r}: the step logs {name!r} itself; register it under another name"
            )
        held = type(COMPARISON_LOSSES[name]) if name in COMPARISON_LOSSES else cls
        if (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"comparison loss {name!r} is already registered by {held.__module__}.{held.__qualname__}; "
                f"register {cls.__module__}.{cls.__qualname__} under another name, or import only one of them"
            )
        if not cls.signals:
            raise ValueError(f"comparison loss {name!r}: say which signals it compares (signals = (...))")
        # `(Signal.K)` is no tuple: a Signal is a str, so iterating it gave letters, and an AttributeError below
        if isinstance(cls.signals, str) or not all(isinstance(s, Signal) for s in cls.signals):
            raise ValueError(
                f"comparison loss {name!r}: signals must be a tuple of Signal members, e.g. (Signal.K,) (the comma "
                f"makes one a tuple), got {cls.signals!r}"
            )
        # its logged terms (``mse_v`` of mse's v) may not be another loss's: the log would not say which is which
        terms = {name} if len(cls.signals) == 1 else {f"{name}_{s}" for s in cls.signals}
        for other, held_loss in COMPARISON_LOSSES.items():
            theirs = {other} if len(held_loss.signals) == 1 else {f"{other}_{s}" for s in held_loss.signals}
            if other != name and (clash := sorted(terms & theirs)):
                raise ValueError(
                    f"comparison loss {name!r} would log {clash[0]!r}, as comparison loss {other!r} "
                    f"({type(held_loss).__module__}) does: register it under another name"
                )
        if taken := [k for k in ENTRY_KEYS if k in cls.options]:  # the entry's key, never the option
            raise ValueError(
                f"comparison loss {name!r}: option {taken[0]!r} is a key of every transfer.losses entry "
                f"({', '.join(ENTRY_KEYS)}), so no entry could set it; name it otherwise, e.g. '{name}_{taken[0]}'"
            )
        # a layer's input or output is no attention's hand-over: its compare_layer would find nothing
        if unknown := [str(s) for s in cls.signals if s.of_layer and not s.chunks]:
            raise ValueError(
                f"comparison loss {name!r}: {', '.join(unknown)} is not handed to comparison losses; "
                "compare maps, q, k, v, features or logits"
            )
        # a signal without its method failed at the first step, the teacher loaded, in the base class's words
        for s in cls.signals:
            method, args, kind = (
                ("compare_layer", "comparison, pair, step", "a layer's signal")
                if s.of_layer
                else ("compare", "comparison, student, teacher, step", "a whole-model signal")
            )
            if getattr(cls, method) is getattr(ComparisonLoss, method):
                raise ValueError(
                    f"comparison loss {name!r}: {s}, {kind}, comes to {method}({args}), which it does not define"
                )
        loss = cls()
        loss.name = name
        COMPARISON_LOSSES[name] = loss
        return cls

    return register


def get_comparison_loss(name: str) -> ComparisonLoss:
    load_entry_points(LOSS_GROUP)  # even for a built-in's name: a package's loss of that name is then said
    if name not in COMPARISON_LOSSES:
        raise PlanError(
            f"unknown comparison loss {name!r}; choose one of: {', '.join(sorted(COMPARISON_LOSSES))} (a "
            "loss of your own: @comparison_loss in a file of attnxfer/transfer/ or in a module named by an "
            f"'{LOSS_GROUP}' entry point)"
        )
    return COMPARISON_LOSSES[name]


#: the keys of a ``transfer.losses`` entry that are not the loss's options
ENTRY_KEYS = ("name", "weight", "signal", "layers")
#: the option types an entry's value is checked against (its default's), in the config's words
_KINDS = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def comparison_from_entry(entry: Mapping[str, Any], origin: str) -> Comparison:
    """One ``transfer.losses`` entry as a `Comparison`; anything it cannot be is a `PlanError` naming ``origin``."""
    if not isinstance(entry, Mapping) or "name" not in entry:
        # not logit_kd's entry: a config reads it as transfer.logit_distill, with a warning to write that
        raise PlanError(
            f"{origin}: write a mapping with the loss's name, e.g. {{name: mse, signal: v, weight: 1.0}}"
        )
    if not isinstance(entry["name"], str):  # else str() made null the unknown loss 'None', naming no entry
        raise PlanError(f"{origin}.name: expected a loss's name (a string), got {entry['name']!r}")
    try:
        loss = get_comparison_loss(entry["name"])
    except PlanError as e:  # the Python API's entries too are named, as config load names the CLI's
        raise PlanError(f"{origin}.name: {e}") from None
    words = ", ".join(str(s) for s in loss.signals)
    try:
        signal = Signal(entry.get("signal", loss.signals[0]))
    except ValueError:
        signal = None
    if signal not in loss.signals:
        raise PlanError(f"{origin}: {loss.name} compares {words}, not {entry.get('signal')!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise PlanError(f"{origin}: weight must be a finite number >= 0, got {weight!r}")
    if (layers := entry.get("layers")) is not None and not signal.of_layer:
        raise PlanError(f"{origin}.layers: {signal} is a whole-model signal, it has no layers; remove layers")
    ints = isinstance(layers, Sequence) and all(
        isinstance(i, Integral) and not isinstance(i, bool) for i in layers
    )
    if layers is not None and (isinstance(layers, str) or not ints or not layers):
        raise PlanError(
            f"{origin}.layers: a list of student block indices (ints, -1: the last), e.g. [0, 1, -1], "
            f"or null (the transfer's layers); got {layers!r}"
        )
    options = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    unknown = sorted(set(options) - set(loss.options))
    if unknown:
        takes = ", ".join([*ENTRY_KEYS, *sorted(loss.options)])  # a misspelt weight is no option either
        raise PlanError(f"{origin}: {loss.name} takes {takes}; not {', '.join(unknown)}")
    for k, v in options.items():  # typed by its default, as config keys are: an int is a number, a bool none
        want = type(default := loss.options[k])
        if want is float and type(v) is int:
            options[k] = v = float(v)
        if want in _KINDS and (not isinstance(v, want) or (isinstance(v, bool) and want is not bool)):
            raise PlanError(
                f"{origin}.{k}: expected {_KINDS[want]} (as {loss.name}'s default {default!r}), got {v!r}"
            )
        if want is float and not math.isfinite(v):  # inf/nan would train, then fail the first save
            raise PlanError(
                f"{origin}.{k}: expected a finite number (as {loss.name}'s default {default!r}), got {v!r}"
            )
    layers = None if layers is None else tuple(int(i) for i in layers)
    return Comparison(signal, loss.name, float(weight), options, origin=origin, layers=layers)


def drop_hint(comparison: Comparison) -> str:
    """How the user leaves ``comparison`` out, in the config's words, with its verb: ``remove`` an entry,
    ``set`` a weight to 0."""
    if comparison.origin.startswith("transfer.losses"):
        return f"remove {comparison.origin} ({comparison.loss})"
    return f"set {comparison.origin}=0"


def asked_by(comparison: Comparison) -> str:
    """What in the config asked for ``comparison``."""
    if comparison.origin.startswith("transfer.losses"):
        return comparison.origin
    return f"{comparison.origin} > 0"
