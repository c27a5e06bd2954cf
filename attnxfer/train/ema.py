"""Exponential moving average of the student (never the teacher).

Parameters are averaged by identity, not through ``state_dict()``: a copied
layer's fused qkv is a `PartialQKV` whose ``state_dict`` entry is a fresh
concatenation, so averaging state-dict tensors would update a temporary.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["StudentEMA"]


class StudentEMA:
    """EMA weights of a student: ``ema = decay·ema + (1 − decay)·student`` after each optimiser step."""

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        ema_p = [p for _, p in sorted(self.module.named_parameters())]
        new_p = [p.detach() for _, p in sorted(student.named_parameters())]
        torch._foreach_lerp_(ema_p, new_p, 1.0 - self.decay)
        for (_, e), (_, b) in zip(sorted(self.module.named_buffers()), sorted(student.named_buffers())):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
