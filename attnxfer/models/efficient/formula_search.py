"""Search moves on formulas: random programs, mutation and crossover that only ever return valid ones (the
grammar and its checks are `formula_grammar`; the evolution that uses these is `attnxfer.search`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

from .formula_grammar import (
    CONV_SIZES,
    OPS,
    POWERS,
    WINDOW_SIZES,
    Cat,
    Formula,
    Op,
    Step,
    _is_valid,
    check_formula,
)

#: Ops random formulas and mutations draw (proj without a width, so validity is head-dim free).
_SIMPLE_OPS = tuple(name for name, spec in OPS.items() if spec.arg is None or spec.optional_arg)


_POWER_OPS = tuple(name for name, spec in OPS.items() if spec.arg == "float")


def _random_op(rng: random.Random) -> Op:
    name = rng.choice(_SIMPLE_OPS + _POWER_OPS)
    return Op(name, rng.choice(POWERS)) if name in _POWER_OPS else Op(name)


def _random_chain(rng: random.Random, length: int, allow_cat: bool) -> tuple[Step, ...]:
    steps: list[Step] = []
    for _ in range(length):
        if allow_cat and rng.random() < 0.12:
            left = _random_chain(rng, rng.randint(1, 2), False)
            right = _random_chain(rng, rng.randint(1, 2), False)
            steps.append(Cat(left, right))
        else:
            steps.append(_random_op(rng))
    return tuple(steps)


def random_formula(rng: random.Random) -> Formula:
    """A random formula (1-4 steps, maybe a cat, a window or a conv), drawn until valid for any head dim."""
    while True:
        formula = Formula(
            _random_chain(rng, rng.randint(1, 4), True),
            "sum" if rng.random() < 0.85 else "len",
            rng.choice(WINDOW_SIZES) if rng.random() < 0.2 else None,
            rng.choice(CONV_SIZES) if rng.random() < 0.15 else None,
        )
        if _is_valid(formula):
            return formula


# A chain inside a formula is addressed by a path: () is the top chain, (i, 0) / (i, 1) the left /
# right branch of the cat at step i, and so on down.
Path = tuple[int, ...]


def _chain_paths(chain: tuple[Step, ...], path: Path = ()) -> Iterator[Path]:
    yield path
    for i, step in enumerate(chain):
        if isinstance(step, Cat):
            yield from _chain_paths(step.left, (*path, i, 0))
            yield from _chain_paths(step.right, (*path, i, 1))


def _get_chain(chain: tuple[Step, ...], path: Path) -> tuple[Step, ...]:
    if not path:
        return chain
    step = chain[path[0]]
    return _get_chain(step.left if path[1] == 0 else step.right, path[2:])


def _set_chain(chain: tuple[Step, ...], path: Path, new: tuple[Step, ...]) -> tuple[Step, ...]:
    if not path:
        return new
    i, side = path[0], path[1]
    step = chain[i]
    if side == 0:
        step = Cat(_set_chain(step.left, path[2:], new), step.right)
    else:
        step = Cat(step.left, _set_chain(step.right, path[2:], new))
    return (*chain[:i], step, *chain[i + 1 :])


def _mutations(formula: Formula, rng: random.Random) -> Formula:
    """One local change, maybe invalid (the caller checks)."""
    path = rng.choice(list(_chain_paths(formula.features)))
    chain = _get_chain(formula.features, path)
    ops = [i for i, s in enumerate(chain) if isinstance(s, Op)]
    moves = ["insert", "norm", "window", "conv", "proj"]
    if ops:
        moves += ["swap", "swap", "remove"]
    if any(chain[i].arg is not None and chain[i].name in _POWER_OPS for i in ops):
        moves.append("power")
    if formula.window is not None:
        moves.append("window")
    move = rng.choice(moves)
    if move == "swap":
        i = rng.choice(ops)
        chain = (*chain[:i], _random_op(rng), *chain[i + 1 :])
    elif move == "insert":
        i = rng.randint(0, len(chain))
        chain = (*chain[:i], _random_op(rng), *chain[i:])
    elif move == "remove":
        i = rng.choice(ops)
        chain = chain[:i] + chain[i + 1 :]
    elif move == "power":
        i = rng.choice([i for i in ops if chain[i].name in _POWER_OPS])
        power = rng.choice([p for p in POWERS if p != chain[i].arg])
        chain = (*chain[:i], Op(chain[i].name, power), *chain[i + 1 :])
    elif move == "proj":
        chain = chain[1:] if chain and chain[0] == Op("proj") else (Op("proj"), *chain)
    elif move == "norm":
        return replace(formula, norm="len" if formula.norm == "sum" else "sum")
    elif move == "window":
        return replace(formula, window=rng.choice([s for s in (None, *WINDOW_SIZES) if s != formula.window]))
    elif move == "conv":
        return replace(formula, conv=rng.choice([s for s in (None, *CONV_SIZES) if s != formula.conv]))
    return replace(formula, features=_set_chain(formula.features, path, chain))


def mutate(formula: Formula, rng: random.Random, *, tries: int = 200) -> Formula:
    """One local change (an op swapped, inserted or removed, a leading proj toggled, a power, window,
    conv or the normalisation changed): always a different formula valid for every head dim (grid sizes are
    the caller's to check); `InvalidFormula` if ``formula`` itself is invalid."""
    check_formula(formula, head_dim=64)
    for _ in range(tries):
        child = _mutations(formula, rng)
        if child != formula and _is_valid(child):
            return child
    return random_formula(rng)  # practically unreachable: every formula has valid neighbours


def crossover(a: Formula, b: Formula, rng: random.Random, *, tries: int = 200) -> Formula:
    """A child: a chain of ``a`` (whole, a branch or a tail) replaced by one of ``b``, norm / window / conv
    from either parent; always valid for every head dim (else a copy of a parent). Parents must be valid."""
    for _ in range(tries):
        path = rng.choice(list(_chain_paths(a.features)))
        host = _get_chain(a.features, path)
        donor = _get_chain(b.features, rng.choice(list(_chain_paths(b.features))))
        cut, graft = rng.randint(0, len(host)), rng.randint(0, len(donor))
        features = _set_chain(a.features, path, host[:cut] + donor[graft:])
        child = Formula(
            features,
            rng.choice((a.norm, b.norm)),
            rng.choice((a.window, b.window)),
            rng.choice((a.conv, b.conv)),
        )
        if _is_valid(child):
            return child
    return rng.choice((a, b))
