"""How sure a top-1 is: its 95 % interval as a binomial proportion."""

from __future__ import annotations


def top1_interval(
    correct: int, total: int, confidence: float = 0.95, method: str = "wilson"
) -> tuple[float, float]:
    """The ``confidence`` interval of a top-1 of ``correct``/``total``, in percent (``method``: ``wilson``
    or ``exact``, Clopper–Pearson)."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"top1_interval: need 0 <= correct <= total and total > 0, got {correct}/{total}")
    # scipy loads here, not at import: every run imports this module (through the model card's)
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method=method)
    return 100.0 * ci.low, 100.0 * ci.high


def correct_count(top1_percent: float, total: int) -> int:
    """The number of right answers behind a top-1 (percent) on ``total`` images."""
    return round(top1_percent * total / 100.0)
