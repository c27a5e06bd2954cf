"""One call's instructions to an attention layer and what it hands back: `AttentionIO`, `StopForward`,
`attention_io` (attach one for a block of code).

`TransferableAttention.transfer_forward` honours them once for every attention (softmax, the adapters of timm's
classes, the zoo): capture q/k/v (and the logit bias), replace them (attention copy), return the map or the
rows' log-sum-exp, stop the model's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..handover import Chunks, Signal
from .bias_rows import BiasRows


@dataclass
class AttentionIO:
    """Instructions for one call of a `TransferableAttention`, and what it hands back.

    Overrides are (B, H, N, d) tensors in the layer's head layout. After the call, ``captured``
    holds the layer's own q/k/v (only those requested in ``capture``), ``map`` the layer's
    attention map if ``return_map`` was set, and ``lse`` the rows' log-sum-exp of its logits, with a
    gradient, if ``return_lse`` was set (softmax layers: what the distillation loss takes from the
    student's own attention kernel).
    """

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    #: With both ``q`` and ``k`` given, the logits are borrowed whole: ``bias`` is the additive logit bias
    #: that goes with them (a teacher's captured ``"bias"``; None: no bias), in place of the layer's own.
    bias: torch.Tensor | BiasRows | None = None
    #: the `Signal`s to capture (`Chunks`: q, k, v; ``Signal.MAPS`` is q and k; the config's letters work
    #: too). Capturing q and k also captures the layer's logit bias, if any, as ``"bias"``: a `BiasRows`
    #: (``logit_bias_rows``), and the call's ``attn_mask``, if any, as ``"mask"``
    capture: Chunks | Iterable[Signal] | Signal | str = ()
    return_map: bool = False
    return_lse: bool = False
    #: Raise `StopForward` right after capturing: the caller wanted nothing more of this forward pass.
    stop: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    map: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.capture = Chunks(self.capture)

    def override(self, name: Signal | str) -> torch.Tensor | None:
        return getattr(self, str(name))


class StopForward(Exception):
    """Raised by an attention whose `AttentionIO` has ``stop`` set, once it has captured what it gives:
    a caller running a model's own forward (the teacher in `TeacherStudent`) catches it and skips the rest."""


@contextlib.contextmanager
def attention_io(attn: nn.Module, io: AttentionIO | None) -> Iterator[AttentionIO | None]:
    """Attach ``io`` to ``attn`` for the duration of the block; always detaches."""
    attn.io = io
    try:
        yield io
    finally:
        attn.io = None
