"""What a teacher hands a student, and what a student shows to be compared with it: a typed vocabulary
(`Signal`, a `StrEnum`, so config words, logged names and recorded runs stay what they were):

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

    @property
    def chunks(self) -> tuple[Signal, ...]:
        """The projections an attention layer hands out to give this signal (q and k for maps)."""
        if self is Signal.MAPS:
            return (Signal.Q, Signal.K)
        return (self,) if self in QKV_SIGNALS else ()

    @property
    def is_chunk(self) -> bool:
        """q, k or v itself: compared element-wise, so teacher and student head shapes must match."""
        return self in QKV_SIGNALS

    @property
    def of_layer(self) -> bool:
        return self not in (Signal.FEATURES, Signal.LOGITS)


#: the projections of a fused qkv, in timm's row order
QKV_SIGNALS: tuple[Signal, ...] = (Signal.Q, Signal.K, Signal.V)
_WORDS = frozenset(s.value for s in Signal)


class Chunks(tuple):
    """A set of q/k/v `Signal`s in timm's order (what a copy mode borrows, an `AttentionIO` captures), built
    from signals or the config's letters (``"qk"``) and printed as its letters, as run records say it."""

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
