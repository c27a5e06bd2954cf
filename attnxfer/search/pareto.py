"""Multi-objective selection, NSGA-II style (Deb et al., 2002), every objective minimised: Pareto ranks,
then within a rank the crowding distance, which prefers points in sparse regions to keep the front spread."""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in every objective and strictly better in at least one (minimising)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_ranks(points: Sequence[Point]) -> list[int]:
    """Non-dominated sorting: the rank of each point (0 = the Pareto front), Deb's O(M N²) bookkeeping."""
    n = len(points)
    dominated_by_me: list[list[int]] = [[] for _ in range(n)]
    count = [0] * n  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                dominated_by_me[i].append(j)
                count[j] += 1
            elif dominates(points[j], points[i]):
                dominated_by_me[j].append(i)
                count[i] += 1
    ranks = [0] * n
    front = [i for i in range(n) if count[i] == 0]
    rank = 0
    while front:
        following = []
        for i in front:
            ranks[i] = rank
            for j in dominated_by_me[i]:
                count[j] -= 1
                if count[j] == 0:
                    following.append(j)
        front, rank = following, rank + 1
    return ranks


def crowding_distance(points: Sequence[Point]) -> list[float]:
    """Crowding distance of each point within one front (infinity at each objective's extremes)."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: (points[i][m], i))
        low, high = points[order[0]][m], points[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for before, i, after in zip(order, order[1:-1], order[2:]):
            distance[i] += (points[after][m] - points[before][m]) / (high - low)
    return distance


def select_survivors(points: Sequence[Point], k: int) -> list[int]:
    """Indices of the ``k`` points NSGA-II keeps: whole fronts by rank, the last cut by crowding
    (largest first, ties by index: deterministic)."""
    if k >= len(points):
        return list(range(len(points)))
    ranks = pareto_ranks(points)
    chosen: list[int] = []
    for rank in range(max(ranks) + 1):
        front = [i for i in range(len(points)) if ranks[i] == rank]
        if len(chosen) + len(front) <= k:
            chosen += front
            continue
        crowd = crowding_distance([points[i] for i in front])
        by_crowding = sorted(range(len(front)), key=lambda j: (-crowd[j], front[j]))
        chosen += [front[j] for j in by_crowding[: k - len(chosen)]]
        break
    return chosen


def tournament_key(points: Sequence[Point]) -> list[tuple[int, float]]:
    """Per point, the crowded-comparison key ``(rank, -crowding)`` of binary tournaments (compare with ``<``)."""
    ranks = pareto_ranks(points)
    crowd = [0.0] * len(points)
    for rank in set(ranks):
        members = [i for i in range(len(points)) if ranks[i] == rank]
        for i, c in zip(members, crowding_distance([points[i] for i in members])):
            crowd[i] = c
    return [(r, -c) for r, c in zip(ranks, crowd)]
