"""A hybrid student under a speed budget: per block softmax or one candidate attention (no I/O, no config).

Block l keeps softmax or takes candidate c at sensitivity s[l][c], saving ``softmax_ms - ms[c]``; a speedup S
needs savings of ``teacher_ms * (1 - 1/S)``. This multiple-choice knapsack is solved exactly by dynamic
programming on the saving cut into `RESOLUTION` units, each option rounded *down*, so every accepted
assignment meets the budget in real time too; of equally sensitive assignments it takes the fastest (the tests
check both against every assignment).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SOFTMAX = "softmax"
#: units the required saving is cut into: fine enough that rounding each option down costs < 0.05 % of it
#: per block, coarse enough that the program (blocks x options x units) runs in under a second (24 blocks, 6 options)
RESOLUTION = 4000


class InfeasibleBudget(ValueError):
    """Even the fastest candidate in every block misses the budget; ``fastest`` is that student."""

    def __init__(self, speedup: float, fastest: Assignment) -> None:
        super().__init__(
            f"speedup {speedup:g} cannot be met: the fastest student is {beside(fastest.speedup, speedup)}"
        )
        self.speedup, self.fastest = speedup, fastest

    def __reduce__(self) -> tuple[type, tuple[float, Assignment]]:
        # rebuilt from its fields, not its message: a submitted job's error travels back pickled
        return type(self), (self.speedup, self.fastest)


def beside(speedup: float, budget: float) -> str:
    """``1.25x``: ``speedup`` as printed beside ``budget`` (``:g``), with the digits that keep the comparison
    as printed the real one: ``1.998x`` short of ``2`` (not ``2.00x``), ``1.255x`` meeting ``1.2549`` (not
    ``1.25x``); ``just under 2x`` where six digits do not (a met budget's own digits always do)."""
    short, printed = speedup < budget, float(f"{budget:g}")
    for digits in range(2, 7):
        if (float(text := f"{speedup:.{digits}f}") < printed) == short:
            return f"{text}x"
    return f"{'just under' if short else 'at least'} {budget:g}x"  # at least: a budget printed as 1e+06


def short_of_budget(names: Sequence[str]) -> str:
    """Why a choice (``names``, one per block) predicted to meet its budget can measure short of it, and what
    gives a margin. The blocks' times come from whole students of one attention each: a mix is predicted from
    them, but one candidate in every block is the very student that was timed, so there only timing noise can
    tell the two measurements apart (blaming "this mix" would send the reader looking for one)."""
    if SOFTMAX not in names and len(set(names)) == 1:
        return (
            "predicted from this very student, timed before the fits: the two timings differ by timing noise (a "
            "loaded machine); rerun idle or with more convert.speed_repeats, or raise convert.speedup for a margin"
        )
    return (
        "predicted from students with one attention in every block, measured as this mix of them; for a margin, "
        "raise convert.speedup"
    )


@dataclass
class Assignment:
    """One attention per block, its summed sensitivity, and the teacher's time against its predicted time."""

    names: list[str]
    sensitivity: float
    teacher_ms: float
    predicted_ms: float

    @property
    def speedup(self) -> float:
        return self.teacher_ms / self.predicted_ms


def saving_ms(ms: Mapping[str, float], softmax_ms: float) -> dict[str, float]:
    """What each candidate saves in one block against softmax (negative: it is slower there)."""
    return {name: softmax_ms - t for name, t in ms.items()}


def assignment_of(
    names: Sequence[str],
    sensitivity: Sequence[Mapping[str, float]],
    ms: Mapping[str, float],
    softmax_ms: float,
    teacher_ms: float,
) -> Assignment:
    """``names`` (one per block) with its summed sensitivity and predicted time."""
    saved = sum(softmax_ms - ms[n] for n in names if n != SOFTMAX)
    total = sum(sensitivity[i][n] for i, n in enumerate(names) if n != SOFTMAX)
    return Assignment(list(names), total, teacher_ms, teacher_ms - saved)


def fastest(
    sensitivity: Sequence[Mapping[str, float]], ms: Mapping[str, float], softmax_ms: float, teacher_ms: float
) -> Assignment:
    """The fastest student: every block the fastest of softmax and the candidates finite there (one of
    infinite sensitivity in a block, whose fit diverged, is never chosen in it); where every candidate is finite
    everywhere, one candidate (or softmax) in every block, the student that was timed."""
    names = [
        min(
            [*(c for c in ms if math.isfinite(row[c])), SOFTMAX],
            key=lambda n: (ms.get(n, softmax_ms), n != SOFTMAX),
        )
        for row in sensitivity
    ]
    return assignment_of(names, sensitivity, ms, softmax_ms, teacher_ms)


def select(
    sensitivity: Sequence[Mapping[str, float]],
    ms: Mapping[str, float],
    softmax_ms: float,
    teacher_ms: float,
    speedup: float,
) -> Assignment:
    """The assignment of least summed sensitivity (``sensitivity[l][c]``, infinite: never chosen) whose
    predicted time is at most ``teacher_ms / speedup``; `InfeasibleBudget` where even the fastest student
    misses it."""
    if isinstance(speedup, bool) or not isinstance(speedup, int | float) or not speedup > 1:
        raise ValueError(f"speedup must be a number > 1 (2 for 2x), got {speedup!r}")
    need = teacher_ms * (1.0 - 1.0 / speedup)  # the time the swapped blocks must save
    # a candidate infinite in some blocks only may still be taken in the others: the budget is judged, and the
    # refusal names, the fastest mix the knapsack could choose, not a one-candidate student
    top = fastest(sensitivity, ms, softmax_ms, teacher_ms)
    if teacher_ms - top.predicted_ms < need:
        raise InfeasibleBudget(speedup, top)
    unit = need / RESOLUTION
    saves = saving_ms(ms, softmax_ms)
    # per block: (units saved, sensitivity, ms saved, name); an option that saves nothing is never better than
    # softmax
    options = [
        [(0, 0.0, 0.0, SOFTMAX)]
        + [
            (math.floor(saves[c] / unit), row[c], saves[c], c)
            for c in ms
            if saves[c] > 0 and math.isfinite(row[c])
        ]
        for row in sensitivity
    ]
    best = _knapsack(options, RESOLUTION)
    if best is None:  # feasible only through the rounding's last units: the fastest student meets it
        return top
    return assignment_of(best, sensitivity, ms, softmax_ms, teacher_ms)


def _knapsack(options: list[list[tuple[int, float, float, str]]], need: int) -> list[str] | None:
    """Least summed sensitivity with summed units >= ``need`` (units capped at ``need``), and of those the most
    time saved: one option a block. A near-untrained teacher ties every swap at kl 0, and a tie must not go to
    the slower candidate."""
    inf = (math.inf, 0.0)
    # cost[u]: (least sensitivity, -ms saved) reaching u units (need: >= need)
    cost = [(0.0, 0.0)] + [inf] * need
    choice: list[list[tuple[int, str]]] = []  # per block, per reached u: (previous u, option)
    for block in options:
        new, back = [inf] * (need + 1), [(-1, SOFTMAX)] * (need + 1)
        for u, (c, lost) in enumerate(cost):
            if c == math.inf:
                continue
            for units, s, saved, name in block:
                v = min(need, u + units)
                if (c + s, lost - saved) < new[v]:
                    new[v], back[v] = (c + s, lost - saved), (u, name)
        cost = new
        choice.append(back)
    if cost[need][0] == math.inf:
        return None
    names, u = [], need
    for back in reversed(choice):
        u, name = back[u]
        names.append(name)
    return names[::-1]


def reasons(
    chosen: Assignment,
    sensitivity: Sequence[Mapping[str, float]],
    ms: Mapping[str, float],
    softmax_ms: float,
    metric: str,
) -> list[str]:
    """One line per block saying why it got what it got, against the other blocks and candidates."""
    saves = saving_ms(ms, softmax_ms)
    best = [min(row, key=lambda c: (row[c], -saves[c])) for row in sensitivity]  # of a tie, the faster
    median = statistics.median(row[b] for row, b in zip(sensitivity, best))
    lines = []
    for i, (row, low, name) in enumerate(zip(sensitivity, best, chosen.names)):
        if name == SOFTMAX:
            rank = sorted((r[b] for r, b in zip(sensitivity, best)), reverse=True).index(row[low]) + 1
            # "#4 largest" of a block under the median read as one of the most sensitive: its rank of how many
            place = "largest sensitivity" if rank == 1 else f"#{rank} of {len(sensitivity)} by sensitivity"
            tied = [k for k, (r, b) in enumerate(zip(sensitivity, best)) if k != i and r[b] == row[low]]
            alike = [k for k in tied if sensitivity[k] == row and chosen.names[k] != SOFTMAX]
            blocks = lambda ks: f"block{'s' * (len(ks) > 1)} {', '.join(map(str, ks))}"
            # a tie is no block's largest alone; a block measured alike could have kept softmax instead
            if tied:
                place = f"tied with {blocks(tied)} for the {place}"
            also = f"; {blocks(alike)}, measured alike, swapped instead: same cost" if alike else ""
            lines.append(
                f"softmax: {place} ({metric} {row[low]:.3g} with its best candidate {low} vs "
                f"{median:.3g} median); the budget is met without swapping it{also}"
            )
        elif name == low:
            others = sorted((v, c) for c, v in row.items() if c != name)
            vs = f" vs {others[0][1]} {others[0][0]:.3g}" if others else ""
            if others and f"{others[0][0]:.3g}" == f"{row[name]:.3g}":  # "kl 0 vs relu 0" reads as a ranking
                vs = f", as {others[0][1]}"
            lines.append(
                f"{name}: least sensitive candidate here ({metric} {row[name]:.3g}{vs}), saves "
                f"{saves[name]:.3g} ms of {softmax_ms:.3g}"
            )
        elif f"{row[name]:.3g}" == f"{row[low]:.3g}":  # measured alike, as shown: no trade to speak of
            # never slower: of a tie the knapsack takes the faster; as fast only in the fastest student
            how = "and faster" if saves[name] > saves[low] else "and as fast"
            lines.append(
                f"{name}: as sensitive as {low} ({metric} {row[name]:.3g}) {how} (saves {saves[name]:.3g} ms "
                f"vs {saves[low]:.3g})"
            )
        else:
            lines.append(
                f"{name}: faster than the least sensitive {low} (saves {saves[name]:.3g} ms vs {saves[low]:.3g}) "
                f"at {metric} {row[name]:.3g} vs {row[low]:.3g}: the budget needs the time"
            )
    return lines
