"""k-NN top-1 of a model's embeddings: how well an encoder's features separate classes, with no head.
The rule is DINO's weighted k-NN (Caron et al. 2021: k = 20, T = 0.07) on the pooled feature its head would
see, so one rule serves every timm family; a teacher and student are scored on the same images and their
paired counts give the share of the teacher's top-1 the student recovers, with a paired bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .intervals import top1_interval

Autocast = Callable[[], AbstractContextManager]


@torch.no_grad()
def embed(
    models: Sequence[nn.Module],
    batches: Iterable[Sequence[torch.Tensor]],
    device: torch.device | str,
    *,
    autocast: Autocast = nullcontext,
    limit: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """L2-normalised embeddings (N, D) of every model over labelled ``(x, y)`` batches, one pass for all
    models, and the labels (N,); ``limit``: stop after that many images."""
    feats: list[list[torch.Tensor]] = [[] for _ in models]
    labels: list[torch.Tensor] = []
    seen = 0
    with evaluating(*models):
        for x, y, *_ in batches:
            if limit is not None and seen >= limit:
                break
            x = x.to(device, non_blocking=True)
            with autocast():
                for out, m in zip(feats, models, strict=True):
                    # the pooled feature its head would see (the class token or the patch average), as float32
                    pooled = m.forward_head(m.forward_features(x.to(param_dtype(m))), pre_logits=True).float()
                    out.append(F.normalize(pooled, dim=-1).cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            seen += len(x)
    cut = slice(0, limit)
    return [torch.cat(f)[cut] if f else torch.empty(0, 0) for f in feats], (
        torch.cat(labels)[cut] if labels else torch.empty(0, dtype=torch.long)
    )


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode for the duration, each back in its own mode afterwards."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, was, strict=True):
            m.train(mode)


def param_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return torch.float32 if p is None else p.dtype


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels (Q,) of L2-normalised ``queries`` by the weighted vote of their ``min(k, M)`` nearest
    ``bank`` entries; ``chunk`` queries at a time bound the (chunk, M) similarity block."""
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"k-NN needs (M, D) and (Q, D) embeddings, got {tuple(bank.shape)}, {tuple(queries.shape)}"
        )
    if len(bank) == 0 or len(bank) != len(bank_labels):
        raise ValueError(
            f"k-NN needs a non-empty bank with one label per entry ({len(bank)}, {len(bank_labels)})"
        )
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got {k}, {temperature}")
    classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(bank))
    bank_labels = bank_labels.to(bank.device)
    predictions = []
    for start in range(0, len(queries), chunk):
        sims, idx = (queries[start : start + chunk] @ bank.T).topk(k, dim=1)
        votes = sims.new_zeros(len(sims), classes)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_correct(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """One bool per query: is its k-NN prediction its label?"""
    if len(queries) == 0:  # a rank whose shard of the val set is empty
        return torch.zeros(0, dtype=torch.bool)
    classes = int(max(bank_labels.max(), labels.max() if len(labels) else 0)) + 1
    pred = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=classes)
    return pred.cpu() == labels.cpu()


def paired_counts(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(4,) counts of both right, only the teacher, only the student, neither (they add over ranks)."""
    t, s = teacher.bool(), student.bool()
    return torch.stack([(t & s).sum(), (t & ~s).sum(), (~t & s).sum(), (~t & ~s).sum()]).long()


@dataclass(frozen=True)
class KnnComparison:
    """k-NN top-1 of a student and its teacher on the same images, from `paired_counts`. A student scored
    alone: ``teacher=False`` and the counts of the student paired with itself."""

    both: int
    teacher_only: int
    student_only: int
    neither: int
    k: int
    temperature: float
    teacher: bool = True

    @classmethod
    def from_counts(
        cls, counts: Sequence[int] | torch.Tensor, k: int, temperature: float, teacher: bool = True
    ):
        # counts: both right, only the teacher, only the student, neither
        return cls(*(int(c) for c in counts), k, temperature, teacher)

    @property
    def count(self) -> int:
        return self.both + self.teacher_only + self.student_only + self.neither

    @property
    def student_correct(self) -> int:
        return self.both + self.student_only

    @property
    def teacher_correct(self) -> int:
        return self.both + self.teacher_only

    @property
    def share(self) -> float | None:
        """Student top-1 / teacher top-1 (None without a teacher, or when the teacher gets none right)."""
        return self.student_correct / self.teacher_correct if self.teacher and self.teacher_correct else None

    def share_interval(
        self, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
    ) -> tuple[float, float]:
        """A percentile bootstrap interval of `share`, resampling images with their paired outcomes (the two
        top-1s are correlated: one interval from the two Wilson intervals would be far too wide)."""
        if self.share is None:
            raise ValueError("no share without a teacher that gets some images right")
        counts = np.array([self.both, self.teacher_only, self.student_only, self.neither], dtype=float)
        draws = np.random.default_rng(seed).multinomial(self.count, counts / self.count, size=resamples)
        teacher = draws[:, 0] + draws[:, 1]
        ratios = (draws[:, 0] + draws[:, 2])[teacher > 0] / teacher[teacher > 0]
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile(ratios, [tail, 100 - tail])
        return float(low), float(high)

    def as_dict(self) -> dict[str, float]:
        """Flat metrics: ``knn_top1`` (the student's, %), ``knn_teacher_top1``, ``knn_share``, each with its
        interval (``_low``/``_high``), and ``knn_count``, ``knn_k``, ``knn_temperature``."""
        n = self.count
        out: dict[str, float] = {"knn_count": n, "knn_k": self.k, "knn_temperature": self.temperature}
        if n == 0:
            return out
        out["knn_top1"] = 100.0 * self.student_correct / n
        out["knn_top1_low"], out["knn_top1_high"] = top1_interval(self.student_correct, n)
        if self.teacher:
            out["knn_teacher_top1"] = 100.0 * self.teacher_correct / n
            out["knn_teacher_top1_low"], out["knn_teacher_top1_high"] = top1_interval(self.teacher_correct, n)
            if self.share is not None:
                out["knn_share"] = self.share
                out["knn_share_low"], out["knn_share_high"] = self.share_interval()
        return out


def knn_hits(
    models: Sequence[nn.Module],
    bank: Iterable[Sequence[torch.Tensor]],
    queries: Iterable[Sequence[torch.Tensor]],
    device: torch.device | str,
    *,
    k: int = 20,
    temperature: float = 0.07,
    autocast: Autocast = nullcontext,
) -> tuple[list[torch.Tensor], int]:
    """Per model, one bool per query image: is its k-NN prediction (own memory bank) its label? And the k
    used: ``k``, or the bank's size where it holds fewer images."""
    banks, bank_labels = embed(models, bank, device, autocast=autocast)
    feats, labels = embed(models, queries, device, autocast=autocast)
    hits = [
        knn_correct(b.to(device), bank_labels, q.to(device), labels, k=k, temperature=temperature)
        for b, q in zip(banks, feats, strict=True)
    ]
    return hits, min(k, len(bank_labels))


def knn_comparison(
    student: nn.Module,
    teacher: nn.Module | None,
    bank: Iterable[Sequence[torch.Tensor]],
    queries: Iterable[Sequence[torch.Tensor]],
    device: torch.device | str,
    *,
    k: int = 20,
    temperature: float = 0.07,
    autocast: Autocast = nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> KnnComparison:
    """k-NN top-1 of ``student`` (and ``teacher``): ``bank`` the memory, ``queries`` scored; ``reduce`` sums
    the paired counts over ranks (each holding the whole bank and its own shard of the queries)."""
    models = [student] if teacher is None else [student, teacher]
    right, k = knn_hits(models, bank, queries, device, k=k, temperature=temperature, autocast=autocast)
    counts = paired_counts(right[-1], right[0])  # (teacher, student); a student alone pairs with itself
    if reduce is not None:
        counts = reduce(counts.to(device)).cpu()
    return KnnComparison.from_counts(counts, k, temperature, teacher=teacher is not None)
