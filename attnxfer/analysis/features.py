"""Final-feature agreement of a student with its teacher, prefix and patch tokens apart: quality that needs no
labels. Relative error is ||S - T|| / ||T|| over all of a group's tokens at once (a per-token ratio would be
ruled by near-zero-norm tokens); both metrics are sums over images, so shards and ranks add up to one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..transfer.feature_loss import final_tokens, num_prefix_tokens
from .knn import Autocast, evaluating, param_dtype

#: the token groups, in the order of `feature_sums`'s rows
TOKEN_GROUPS = ("prefix", "patch")
_COLUMNS = 4  # per group: sum of cosines, tokens, sum of squared errors, sum of squared teacher norms


def feature_sums(student: torch.Tensor, teacher: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(2, 4) float64 sums over the batch's final tokens (B, N, C), one row per `TOKEN_GROUPS` entry:
    Σ cos(s, t), the number of tokens, Σ ||s - t||², Σ ||t||²."""
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(
            f"feature agreement needs final tokens of one shape (B, N, C); the student's are "
            f"{tuple(student.shape)}, the teacher's {tuple(teacher.shape)}"
        )
    s, t = student.double(), teacher.double()
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
    err = (s - t).pow(2).sum(-1)
    ref = t.pow(2).sum(-1)
    rows = []
    for part in (slice(0, num_prefix), slice(num_prefix, None)):
        n = cos[:, part].numel()
        rows.append(
            torch.stack([cos[:, part].sum(), cos.new_tensor(n), err[:, part].sum(), ref[:, part].sum()])
        )
    return torch.stack(rows)


@dataclass(frozen=True)
class GroupAgreement:
    """One token group's agreement over ``tokens`` tokens."""

    cosine: float
    relative_error: float
    tokens: int


@dataclass(frozen=True)
class FeatureAgreement:
    """Agreement of the prefix tokens and of the patch tokens (None for a group with no tokens)."""

    prefix: GroupAgreement | None
    patch: GroupAgreement | None

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> FeatureAgreement:
        """From `feature_sums` added over batches (and ranks)."""
        groups = []
        for cos_sum, n, err, ref in sums.double().tolist():
            if n <= 0:
                groups.append(None)
                continue
            rel = (err / ref) ** 0.5 if ref > 0 else float("inf")
            groups.append(GroupAgreement(cos_sum / n, rel, int(n)))
        return cls(*groups)

    def as_dict(self, prefix: str = "feat_") -> dict[str, float]:
        """Flat metrics: ``feat_cos_prefix``, ``feat_rel_err_prefix``, ... (groups with tokens only)."""
        out: dict[str, float] = {}
        for name, group in zip(TOKEN_GROUPS, (self.prefix, self.patch), strict=True):
            if group is not None:
                out[f"{prefix}cos_{name}"] = group.cosine
                out[f"{prefix}rel_err_{name}"] = group.relative_error
        return out


@torch.no_grad()
def feature_agreement(
    student: nn.Module,
    teacher: nn.Module,
    images: Iterable[torch.Tensor],
    autocast: Autocast = nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FeatureAgreement:
    """Final-feature agreement over batches of ``images`` (eval mode, restored after); ``reduce`` sums the
    `feature_sums` over the ranks of a process group before they become means."""
    prefix = num_prefix_tokens(teacher)
    if num_prefix_tokens(student) != prefix:
        raise ValueError(
            f"the student has {num_prefix_tokens(student)} prefix tokens, the teacher {prefix}: feature "
            "agreement compares a student with the teacher whose tokens it mirrors"
        )
    device = next(student.parameters()).device
    total = torch.zeros(len(TOKEN_GROUPS), _COLUMNS, dtype=torch.float64, device=device)
    with evaluating(student, teacher):
        for x in images:  # each model's own ``forward_features``, compared in float64
            with autocast():
                s = final_tokens(student.forward_features(x), student)
                t = final_tokens(teacher.forward_features(x.to(param_dtype(teacher))), teacher)
            total += feature_sums(s.float(), t.float(), prefix)
    if reduce is not None:
        total = reduce(total)
    return FeatureAgreement.from_sums(total.cpu())
