"""Run metrics: one JSON line per record in ``metrics.jsonl`` plus TensorBoard scalars; pictures as PNG
files under ``pictures/`` and TensorBoard images."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

__all__ = ["MetricsLogger", "read_metrics"]


class MetricsLogger:
    """Appends ``{"split", "step", "epoch", "time", ...metrics}`` records; rank 0 only."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, split: str, step: int, metrics: Mapping[str, float], epoch: float | None = None) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"split": split, "step": int(step), "time": round(time.time(), 3)}
        if epoch is not None:
            record["epoch"] = round(float(epoch), 4)
        for k, v in metrics.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(f"{split}/{k}", v, step)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_image(self, tag: str, step: int, image: torch.Tensor) -> Path | None:
        """A (C, H, W) picture in [0, 1]: ``pictures/<tag>-step<N>.png`` and a TensorBoard image."""
        if not self.enabled:
            return None
        image = image.detach().float().clamp(0, 1).cpu()
        path = self.path.parent / "pictures" / f"{tag.replace('/', '-')}-step{int(step):08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image, str(path))
        if self._tb is not None:
            self._tb.add_image(tag, image, step)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of a run (optionally one split), skipping a torn last line from a killed run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if split is None or rec.get("split") == split:
            out.append(rec)
    return out
