"""A converted student's quality without a classifier, at each stage: final-feature agreement with the
teacher (no label read) and, where the data has labels, k-NN top-1 against the teacher's. Both sum over ranks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...analysis.features import feature_agreement
from ...analysis.knn import knn_comparison
from ...train.distributed import sum_over_ranks
from ..run.loaders import dataset_size


@dataclass
class QualityProbe:
    """Measures a student against ``teacher`` on ``val_loader`` (k-NN where there is a labelled ``bank``)."""

    teacher: nn.Module
    val_loader: Iterable
    device: torch.device
    bank: Iterable | None
    k: int
    temperature: float

    @torch.no_grad()
    def features(self, student: nn.Module) -> dict[str, float]:
        """``feat_cos_prefix``, ``feat_rel_err_prefix``, ``feat_cos_patch``, ``feat_rel_err_patch``."""
        images = (x.to(self.device) for x, *_ in self.val_loader)
        return feature_agreement(student, self.teacher, images, reduce=self._sum_over_ranks).as_dict()

    def _sum_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        summed = sum_over_ranks(sums.flatten().tolist(), self.device)
        return torch.tensor(summed, dtype=torch.float64).view_as(sums)

    def knn(self, student: nn.Module) -> dict[str, Any] | None:
        """k-NN top-1 of student and teacher and the bank's size; None without labels."""
        if self.bank is None:
            return None
        result = knn_comparison(
            student,
            self.teacher,
            self.bank,
            self.val_loader,
            self.device,
            k=self.k,
            temperature=self.temperature,
            reduce=self._sum_counts,
        )
        return {**result.as_dict(), "knn_bank": dataset_size(self.bank)}

    def _sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.tensor(sum_over_ranks(counts.tolist(), self.device)).round().long()


def stage2_worse(measured: dict[str, dict[str, Any] | None], steps: int) -> dict[str, Any] | None:
    """The report's field where stage 2 left the student worse than stage 1 did, by val top-1 where scored by
    labels, else the final-feature cosine with the teacher (what label-free stage 2 trains) where k-NN top-1, if
    measured, fell too; None: not worse, or a stage not measured."""
    before, after = measured.get("after_stage1"), measured.get("after_stage2")
    if not before or not after:
        return None
    if before.get("val_top1") is not None and after.get("val_top1") is not None:
        metric, name, a, b = "val_top1", "val top-1", before["val_top1"], after["val_top1"]
        shown, digits = f"{a:.2f} -> {b:.2f}", 2
    else:
        metric, name = "feat_cos_patch", "final-feature cosine with the teacher (patch tokens)"
        a, b = before["features"].get("feat_cos_patch"), after["features"].get("feat_cos_patch")
        shown = f"{a:.4f} -> {b:.4f}" if a is not None and b is not None else ""
        digits = 4
        knn_a, knn_b = ((m.get("knn") or {}).get("knn_top1") for m in (before, after))
        if knn_a is not None and knn_b is not None:
            # features a little further from the teacher's, their neighbours as right, or as right as the
            # images tell (within stage 1's 95% interval: 2 images of 1,000 are noise): not worse
            low = (before.get("knn") or {}).get("knn_top1_low", knn_a)
            if round(knn_b, 2) >= round(min(knn_a, low), 2):
                return None
            shown += f"; k-NN top-1 {knn_a:.2f} -> {knn_b:.2f}"
    # worse by what the report shows: a fall below its last printed digit is noise, not a warning
    if a is None or b is None or round(b, digits) >= round(a, digits):
        return None
    return {
        "metric": metric,
        "after_stage1": a,
        "after_stage2": b,
        "steps": steps,
        "message": (
            f"stage 2 made the student worse than stage 1 left it: {name} {shown} (after stage 1 -> after "
            f"stage 2, {steps} step{'s' if steps != 1 else ''}); train stage 2 longer (schedule.epochs, "
            "schedule.max_steps) or with a lower learning rate (optim.lr; optim.blr where optim.lr is null)"
        ),
    }


def stage1_worse(agreement: list[dict[str, Any]], steps: int) -> dict[str, Any] | None:
    """The report's field where stage 1 left a layer further from the teacher's map, on the teacher's hidden
    inputs (what it fits), than the weights swapped in were; None: no layer worse, or stage 1 not measured.
    A rise within the report's four printed digits is noise, not a warning."""
    worse = [
        row
        for row in agreement
        if row.get("before_stage1") is not None
        and row.get("after_stage1") is not None
        and float(f"{row['after_stage1']:.4g}") > float(f"{row['before_stage1']:.4g}")
    ]
    if not worse:
        return None
    shown = ", ".join(
        f"block {r['layer']} {r['metric']} {r['before_stage1']:.4g} -> {r['after_stage1']:.4g}" for r in worse
    )
    return {
        "layers": [r["layer"] for r in worse],
        "steps": steps,
        "message": (
            f"stage 1 left {len(worse)} of {len(agreement)} blocks further from the teacher's maps than the "
            f"weights swapped in ({shown}; on the teacher's hidden inputs, after {steps} "
            f"step{'s' if steps != 1 else ''}); fit them with a lower learning rate (convert.stage1_lr) or "
            "longer (convert.stage1_steps)"
        ),
    }
