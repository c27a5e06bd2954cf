"""Formula attention: the grammar (parse/print/check/mutate/crossover) and the attention it builds."""

from __future__ import annotations

import random

import pytest

from attnxfer.models.efficient.formula import (
    HAND_DESIGNED,
    Formula,
    FormulaSyntaxError,
    InvalidFormula,
    check_formula,
    crossover,
    mutate,
    parse_formula,
    random_formula,
)
from attnxfer.models.efficient.formula_grammar import Cat, Op

# ----------------------------------------------------------------------------------------------- grammar


def test_hand_designed_formulas_are_canonical_and_valid():
    for name, text in HAND_DESIGNED.items():
        f = parse_formula(text)
        assert f.name == text, name
        check_formula(f, head_dim=16)


def test_parse_builds_the_tree_written():
    f = parse_formula("sum(proj.cat(softmax,neg.softmax)+win(7))")
    assert f == Formula(
        (Op("proj"), Cat((Op("softmax"),), (Op("neg"), Op("softmax")))), norm="sum", window=7, conv=None
    )
    assert parse_formula("len(x)") == Formula((), norm="len")
    assert parse_formula("sum(relu.pow(2.5).proj(8).softmax+conv(3))").features == (
        Op("relu"),
        Op("pow", 2.5),
        Op("proj", 8),
        Op("softmax"),
    )


def test_canonical_form_is_a_fixed_point():
    # spaces, the prefix, number spellings and local-term order are not part of the canonical form
    messy = "formula: sum ( relu . focus( 3.0 ) . cat( x , pow(2.50) ) + conv(5) + win( 4 ) )"
    f = parse_formula(messy)
    assert str(f) == "sum(relu.focus(3).cat(x,pow(2.5))+win(4)+conv(5))"
    assert parse_formula(str(f)) == f


def test_round_trip_on_many_random_formulas():
    rng = random.Random(0)
    seen = set()
    for _ in range(500):
        f = random_formula(rng)
        text = str(f)
        assert parse_formula(text) == f
        assert str(parse_formula(text)) == text
        assert " " not in text
        check_formula(f, head_dim=8)
        seen.add(text)
    assert len(seen) > 300  # the generator explores, it does not repeat a handful of programs


@pytest.mark.parametrize(
    ("text", "position", "expected"),
    [
        ("sum(relu", 8, "expected '.', '+' or ')', found the end of the program"),
        ("sum(relu.)", 9, "expected an op (relu,"),
        ("max(relu)", 0, "expected 'sum' or 'len', found 'max'"),
        ("sum(relu+win(3.5))", 13, "expected an integer, found '3.5'"),
        ("sum(relu+win(3)+win(4))", 16, "expected 'conv', found 'win'"),
        ("sum(pow.relu)", 7, "expected '(' and a number after 'pow', found '.'"),
        ("sum(cat(relu;neg))", 12, "expected a name, a number or one of"),
        ("formula:sum(relu))", 17, "expected the end of the program, found ')'"),
        ("sum(cat(relu)", 12, "expected ',' or '.', found ')'"),
    ],
)
def test_syntax_errors_name_the_position_and_the_expected_token(text, position, expected):
    with pytest.raises(FormulaSyntaxError) as info:
        parse_formula(text)
    assert info.value.position == position
    assert f"at position {position} of {text!r}" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("sum(proj)", "sum normalisation of signed features"),
        ("sum(relu.neg)", "sum normalisation of signed features"),
        ("sum(x)", "sum normalisation of signed features"),
        ("sum(neg.focus(2).relu)", "focus needs non-negative input"),
        ("sum(relu.proj(0).relu)", "zero-size feature dim"),
        ("sum(relu.pow(9))", "must lie in [1, 8]"),
        ("len(relu+win(3))", "win shares the row-sum normaliser"),
        ("sum(relu.cos+win(3))", "cannot be combined with win"),
        ("sum(relu+conv(4))", "conv size must be odd"),
        ("sum(relu.cat(x,x).cat(x,x).cat(x,x).cat(x,x))", "more than 8 x head_dim"),
    ],
)
def test_invalid_programs_are_rejected_with_a_reason(text, reason):
    with pytest.raises(InvalidFormula, match=None) as info:
        check_formula(parse_formula(text), head_dim=16)
    assert reason in str(info.value)


def test_window_larger_than_the_grid_is_rejected_only_with_a_grid():
    f = parse_formula("sum(relu+win(7))")
    check_formula(f, head_dim=16)
    check_formula(f, head_dim=16, grid_size=(7, 7))
    with pytest.raises(InvalidFormula, match=r"win\(7\) is larger than the 4x4 token grid"):
        check_formula(f, head_dim=16, grid_size=(4, 4))


def test_signed_features_are_fine_without_row_sums():
    check_formula(parse_formula("len(proj)"), head_dim=16)
    check_formula(parse_formula("len(x)"), head_dim=16)


def test_mutate_and_crossover_always_return_valid_programs():
    rng = random.Random(1)
    population = [random_formula(rng) for _ in range(20)] + [parse_formula(t) for t in HAND_DESIGNED.values()]
    changed = 0
    for _ in range(300):
        a, b = rng.choice(population), rng.choice(population)
        child = mutate(a, rng)
        assert child != a
        for f in (child, crossover(a, b, rng)):
            for head_dim in (1, 8, 64):
                check_formula(f, head_dim)
            assert parse_formula(str(f)) == f
        changed += str(child) != str(a)
        population.append(child)
    assert changed == 300


def test_mutate_is_local():
    # one change: the printed programs differ in a short stretch, not throughout
    rng = random.Random(2)
    f = parse_formula(HAND_DESIGNED["hedgehog"])
    for _ in range(50):
        g = mutate(f, rng)
        a, b = str(f), str(g)
        head = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        tail = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y), min(len(a), len(b)))
        assert max(len(a), len(b)) - head - tail <= 16, (a, b)


def test_crossover_mixes_both_parents():
    rng = random.Random(3)
    a, b = parse_formula("sum(relu.lscale.focus(3))"), parse_formula("len(proj.l2.pow(2)+conv(3))")
    children = {str(crossover(a, b, rng)) for _ in range(200)}
    assert any("focus" in c and "l2" in c for c in children)  # genes from both
    assert any(c.startswith("len(") and "relu" in c for c in children)


def test_mutate_rejects_an_invalid_parent():
    with pytest.raises(InvalidFormula):
        mutate(parse_formula("sum(proj)"), random.Random(0))
