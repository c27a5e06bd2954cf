"""Exponential moving average of the student (never the teacher).

Parameters are averaged by identity, not through ``state_dict()``: a copied
layer's fused qkv is a `PartialQKV` whose ``state_dict`` entry is a fresh
concatenation, so averaging state-dict tensors would update a temporary. The
name-matched lists are built once (not sorted again every step), and the update
is one fused lerp: no host sync.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn as nn

__all__ = ["StudentEMA"]


class _Pairs(NamedTuple):
    ema_params: list[torch.Tensor]
    params: list[torch.Tensor]
    ema_buffers: list[torch.Tensor]
    buffers: list[torch.Tensor]


class StudentEMA:
    """EMA weights of a student: ``ema = decay·ema + (1 − decay)·student`` after each optimiser step."""

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(student).eval().requires_grad_(False)
        self._cached: tuple[nn.Module, _Pairs] | None = None

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        pairs = self._pairs(student)
        torch._foreach_lerp_(pairs.ema_params, pairs.params, 1.0 - self.decay)
        for e, b in zip(pairs.ema_buffers, pairs.buffers):
            e.copy_(b)

    def _pairs(self, student: nn.Module) -> _Pairs:
        """The EMA's parameters and buffers beside the student's, matched by name once per student."""
        if self._cached is None or self._cached[0] is not student:
            ema_p = [p for _, p in sorted(self.module.named_parameters())]
            ema_b = [b for _, b in sorted(self.module.named_buffers())]
            new_p = [p for _, p in sorted(student.named_parameters())]  # read under no_grad
            new_b = [b for _, b in sorted(student.named_buffers())]
            self._cached = (student, _Pairs(ema_p, new_p, ema_b, new_b))
        return self._cached[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
