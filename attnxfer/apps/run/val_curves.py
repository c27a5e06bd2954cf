"""Validation curves of runs from their metrics.jsonl, on axes the caller owns (the demo's, a study's)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...train.metrics import read_metrics

#: a curve: (steps, values)
Series = tuple[list[int], list[float]]


def val_series(run_dir: str | Path, metric: str = "val_top1") -> Series:
    """The run's ``metric`` at each evaluation it logged (val rows that hold it), in logged order."""
    rows = [r for r in read_metrics(run_dir, "val") if metric in r]
    return [r["step"] for r in rows], [r[metric] for r in rows]


def draw_val_curves(ax: Any, series: Mapping[str, Series]) -> dict[str, Series]:
    """One line with markers per run that logged something (labelled by its key) on ``ax``; returns what
    was drawn."""
    drawn = {label: s for label, s in series.items() if s[0]}
    for label, (steps, values) in drawn.items():
        ax.plot(steps, values, marker="o", label=label)
    return drawn
