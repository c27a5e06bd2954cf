"""Exponential moving average of the student (never the teacher), through timm's `ModelEmaV3`.

timm's class is used with ``exclude_buffers=True``: parameters are averaged by identity
(``module.parameters()``) and buffers copied. Its default path averages ``state_dict()`` values instead,
and a copied layer's fused qkv is a `PartialQKV` whose ``state_dict`` entry is a fresh concatenation, so
that path would update a temporary and leave the EMA's qkv at its initial value. ``stochastic_rounding``
is off: it applies only to bf16 EMA tensors (students train in fp32 under autocast) and draws from a
private generator that checkpoints do not hold. ``update`` passes no step, so the decay is constant (no
warmup), as in the paper's recipes. The update is one fused ``torch._foreach_lerp_`` with weight
``1 − decay``, the same kernel and operands as the hand-written EMA it replaces, so checkpoints and
bit-identical resume are unchanged (`tests/training/test_ema.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3

from ..errors import InputError


class StudentEMA:
    """EMA weights of a student: ``ema = decay·ema + (1 − decay)·student`` after each optimiser step.

    ``module`` is the averaged copy; ``state_dict``/``load_state_dict`` are its own (timm's parameter
    names, as the student's), which is what checkpoints and export hold.
    """

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise InputError(f"ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._ema = ModelEmaV3(student, decay=decay, exclude_buffers=True, stochastic_rounding=False)
        self.module = self._ema.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        self._ema.update(student)  # no step: constant decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
