"""A converted student's quality without a classifier, as `attnxfer convert` measures it at each stage.

- Final-feature agreement with the teacher (`attnxfer.analysis.features`): mean cosine and relative error of
  the final tokens, prefix and patch tokens apart, over the validation split (no label read).
- Where the validation split has labels: k-NN top-1 of the teacher's and the student's embeddings
  (`attnxfer.analysis.knn`: DINO's weighted vote, ``eval.knn_k`` neighbours at ``eval.knn_temperature``), with
  Wilson intervals and the share of the teacher's top-1 the student recovers; the memory bank is
  ``eval.knn_bank_size`` training images, evenly spaced and unaugmented.

Both sum over the ranks of a joined process group, as the other measurements do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..analysis.features import feature_agreement
from ..analysis.knn import knn_comparison
from ..config import TrainConfig
from ..train.distributed import sum_over_ranks
from .loaders import build_bank_loader, data_seed


@dataclass
class QualityProbe:
    """What measures a student against ``teacher`` on ``val_loader``: its final-feature agreement, and its
    k-NN top-1 where there is a labelled ``bank`` (None: the data has no labels)."""

    teacher: nn.Module
    val_loader: Iterable
    device: torch.device
    bank: Iterable | None
    k: int
    temperature: float

    @torch.no_grad()
    def features(self, student: nn.Module) -> dict[str, float]:
        """``feat_cos_prefix``, ``feat_rel_err_prefix``, ``feat_cos_patch``, ``feat_rel_err_patch`` (groups with
        tokens only), both models in eval mode (restored after)."""
        images = (x.to(self.device) for x, *_ in self.val_loader)
        return feature_agreement(student, self.teacher, images, reduce=self._sum_over_ranks).as_dict()

    def _sum_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        summed = sum_over_ranks(sums.flatten().tolist(), self.device)
        return torch.tensor(summed, dtype=torch.float64).view_as(sums)

    def knn(self, student: nn.Module) -> dict[str, Any] | None:
        """k-NN top-1 of student and teacher (`KnnComparison.as_dict`) and the bank's size; None without
        labels."""
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
        return {**result.as_dict(), "knn_bank": _size(self.bank)}

    def _sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.tensor(sum_over_ranks(counts.tolist(), self.device)).round().long()


def quality_probe(
    cfg: TrainConfig, teacher: nn.Module, val_loader: Any, device: torch.device, labelled: bool
) -> QualityProbe:
    """The probe of a conversion: its val split, and its k-NN bank where the data has labels."""
    bank = None
    if labelled:
        bank = build_bank_loader(
            cfg.data, val_loader.dataset, seed=data_seed(cfg), size=cfg.eval.knn_bank_size
        )
    return QualityProbe(teacher, val_loader, device, bank, cfg.eval.knn_k, cfg.eval.knn_temperature)


def _size(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except TypeError:
        return None
