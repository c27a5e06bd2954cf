"""What a teacher hands a student, and what a student shows to be compared with it: one typed vocabulary.

Copy (the student attends with the teacher's q and k), attention distillation (the student's maps, q, k or v
learn the teacher's), logit distillation, stage 1 of a conversion (each student layer fits the teacher's map,
and optionally its attention output, on the teacher's hidden input) and feature distillation (the student's
final tokens learn the teacher's) all name what crosses over with a `Signal`, never with a string of letters:

==============  ==========  ====================================================================================
signal          taken from  what it is
==============  ==========  ====================================================================================
``input``       a layer     the attention layer's input (after the block's norm): stage 1 feeds it to the
                            student's layer
``q`` ``k``     a layer     the projections (B, H, N, d); q and k exactly as they enter the logits (after the
``v``                       q/k norms and any rotary embedding)
``maps``        a layer     the attention rows, softmax(s·q kᵀ + bias): what q and k make through the layer's
                            adapter (the layer hands out q and k, with its logit bias and mask)
``output``      a layer     the attention's output (after its output projection)
``features``    the model   ``forward_features``'s final tokens (after the final norm), prefix and patch tokens
``logits``      the model   the head's output
==============  ==========  ====================================================================================

An attention layer itself hands out only q, k and v (`Signal.chunks`: maps are q and k); `Chunks` is such a
set, in timm's qkv order, as a copy mode borrows it or an `AttentionIO` captures it. Being a `StrEnum`, a
signal prints, compares and serialises as its word (``Signal.Q == "q"``), so the config's words, logged names
and recorded runs stay what they were.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Signal(StrEnum):
    """One thing a teacher hands over or a student is compared on (the table in the module docstring)."""

    INPUT = "input"
    Q = "q"
    K = "k"
    V = "v"
    MAPS = "maps"
    OUTPUT = "output"
    FEATURES = "features"
    LOGITS = "logits"

    def __str__(self) -> str:
        return self.value

    @property
    def chunks(self) -> tuple[Signal, ...]:
        """The projections an attention layer hands out to give this signal: q and k for maps, a projection
        itself, none for what is not made of projections (the input, output, features, logits)."""
        if self is Signal.MAPS:
            return (Signal.Q, Signal.K)
        return (self,) if self in QKV_SIGNALS else ()

    @property
    def is_chunk(self) -> bool:
        """q, k or v itself: compared element-wise, so teacher and student head shapes must match."""
        return self in QKV_SIGNALS

    @property
    def of_layer(self) -> bool:
        """Taken from one attention layer (else from the whole model's forward)."""
        return self not in (Signal.FEATURES, Signal.LOGITS)


#: the projections of a fused qkv, in timm's row order
QKV_SIGNALS: tuple[Signal, ...] = (Signal.Q, Signal.K, Signal.V)
_WORDS = frozenset(s.value for s in Signal)


class Chunks(tuple):
    """A set of q/k/v `Signal`s in timm's order: what a copy mode borrows, what an `AttentionIO` captures.

    Built from signals (``maps`` stands for q and k), from one signal, or from the config's letters
    (``"qk"``); a signal that no projection gives (``output``) is a `ValueError`. Prints as its letters
    (``qk``), as run records and messages have always said it.
    """

    def __new__(cls, signals: Iterable[Signal | str] | Signal | str = ()) -> Chunks:
        if isinstance(signals, str):
            signals = (signals,) if signals in _WORDS else tuple(signals)
        wanted: set[Signal] = set()
        for s in signals:
            signal = Signal(s)
            if not signal.chunks:
                raise ValueError(
                    f"'{signal}' is not made of q/k/v projections; an attention hands out q, k, v"
                )
            wanted.update(signal.chunks)
        return super().__new__(cls, tuple(c for c in QKV_SIGNALS if c in wanted))

    def __str__(self) -> str:
        return "".join(self)

    def __repr__(self) -> str:
        return repr(str(self))
