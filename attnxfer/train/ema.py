"""Exponential moving average of the student (never the teacher), through timm's `ModelEmaV3`.

``exclude_buffers=True`` averages parameters by identity: the default path averages ``state_dict()`` values,
and a copied layer's `PartialQKV` entry is a fresh concatenation, so its EMA would never move.
``stochastic_rounding`` is off (students train in fp32; its generator is not in checkpoints); no step is
passed, so the decay is constant, as in the paper's recipes. One ``torch._foreach_lerp_``: checkpoints and
bit-identical resume are those of the hand-written EMA it replaced (`tests/training/test_ema.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.utils.model_ema import ModelEmaV3

from ..errors import InputError


class StudentEMA:
    """EMA weights of a student (``module``, with the student's parameter names) after each optimiser step."""

    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise InputError(f"ema.decay must be in (0, 1), got {decay}")
        self._ema = ModelEmaV3(student, decay=decay, exclude_buffers=True, stochastic_rounding=False)
        self.module = self._ema.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        self._ema.update(student)  # no step: constant decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
