"""The learning-rate schedule of the engine and stage 1."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warmup, step k of ``warmup`` at base (k+1)/warmup (the first step learns; MAE's is at 0), then
    a half-cycle cosine from base to ``minimum`` over the rest."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
