"""How sure an accuracy is: on the demo's 1,000 images a top-1's 95 % interval is about ±2 points, so
two runs 1 point apart are not different runs. Every report's top-1 goes through `format_top1`; models on
the same images are compared with McNemar's exact test, seeds with mean ± sample std."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from ...analysis.intervals import correct_count as correct_count, top1_interval
from ...errors import InputError


def format_top1(correct: int, total: int) -> str:
    """``85.60 [83.3, 87.6]``: top-1 (%) and its 95 % Wilson interval."""
    lo, hi = top1_interval(correct, total)
    return f"{100.0 * correct / total:.2f} [{lo:.1f}, {hi:.1f}]"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise InputError("mean_std: no values")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


@dataclass(frozen=True)
class Paired:
    """Two models on the same images: how many only A / only B got right, and McNemar's exact p-value."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> Paired:
    """McNemar's exact test: under "A and B are equally accurate" each image that exactly one of them gets
    right is a fair coin flip, so only_a ~ Binomial(discordant, 1/2) (two-sided binomtest)."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise InputError(f"mcnemar: the two models were scored on different images ({a.shape} vs {b.shape})")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return Paired(only_a, only_b, float(min(1.0, p)))


def format_p(p: float) -> str:
    return "<0.001" if p < 1e-3 else f"{p:.3f}" if not math.isnan(p) else "—"
