"""Agreement metrics between attention maps: pure functions on rows of row-stochastic maps, one value per
row, so callers build rows a chunk at a time and never hold an N×N map. Natural logs; a zero in ``q`` where
``p`` has mass is floored at the dtype's smallest normal, as the map losses do, so KL stays finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_j p_j log p_j per row."""
    return -torch.special.xlogy(p, p).sum(-1)


def row_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_j p_j log(p_j / q_j) per row (q floored at the dtype's tiny): the ratio makes equal rows
    exactly 0, where H(p,q) − H(p) left the two logs' rounding (~1e-7 in fp32, CPU-dependent)."""
    return torch.special.xlogy(p, p / q.clamp_min(torch.finfo(q.dtype).tiny)).sum(-1).clamp_min(0)


def row_kl_floor(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The least `row_kl` (p ‖ q') of any row q' that is 0 where ``q`` is (outside a window): p's mass on those
    keys at log(p / tiny) each, plus m log m for the mass m on the rest (q' ∝ p there)."""
    zero = q <= torch.finfo(q.dtype).tiny
    kept = (p * ~zero).sum(-1)
    return row_kl(p * zero, q) + torch.special.xlogy(kept, kept)


def row_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence per row: symmetric, finite, in [0, log 2], computed as
    ½ Σ_j (p_j log(p_j / m_j) + q_j log(q_j / m_j)) in float64: H(m) − ½ (H(p) + H(q)) in fp32 cancelled
    to rounding (~1e-7), many times a close pair's JS (a floor or a good student is often below 1e-6)."""
    p64, q64 = p.double(), q.double()
    m = (0.5 * (p64 + q64)).clamp_min(torch.finfo(torch.float64).tiny)  # a key both give 0: 0, not 0/0
    js = 0.5 * (torch.special.xlogy(p64, p64 / m) + torch.special.xlogy(q64, q64 / m)).sum(-1)
    return js.clamp_min(0).to(p.dtype)


def topk_overlap(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(p) ∩ top-k(q)| / k per row: do both rows put their largest weights on the same keys?"""
    k = min(int(k), p.shape[-1])
    if k < 1:
        raise ValueError(f"top-k overlap needs k >= 1, got {k}")
    in_p = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, p.topk(k, dim=-1).indices, True)
    in_q = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, q.topk(k, dim=-1).indices, True)
    return (in_p & in_q).sum(-1).to(p.dtype) / k


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per row; NaN where a row is constant (no ranking to compare)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp_min(1e-30), torch.nan)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis, ties averaged: torch's ordinal ranks, scipy's for tied rows."""
    order = x.argsort(-1)
    ranks = torch.empty_like(x).scatter_(
        -1, order, torch.arange(1, x.shape[-1] + 1, dtype=x.dtype).expand_as(x)
    )
    tied = (x.gather(-1, order).diff(dim=-1) == 0).any(-1)
    if tied.any():
        from scipy.stats import rankdata  # scipy loads where it is used: every run imports this module (~1 s)

        rows = x[tied].detach().cpu().double().numpy()
        ranks[tied] = torch.from_numpy(rankdata(rows, axis=-1)).to(ranks)
    return ranks


def spearman_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row (as scipy.stats.spearmanr); NaN for constant rows."""
    return pearson(_ranks(p), _ranks(q))


def renormalise(rows: torch.Tensor) -> torch.Tensor:
    """Rows divided by their sum (a row over patch keys only, say); all-zero rows stay zero."""
    total = rows.sum(-1, keepdim=True)
    return torch.where(total > 0, rows / total.clamp_min(1e-30), torch.zeros_like(rows))


def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values (a head with no rows is NaN, left out); NaN if none."""
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else math.nan


def patch_distances(
    grid: Sequence[int],
    patch_size: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(P, P) distances in pixels between patch centres of a (grid_h, grid_w) grid of (ph, pw) patches."""
    gh, gw = (int(g) for g in grid)
    ph, pw = (float(s) for s in patch_size)
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([r.flatten() * ph, c.flatten() * pw], -1).to(device=device, dtype=torch.float64)
    return torch.cdist(pos, pos).to(dtype)


def attention_distance(patch_rows: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Mean attention distance of each patch query (the ViT paper's Fig. 7), rows renormalised over patch
    keys (the class token has no position)."""
    return (renormalise(patch_rows) * distances).sum(-1)


def attention_rollout(maps: Sequence[torch.Tensor | None], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): Π_l (r I + (1 − r) Ā_l) over the head-averaged maps; a
    layer without a map (None) passes tokens through."""
    out = None
    for m in maps:
        if m is None:
            continue
        a = m.mean(1) if m.dim() == 4 else m
        a = renormalise(a.clamp_min(0))
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = renormalise(residual * eye + (1 - residual) * a)
        out = a if out is None else a @ out
    if out is None:
        raise ValueError("attention rollout needs at least one layer with an attention map")
    return out


def head_assignment(cost: np.ndarray | torch.Tensor) -> dict:
    """The optimal (Hungarian) teacher↔student head assignment for a (teacher heads, student heads) cost:
    ``pairs``, ``matched_cost``, ``identity_cost`` (with head groups, cost[h, h // g]) and ``tracks`` (per
    student head, the teacher heads whose closest student head it is)."""
    cost = np.asarray(cost.cpu() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"head assignment needs a (teacher heads, student heads) matrix, got {cost.shape}")
    from scipy.optimize import linear_sum_assignment  # as in _ranks: not at import

    ht, hs = cost.shape
    rows, cols = linear_sum_assignment(cost)
    if ht % hs == 0:  # head groups of g = ht / hs (g = 1: the diagonal)
        identity = float(np.mean([cost[a, a // (ht // hs)] for a in range(ht)]))
    else:
        identity = math.nan
    nearest = cost.argmin(1)
    return {
        "pairs": [[int(r), int(c)] for r, c in zip(rows, cols)],
        "matched_cost": float(cost[rows, cols].mean()),
        "identity_cost": identity,
        "is_identity": bool(ht == hs and np.array_equal(rows, cols)),
        "tracks": {int(b): [int(a) for a in np.flatnonzero(nearest == b)] for b in range(hs)},
    }


def row_squared_error(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_j (p_j − q_j)² per row: the comparison for signed maps (rows may go negative, so no log)."""
    return (p - q).pow(2).sum(-1)
