"""Run metrics: ``metrics.jsonl`` (one JSON line per record) and the trackers' scalars, ``summary.csv`` (one
row per epoch, timm's convention), and pictures (PNG and each tracker).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from ..checkpoints.atomic_io import atomic_write_text
from ..checkpoints.store import set_aside
from ..run_layout import METRICS, PICTURES_DIR, TENSORBOARD_DIR, eval_scores
from ..speak import warn
from .trackers import TRACKERS_JSON, TrackerSet

#: the per-epoch table beside the checkpoints, as timm's train.py writes it
SUMMARY_CSV = "summary.csv"


class MetricsLogger:
    """Appends ``{"split", "step", "epoch", "time", ...metrics}`` records, rank 0 only, from the first record
    on (a failed start leaves no files); after a resume every step still appears once (`truncate_after`)."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        *,
        trackers: Sequence[str] = ("tensorboard",),
        project: str = "attnxfer",
        hparams: Mapping[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        # rank 0 only: other ranks never import or start a tracker
        self.trackers = TrackerSet(
            self.run_dir, trackers if enabled else [], project=project, hparams=hparams
        )

    def set_aside_records(self) -> None:
        """Keep an earlier attempt's ``metrics.jsonl``, ``summary.csv``, TensorBoard events (``tb/``),
        ``pictures/``, tracker run ids (``trackers.json``) and `attnxfer eval`'s scores (``eval-<step>.json``)
        as ``<name>.replaced-<time>``, said in one line each: ``checkpoint.resume=none`` starts over and sets its
        checkpoints aside, not its history. Left in place, the new events would mix with the old in
        TensorBoard, its trackers would continue the earlier W&B / MLflow run, the earlier pictures would be
        deleted and the earlier scores would read as those of the new checkpoints of their steps."""
        records = (
            self.path,
            self.run_dir / SUMMARY_CSV,
            self.run_dir / TRACKERS_JSON,
            *eval_scores(self.run_dir),
        )
        folders = (self.run_dir / TENSORBOARD_DIR, self.run_dir / PICTURES_DIR)
        for path in (*records, *folders) if self.enabled else ():
            if (path.is_file() and path.stat().st_size) or (path.is_dir() and any(path.iterdir())):
                warn(
                    f"checkpoint.resume=none: kept the earlier attempt's {path.name} as {set_aside(path, 'replaced')}"
                )

    def truncate_after(self, step: int, scored: bool = True) -> None:
        """Forget records of steps after ``step`` (they are about to be trained again), and the evaluation of
        ``step`` itself where its checkpoint was saved before it (not ``scored``: a stop at an epoch's last
        step), which the resumed run logs again."""
        if not self.enabled:
            return
        self.trackers.purge_step = step + 1  # TensorBoard drops the events of redone steps too
        for png in (self.run_dir / PICTURES_DIR).glob("*-step" + "[0-9]" * 8 + ".png"):  # `log_image`'s
            if int(png.stem[-8:]) > step:
                png.unlink()
        if not self.path.exists():
            return

        def redone(rec: dict[str, Any]) -> bool:
            at = int(rec.get("step", 0))
            # an evaluation of `step` that an earlier attempt logged after this checkpoint was saved (and was then
            # killed before saving again): the resumed run evaluates that step again, so it would appear twice
            return at > step or (at == step and not scored and rec.get("split") != "train")

        records = list(_records(self.path))
        kept = [(line, rec) for line, rec in records if not redone(rec)]
        if len(kept) != len(self.path.read_text().splitlines()):
            atomic_write_text(self.path, "".join(line + "\n" for line, _ in kept))
        if any(redone(rec) and int(rec.get("step", 0)) == step for _, rec in records):
            # TensorBoard drops events by step, not by name: drop all of `step`'s, then log its training
            # record again
            self.trackers.purge_step = step
            for _, rec in kept:
                if int(rec.get("step", 0)) == step:
                    values = {k: v for k, v in rec.items() if k not in ("split", "step", "time", "epoch")}
                    self.trackers.log(rec["split"], step, values)

    def log(self, split: str, step: int, metrics: Mapping[str, float], epoch: float | None = None) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"split": split, "step": int(step), "time": round(time.time(), 3)}
        if epoch is not None:
            record["epoch"] = round(float(epoch), 4)
        for k, v in metrics.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
        self.trackers.log(split, step, metrics)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        """Row ``epoch`` (0-based, timm's numbering) of ``summary.csv``, replacing those of this epoch and later
        (a resumed run that redoes an epoch leaves no duplicate)."""
        if not self.enabled:
            return
        rows = [r for r in read_summary(self.run_dir) if int(r["epoch"]) < epoch]
        self._write_summary([*rows, {"epoch": int(epoch), **{k: float(v) for k, v in row.items()}}])

    def truncate_summary(self, first_epoch: int) -> None:
        """Drop ``summary.csv`` rows of epochs ``first_epoch`` and later (a resume will train them again)."""
        if not self.enabled or not (self.run_dir / SUMMARY_CSV).exists():
            return
        rows = read_summary(self.run_dir)
        kept = [r for r in rows if int(r["epoch"]) < first_epoch]
        if len(kept) != len(rows):
            self._write_summary(kept)

    def _write_summary(self, rows: list[dict[str, Any]]) -> None:
        fields = dict.fromkeys(k for r in rows for k in r)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(fields) or ["epoch"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        # atomic: a killed run leaves the old table or the new one
        atomic_write_text(self.run_dir / SUMMARY_CSV, buf.getvalue())

    def log_image(self, tag: str, step: int, image) -> Path | None:
        """A picture, (C, H, W) floats in [0, 1] or (H, W, 3) uint8, as ``pictures/<tag>-step<N>.png`` and to
        each tracker."""
        if not self.enabled:
            return None
        image = torch.as_tensor(image).detach().cpu()
        if image.dtype == torch.uint8:
            image = image.permute(2, 0, 1).float() / 255
        image = image.float().clamp(0, 1)
        path = self.path.parent / PICTURES_DIR / f"{tag.replace('/', '-')}-step{int(step):08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(image, str(path))
        self.trackers.log_image(tag, step, image.mul(255).round().byte().permute(1, 2, 0).numpy())
        return path

    def close(self) -> None:
        self.trackers.finish()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    return [rec for _, rec in _records(Path(run_dir) / METRICS) if split is None or rec.get("split") == split]


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) of each line of a ``metrics.jsonl``, skipping a torn last line from a killed run."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        yield line, rec


def read_summary(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``summary.csv`` (``epoch`` as int, the rest as float; blank cells skipped)."""
    path = Path(run_dir) / SUMMARY_CSV
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [
            {k: int(v) if k == "epoch" else float(v) for k, v in r.items() if v not in ("", None)}
            for r in csv.DictReader(f)
        ]
