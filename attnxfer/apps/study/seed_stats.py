"""Runs over several seeds, scored image by image (so two runs can be paired on the same images): the demo's
table with intervals and paired tests."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch

from ...checkpoints.store import CheckpointManager, atomic_write_json
from ...config import TrainConfig
from ...errors import MissingPathError
from ...train.evaluation import per_image_top1
from ...train.runtime import resolve_device, resolve_precision, teacher_dtype
from ...transfer.teacher_student import TeacherStudent
from ..run.parts import RunParts, build_run_parts
from ..run.training import plan_from_config
from ..run.uncertainty import format_p, format_top1, mcnemar, mean_std


@torch.no_grad()
def per_image_correct(cfg: TrainConfig, digest: str | None = None) -> np.ndarray:
    """One bool per validation image (in loader order): did the run's newest checkpoint get it right? Cached in
    RUN_DIR/val_correct.json under ``digest`` (the run's config digest)."""
    run_dir = Path(cfg.run_dir)
    cache = run_dir / "val_correct.json"
    if digest and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("config_digest") == digest:
            return np.array(saved["correct"], dtype=bool)
    info = CheckpointManager(run_dir).latest()
    if info is None:
        raise MissingPathError(f"{run_dir} has no checkpoint to score")
    parts = build_run_parts(cfg, quiet=True)
    tensors, _ = CheckpointManager(run_dir).load(info)
    parts.student.load_state_dict(tensors["model"])
    correct = student_correct(cfg, parts, resolve_device(cfg.device))
    if digest:
        atomic_write_json(cache, {"config_digest": digest, "correct": correct.astype(int).tolist()})
    return correct


@torch.no_grad()
def student_correct(
    cfg: TrainConfig,
    parts: RunParts,
    device: torch.device,
    *,
    said: bool = True,
    own_keys: Collection[str] | None = None,
) -> np.ndarray:
    """One bool per image of ``parts.val_loader``: is ``parts.student``'s top-1 right, scored as its run scores
    it (with the teacher where its transfer mode attends with the teacher's maps)? ``said``, ``own_keys``:
    `plan_from_config`'s."""
    precision = resolve_precision(cfg.precision, device)
    model = TeacherStudent(
        parts.teacher,
        parts.student,
        plan_from_config(cfg, parts, said=said, own_keys=own_keys),
        teacher_dtype=teacher_dtype(cfg.teacher.dtype, precision),
    ).to(device)
    return per_image_top1(model, parts.val_loader, device, lambda: precision.autocast(device)).numpy()


def results_table(runs: dict[str, list[dict]], correct: dict[str, list[np.ndarray]]) -> str:
    """One row per run: top-1 (mean ± std over seeds), each seed's 95 % Wilson interval, steps, time."""
    seeds = max(len(v) for v in runs.values())
    head = "val top-1 (%)" + (f", mean ± std over {seeds} seeds" if seeds > 1 else "")
    lines = [
        f"| run | {head} | 95 % interval{' per seed' if seeds > 1 else ''} | best val top-1 (%) | steps | time (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for label, results in runs.items():
        top1 = [r["val_top1"] for r in results]
        best = [r["best_top1"] for r in results]
        mean, std = mean_std(top1)
        shown = f"{mean:.2f} ± {std:.2f}" if len(results) > 1 else f"{mean:.2f}"
        intervals = "; ".join(
            format_top1(int(c.sum()), len(c)).split(" ", 1)[1] for c in correct.get(label, [])
        )
        lines.append(
            f"| {label} | {shown} | {intervals or '—'} | {mean_std(best)[0]:.2f} | {results[0]['steps']} | "
            f"{sum(r['seconds'] for r in results) / len(results):.0f} |"
        )
    return "\n".join(lines)


def paired_table(
    correct: dict[str, list[np.ndarray]], pairs: Sequence[tuple[str, str]], seeds: Sequence[int]
) -> str:
    """McNemar's exact test per seed for each pair (A, B) scored on the same validation images."""
    lines = [
        "| A vs B | seed | only A right | only B right | McNemar exact p |",
        "|---|---:|---:|---:|---:|",
    ]
    for a, b in pairs:
        for seed, ca, cb in zip(seeds, correct[a], correct[b], strict=False):
            t = mcnemar(ca, cb)
            lines.append(f"| {a} vs {b} | {seed} | {t.only_a} | {t.only_b} | {format_p(t.p_value)} |")
    return "\n".join(lines)
