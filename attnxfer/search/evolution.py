"""The evolutionary search over formula attentions (docs/conversion.md, "Search: discovering a formula attention"):
generation 0 is the zoo as formulas plus random ones; later ones breed by tournaments, crossover or
mutation, and NSGA-II keeps the population. Every rejection is recorded with its reason, duplicates are not
re-evaluated, and the state is plain JSON whose draws come from ``(seed, generation)``: resumable anywhere."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..models.efficient.formula import (
    HAND_DESIGNED,
    PREFIX,
    FormulaSyntaxError,
    InvalidFormula,
    check_formula,
    crossover,
    mutate,
    parse_formula,
    random_formula,
)
from ..speak import say
from .pareto import pareto_ranks, select_survivors, tournament_key

#: evaluate(attention names) -> one result record per name (status ok with kl/speed, or rejected + reason)
Evaluate = Callable[[list[str]], list[dict[str, Any]]]


@dataclass
class SearchSettings:
    population: int = 16
    offspring: int = 16
    generations: int = 12  # after generation 0
    crossover_prob: float = 0.5
    seed: int = 0
    head_dim: int = 64
    grid: tuple[int, int] | None = None
    seeds: Mapping[str, str] = field(default_factory=lambda: dict(HAND_DESIGNED))  # label -> formula:...
    max_tries: int = 50  # draws per wanted child before a generation gives up finding new ones


@dataclass
class SearchState:
    """Everything a search needs to continue: every candidate so far (by canonical formula), the population."""

    generation: int = -1  # the last finished generation (-1: none)
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    population: list[str] = field(default_factory=list)
    duplicates: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0  # the last generation's: a resume's guess at the next one's, against a budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "population": list(self.population),
            "duplicates": self.duplicates,
            "seconds": self.seconds,
            "last_seconds": self.last_seconds,
            "candidates": list(self.candidates.values()),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchState:
        return cls(
            generation=int(data["generation"]),
            candidates={c["formula"]: dict(c) for c in data["candidates"]},
            population=list(data["population"]),
            duplicates=int(data.get("duplicates", 0)),
            seconds=float(data.get("seconds", 0.0)),
            last_seconds=float(data.get("last_seconds", 0.0)),
        )

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [c for c in self.candidates.values() if c["status"] == "ok"]


def objectives(record: Mapping[str, Any]) -> tuple[float, float]:
    """What the search minimises: (fit KL, -speed)."""
    return (float(record["kl"]), -float(record["speed"]))


def precheck(text: str, head_dim: int, grid: tuple[int, int] | None) -> tuple[str, str | None]:
    """(canonical ``formula:...`` name, rejection reason or None): the checks that need no training. A window
    covering the teacher's grid is exact softmax there, so its fit would say nothing at the target resolution;
    a square window as tall as a wider grid (win(4) on 4x8) splits its rows in two: no softmax, so it is fitted."""
    program = text[len(PREFIX) :] if text.startswith(PREFIX) else text
    try:
        formula = parse_formula(program)
    except FormulaSyntaxError as e:
        return text, f"before training: {e}"
    name = PREFIX + str(formula)
    try:
        check_formula(formula, head_dim, grid)
    except InvalidFormula as e:
        return name, f"before training: {e}"
    if grid is not None and formula.window is not None and formula.window >= max(grid):
        return name, (
            f"before training: win({formula.window}) covers the whole {grid[0]}x{grid[1]} token grid of the "
            "teacher, where it is exact softmax attention: its fit says nothing about the local window it is "
            "at the target resolution; use a window smaller than the grid"
        )
    if not formula.row_stochastic:
        return name, (
            f"before training: {formula.norm}(...) normalisation gives a signed map, and the search scores "
            "the KL to the teacher's row-stochastic maps; use sum(...)"
        )
    return name, None


def _record(name: str, generation: int, origin: str, parents: Sequence[str], reason: str | None) -> dict:
    rec = {"formula": name, "generation": generation, "origin": origin, "parents": list(parents)}
    return rec if reason is None else {**rec, "status": "rejected", "reason": reason}


def _propose(state: SearchState, settings: SearchSettings, generation: int, rng: random.Random) -> list[dict]:
    """Generation 0: the seeds, then random formulas up to the population; later: offspring of the population
    by tournaments, crossover or mutation. A name seen before counts as a duplicate and is not proposed."""
    proposals: list[dict] = []
    seen: set[str] = set()
    if generation == 0:
        for label, text in settings.seeds.items():
            name, reason = precheck(text, settings.head_dim, settings.grid)
            if name not in seen:
                seen.add(name)
                proposals.append(_record(name, 0, f"zoo:{label}", (), reason))
    else:
        population = state.population
        keys = tournament_key([objectives(state.candidates[n]) for n in population])
        parsed = [parse_formula(n[len(PREFIX) :]) for n in population]
    wanted = settings.population if generation == 0 else settings.offspring
    tries = 0
    while len(proposals) < wanted and tries < wanted * settings.max_tries:
        tries += 1
        parents: list[str] = []
        if generation == 0:
            child, origin = random_formula(rng), "random"
        else:
            i = _tournament(population, keys, rng)
            parents.append(population[i])
            if len(population) > 1 and rng.random() < settings.crossover_prob:
                j = _tournament(population, keys, rng)
                parents.append(population[j])
                child, origin = crossover(parsed[i], parsed[j], rng), "crossover"
            else:
                child, origin = mutate(parsed[i], rng), "mutation"
        name, reason = precheck(PREFIX + str(child), settings.head_dim, settings.grid)
        if name in state.candidates or name in seen:
            state.duplicates += 1  # seen before: not evaluated again
            continue
        seen.add(name)
        proposals.append(_record(name, generation, origin, parents, reason))
    return proposals


def _tournament(population: list[str], keys: list[tuple[int, float]], rng: random.Random) -> int:
    a, b = rng.randrange(len(population)), rng.randrange(len(population))
    return a if (keys[a], a) <= (keys[b], b) else b


def run_search(
    state: SearchState,
    settings: SearchSettings,
    evaluate: Evaluate,
    *,
    on_generation: Callable[[SearchState], None] = lambda s: None,
    should_stop: Callable[[SearchState], str | None] = lambda s: None,
) -> SearchState:
    """Run generations ``state.generation + 1 .. settings.generations``; ``on_generation`` (e.g. save) after
    each, ``should_stop`` (a reason, e.g. a spent budget) before each."""
    while state.generation < settings.generations:
        generation = state.generation + 1
        reason = should_stop(state)
        if reason:
            say(f"search: stopping before generation {generation}: {reason}")
            break
        rng = random.Random(f"{settings.seed}/{generation}")
        proposals = _propose(state, settings, generation, rng)
        todo = [p for p in proposals if "status" not in p]
        for p, result in zip(todo, evaluate([p["formula"] for p in todo])):
            p.update(result)
        for p in proposals:
            state.candidates[p["formula"]] = p
        ok = [p for p in proposals if p["status"] == "ok"]
        pool = list(dict.fromkeys(state.population + [p["formula"] for p in ok]))
        if not pool:
            raise InputError(
                f"generation {generation}: every candidate was rejected ({len(proposals)}); see the reasons in "
                "the candidates (a larger search.fit_steps budget, or a lower search.fit_lr if stage 1 diverges)"
            )
        keep = select_survivors([objectives(state.candidates[n]) for n in pool], settings.population)
        state.population = [pool[i] for i in keep]
        state.generation = generation
        best = min(state.population, key=lambda n: state.candidates[n]["kl"])
        say(
            f"generation {generation}: {len(proposals)} new ({len(ok)} fitted, {len(proposals) - len(ok)} "
            f"rejected), {state.duplicates} duplicate{'s' * (state.duplicates != 1)} so far; best fit "
            f"{state.candidates[best]['kl']:.4f} {best}"
        )
        on_generation(state)
    return state


def pareto_front(state: SearchState) -> list[dict[str, Any]]:
    """The evaluated candidates nobody dominates, fastest first."""
    done = state.evaluated
    ranks = pareto_ranks([objectives(c) for c in done])
    return sorted((c for c, r in zip(done, ranks) if r == 0), key=lambda c: -c["speed"])
