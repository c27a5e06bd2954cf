"""One call's instructions to an attention layer and what it hands back, honoured once for every attention
by `TransferableAttention.transfer_forward`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import InputError
from ..handover import Chunks, Signal
from .bias_rows import BiasRows


@dataclass
class AttentionIO:
    """Instructions for one call of a `TransferableAttention` (overrides in the layer's (B, H, N, d) head
    layout), and what it hands back: ``captured``, ``map``, ``lse`` (with a gradient, softmax layers)."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    #: With both ``q`` and ``k`` given, the logit bias that goes with them, in place of the layer's own.
    bias: torch.Tensor | BiasRows | None = None
    #: the `Signal`s to capture; q and k also capture the logit bias and ``attn_mask``
    capture: Chunks | Iterable[Signal] | Signal | str = ()
    return_map: bool = False
    #: hand out ``lse``, of a call without an attention mask or logit bias (else it stays None)
    return_lse: bool = False
    #: Raise `StopForward` right after capturing.
    stop: bool = False
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    map: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.capture = Chunks(self.capture)

    def override(self, name: Signal | str) -> torch.Tensor | None:
        return getattr(self, str(name))


class StopForward(Exception):
    """Raised once a layer whose `AttentionIO` has ``stop`` has captured: the caller skips the rest."""


@contextlib.contextmanager
def attention_io(attn: nn.Module, io: AttentionIO | None) -> Iterator[AttentionIO | None]:
    # one io a layer: an inner one (a pair's forward inside capture_attention) would replace the outer's, so
    # the outer captured nothing there, and then leave the layer without any for the rest of the outer block
    if io is not None and getattr(attn, "io", None) is not None:
        raise InputError(
            "this attention layer already runs with an AttentionIO: capture_attention, attention_maps and a "
            "TeacherStudent's forward each take over the layers they read, and do not nest on one model; run "
            "them one after the other"
        )
    attn.io = io
    try:
        yield io
    finally:
        attn.io = None
