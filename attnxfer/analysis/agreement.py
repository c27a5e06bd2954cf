"""One number for a student layer against its teacher layer, for conversion reports (`layer_agreement`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import InputError
from ..models.attention import MapKind, TransferableAttention
from ..models.attention.numerics import row_chunk, row_slices
from ..transfer.row_ce import grouped_mean
from .metrics import row_kl, row_kl_floor, row_squared_error
from .signals import LayerSignals

#: per-row agreement of teacher rows ``p`` with student rows ``a`` over ``n`` keys, by name; ``kl_floor``: the
#: least ``kl`` a student with zeros where ``a`` has them (outside a window) can reach
AGREEMENT_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "kl": lambda p, a, n: row_kl(p, a),
    "map_mse": lambda p, a, n: row_squared_error(p, a) / n,
    "kl_floor": lambda p, a, n: row_kl_floor(p, a),
}


def layer_agreement(
    t_attn: TransferableAttention,
    t_qk: Mapping[str, torch.Tensor],
    s_attn: TransferableAttention,
    s_qk: Mapping[str, torch.Tensor],
    metric: str = "kl",
) -> float:
    """One number for a student layer against its teacher layer, averaged over (batch, student head, query):
    ``kl`` (KL(P̄_t ‖ A_s), teacher head groups averaged) or ``map_mse``, built a row chunk at a time."""
    if metric not in AGREEMENT_METRICS:
        raise ValueError(
            f"layer_agreement: metric must be one of {', '.join(AGREEMENT_METRICS)}, got {metric!r}"
        )
    per_row = AGREEMENT_METRICS[metric]
    q_t, k_t, q_s, k_s = t_qk["q"], t_qk["k"], s_qk["q"], s_qk["k"]
    n = k_t.shape[-2]
    if k_s.shape[-2] != n or q_s.shape[-2] != q_t.shape[-2] or q_t.shape[1] % q_s.shape[1]:
        raise InputError(
            f"teacher and student attention shapes differ: q {tuple(q_t.shape)} vs {tuple(q_s.shape)}; "
            "the student needs the teacher's tokens, and heads that divide the teacher's"
        )
    teacher = LayerSignals("teacher", t_attn, q_t, k_t, t_qk.get("bias"))
    student = LayerSignals("student", s_attn, q_s, k_s, s_qk.get("bias"))
    step = row_chunk(q_t, n, live_tensors=4)
    total, count = 0.0, 0
    for rows in row_slices(0, q_t.shape[-2], step):
        p = grouped_mean(teacher.map_rows(rows), q_t.shape[1] // q_s.shape[1])
        a = (
            s_attn.attention_map(q_s, k_s, rows)
            if s_attn.map_kind is not MapKind.SOFTMAX
            else student.map_rows(rows)
        )
        v = per_row(p, a, n)
        total += float(v.double().sum())
        count += v.numel()
    return total / max(1, count)
