"""Formula attention: the grammar (parse/print/check/mutate/crossover) and the attention it builds."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit

from attnxfer.checkpoints.export import ModelCardInfo, export_student
from attnxfer.models.attention import attention_name_of
from attnxfer.models.efficient import (
    create_attention,
    efficient_student_from_teacher,
    get_attention_class,
    swap_attentions,
)
from attnxfer.models.efficient.formula import (
    FIXED_OPS,
    HAND_DESIGNED,
    LEARNED_OPS,
    Formula,
    FormulaAttention,
    FormulaSyntaxError,
    InvalidFormula,
    check_formula,
    crossover,
    mutate,
    parse_formula,
    random_formula,
)
from attnxfer.models.efficient.formula_grammar import OPS, Cat, Op
from attnxfer.models.student import attention_layout
from attnxfer.sources.exported_student import load_student

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
    """``len`` divides by N instead of a row sum, so signed features are accepted (``sum`` refuses them) and
    the attention is the signed map q kᵀ / N itself, negative entries kept."""
    for text in ("len(proj)", "len(x)"):
        assert check_formula(parse_formula(text), head_dim=16) is None
        with pytest.raises(InvalidFormula, match="sum normalisation of signed features"):
            check_formula(parse_formula(text.replace("len(", "sum(")), head_dim=16)
    attn = FormulaAttention(32, 2, program="len(x)").double()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g, dtype=torch.float64) for _ in "qkv")
    explicit = q @ k.transpose(-2, -1) / 5  # identity features, divided by the token count
    assert (explicit < 0).any()  # a signed map: a row-sum normaliser could be zero or negative here
    torch.testing.assert_close(attn._attend(q, k, v), explicit @ v, rtol=1e-12, atol=1e-12)


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


# ----------------------------------------------------------------------------------------------- the attention
DIM, HEADS, D = 32, 2, 16
EPS = 1e-6


def _layout(grid: int = 8, prefix: int = 1) -> dict:
    return dict(num_prefix_tokens=prefix, grid_size=(grid, grid))


def _pair(zoo_name: str, zoo_options: dict | None = None, grid: int = 8):
    """The zoo member with perturbed new parameters, and its HAND_DESIGNED formula given the same weights."""
    torch.manual_seed(0)
    base = dict(dim=DIM, num_heads=HEADS, **_layout(grid))
    zoo = create_attention(zoo_name, **base, **(zoo_options or {})).double()
    formula = get_attention_class(HAND_DESIGNED[zoo_name])(**base).double()
    formula.load_state_dict(zoo.state_dict(), strict=False)  # qkv, proj (the shared counterparts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in zoo.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        copy = {
            "hedgehog": {
                "features_q.steps.0.weight": "feature_map_q.weight",
                "features_q.steps.0.bias": "feature_map_q.bias",
                "features_k.steps.0.weight": "feature_map_k.weight",
                "features_k.steps.0.bias": "feature_map_k.bias",
            },
            "focused_linear": {
                "features_q.steps.1.scale": "focus_scale",
                "features_k.steps.1.scale": "focus_scale",
                "dwc.weight": "dwc.weight",
                "dwc.bias": "dwc.bias",
            },
        }
        copy["window_linear"] = {**copy["hedgehog"], "linear_log_weight": "linear_log_weight"}
        theirs = dict(zoo.named_parameters())
        for mine, their in copy.get(zoo_name, {}).items():
            formula.get_parameter(mine).copy_(theirs[their])
        for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
            if name in theirs:
                formula.get_parameter(name).copy_(theirs[name])
    return zoo, formula


def _qkv(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, HEADS, n, D, generator=g, dtype=torch.float64) for _ in "qkv"]


def _explicit_kernel_map(phi_q: torch.Tensor, phi_k: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("bhim,bhjm->bhij", phi_q, phi_k)
    return scores / scores.sum(-1, keepdim=True)


def _theta(n):
    return (math.pi / 2) * torch.arange(n, dtype=torch.float64) / n


def _hedgehog_phi(x, weight, bias):
    u = torch.einsum("bhnd,hdm->bhnm", x, weight) + bias[:, None, :]
    return torch.cat([u.softmax(-1) + EPS, (-u).softmax(-1) + EPS], -1)


def _focus_phi(x, s, p=3.0):
    y = (F.relu(x) + EPS) / F.softplus(s)
    return y.norm(dim=-1, keepdim=True) * y**p / (y**p).norm(dim=-1, keepdim=True)


# Explicit feature maps from the papers' definitions (not from attnxfer code), per zoo member.
DEFINITIONS = {
    "relu_linear": lambda a, x: F.relu(x) + EPS,
    "elu_linear": lambda a, x: F.elu(x * D**-0.25) + 1 + EPS,
    "cosformer": lambda a, x: torch.cat(
        [
            (F.relu(x) + EPS) * _theta(x.shape[-2]).cos()[:, None],
            (F.relu(x) + EPS) * _theta(x.shape[-2]).sin()[:, None],
        ],
        -1,
    ),
    "hedgehog": None,  # separate maps for q and k: see _definition_map
    "focused_linear": lambda a, x: _focus_phi(x, a.features_q.steps[1].scale),
}


def _definition_map(name, formula, q, k):
    if name == "hedgehog":
        fq, fk = formula.features_q.steps[0], formula.features_k.steps[0]
        return _explicit_kernel_map(
            _hedgehog_phi(q, fq.weight, fq.bias), _hedgehog_phi(k, fk.weight, fk.bias)
        )
    phi = DEFINITIONS[name]
    return _explicit_kernel_map(phi(formula, q), phi(formula, k))


@pytest.mark.parametrize("name", ["relu_linear", "elu_linear", "hedgehog", "cosformer", "focused_linear"])
def test_hand_designed_kernel_formulas_equal_their_zoo_member_and_the_definition(name):
    # the formula writes the paper's Hedgehog (m = d per sign); the zoo's default is m = d / 2
    zoo, formula = _pair(name, {"feature_dim": DIM // HEADS} if name == "hedgehog" else None)
    assert formula.map_kind == zoo.map_kind and attention_name_of(formula) == HAND_DESIGNED[name]
    q, k, v = _qkv(65)
    with torch.no_grad():
        reference = _definition_map(name, formula, q, k)
        for model in (zoo, formula):
            torch.testing.assert_close(model.attention_map(q, k), reference, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(model.attend_mapped(q, k, v), reference @ v, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(formula.attend(q, k, v), zoo.attend(q, k, v), rtol=1e-12, atol=1e-13)
        x = torch.randn(2, 65, DIM, dtype=torch.float64)
        torch.testing.assert_close(formula(x), zoo(x), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(reference.sum(-1), torch.ones_like(reference[..., 0]))
    assert reference.min() > 0


def test_focused_formula_adds_the_depthwise_conv_outside_the_map():
    _, formula = _pair("focused_linear")
    q, k, v = _qkv(65)
    with torch.no_grad():
        conv_term = formula.attend(q, k, v) - formula.attend_mapped(q, k, v)
        # the conv, written out on the 8x8 grid (prefix token: no conv term)
        grid = v[:, :, 1:].reshape(2 * HEADS, 8, 8, D).permute(0, 3, 1, 2)
        conv = F.conv2d(grid, formula.dwc.weight, formula.dwc.bias, padding=2, groups=D)
        expected = conv.permute(0, 2, 3, 1).reshape(2, HEADS, 64, D)
    assert conv_term.abs().max() > 1e-3  # the perturbed conv does something
    torch.testing.assert_close(conv_term[:, :, 0], torch.zeros_like(conv_term[:, :, 0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(conv_term[:, :, 1:], expected, rtol=1e-9, atol=1e-12)


def test_window_linear_formula_equals_the_zoo_hybrid():
    zoo, formula = _pair("window_linear", {"window_size": 7})
    q, k, v = _qkv(65)
    with torch.no_grad():
        zoo_map, mine = zoo.attention_map(q, k), formula.attention_map(q, k)
        torch.testing.assert_close(mine, zoo_map, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(formula.attend(q, k, v), zoo.attend(q, k, v), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(formula.attend(q, k, v), mine @ v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mine.sum(-1), torch.ones_like(mine[..., 0]))
    # the window term is there: a grid query's weight on a key in its own window is a softmax logit's share
    assert not torch.allclose(mine, _definition_map("hedgehog", formula, q, k))


@pytest.mark.parametrize(
    "program",
    ["sum(exp.l2.pow(2))", "sum(proj.softplus.cat(x,square).lscale)", "sum(neg.softmax.cos.focus(1.5))"],
)
def test_other_sum_formulas_are_row_stochastic_and_their_core_is_the_map(program):
    a = FormulaAttention(DIM, HEADS, program=program, **_layout()).double()
    q, k, v = _qkv(65)
    with torch.no_grad():
        m = a.attention_map(q, k)
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m[..., 0]))
        assert m.min() >= 0
        torch.testing.assert_close(a.attend(q, k, v), m @ v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("program", "power", "after_pow"),
    [("sum(exp.pow(8))", 8, lambda e: e**8), ("sum(exp.square)", 2, lambda e: e**2 + EPS)],
)
def test_exp_then_a_power_stays_finite_in_fp32_with_large_inputs(program, power, after_pow):
    a = FormulaAttention(DIM, HEADS, program=program, **_layout())
    q, k, v = (20 * t.float() for t in _qkv(65))  # teacher q/k reach |x| of 10-20
    with torch.no_grad():
        assert torch.isfinite(a.attend(q, k, v)).all()
        phi = a.features_q(q)[0]
    # the definition in float64: exp's input capped at 30 / power, so no feature passes e^30
    expected = after_pow(q.double().clamp(max=30 / power).exp() + EPS)
    torch.testing.assert_close(phi.double(), expected, rtol=1e-5, atol=1e-30)


def test_exp_alone_keeps_its_cap_of_30_bit_for_bit():
    a = FormulaAttention(DIM, HEADS, program="sum(exp)", **_layout())
    q = 20 * _qkv(65)[0].float()
    assert q.max() > 30
    with torch.no_grad():
        assert torch.equal(a.features_q(q)[0], q.clamp(max=30).exp() + 1e-6)


@pytest.mark.parametrize(
    ("program", "caps"),
    [
        ("sum(exp.l2.pow(8))", [30]),  # normalised before the power
        ("sum(exp.pow(2).softmax.pow(8))", [15]),  # the power before softmax counts, the one after not
        ("sum(cat(exp,relu).pow(3))", [10]),  # a branch's chain goes on after its cat
        ("sum(exp.cat(pow(2),square.square))", [7.5]),  # the larger branch
        ("sum(exp.pow(2).exp.pow(4))", [15, 7.5]),  # a later exp caps its own input
    ],
)
def test_each_exp_is_capped_by_the_power_before_a_bounding_op(program, caps):
    a = FormulaAttention(DIM, HEADS, program=program, **_layout())
    big = (torch.tensor([100.0], dtype=torch.float64),)
    exps = [m for m in a.features_q.modules() if getattr(m, "op", None) == Op("exp")]
    assert [m(big, D)[0].item() for m in exps] == [math.exp(c) + EPS for c in caps]


def _capped(x, power):
    # the definition in float64: a power's input magnitude capped at e^(30 / D), D the power it and the ops after
    # it raise that input to, so no feature passes e^30
    bound = math.exp(30 / power)
    return x.clamp(-bound, bound)


def _signed_pow(x, p):
    return x.sign() * x.abs() ** p


def _cat_branches(y):
    # cat(square, pow(3)).square: each branch goes on to the square after the cat
    left, right = _capped(y, 4) ** 2 + EPS, _capped(y, 6) ** 3
    return torch.cat([_capped(left, 2) ** 2 + EPS, _capped(right, 2) ** 2 + EPS], -1)


@pytest.mark.parametrize(
    ("program", "definition"),
    [
        (
            "sum(square.pow(8).square.pow(8))",  # x^256
            lambda x: _capped(_capped(_capped(_capped(x, 256) ** 2 + EPS, 128) ** 8, 16) ** 2 + EPS, 8) ** 8,
        ),
        (
            "len(pow(8).pow(8).pow(8))",  # signed x^512
            lambda x: _signed_pow(
                _capped(_signed_pow(_capped(_signed_pow(_capped(x, 512), 8), 64), 8), 8), 8
            ),
        ),
        (
            "sum(relu.pow(4).cat(square,pow(3)).square)",  # the cat's larger branch: pow(4) at D = 4 * 3 * 2
            lambda x: _cat_branches(_capped(F.relu(x) + EPS, 24) ** 4),
        ),
    ],
)
def test_powers_without_an_exp_stay_finite_in_fp32_with_large_inputs(program, definition):
    a = FormulaAttention(DIM, HEADS, program=program, **_layout())
    q, k, v = (20 * t.float() for t in _qkv(65))  # teacher q/k reach |x| of 10-20
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = a.attend(q, k, v)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    with torch.no_grad():
        phi = torch.cat(a.features_q(q), -1)
    expected = definition(q.detach().double())
    assert expected.abs().max() <= math.exp(30) * (1 + 1e-12) and expected.abs().max() > math.exp(29)
    torch.testing.assert_close(phi.double(), expected, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize(
    ("program", "powers"),
    [
        ("sum(square.pow(8).square.pow(8))", [256, 128, 16, 8]),
        ("len(pow(3).l2.pow(2))", [3, 2]),  # normalised between the powers
        ("sum(exp.pow(2).softmax.pow(8))", [2, 8]),  # the power before softmax counts, the one after not
        ("sum(cat(relu,square).pow(3))", [6, 3]),  # a branch's chain goes on after its cat
        ("len(pow(2).exp.pow(4))", [2, 4]),  # a later exp caps its own input
    ],
)
def test_each_power_caps_its_input_at_e30_over_the_power_to_a_bounding_op(program, powers):
    a = FormulaAttention(DIM, HEADS, program=program, **_layout())
    big = (torch.tensor([-1e300, 1e300], dtype=torch.float64),)
    steps = [m for m in a.features_q.modules() if hasattr(m, "op") and m.op.name in ("pow", "square")]
    for step, power in zip(steps, powers, strict=True):
        p = 2.0 if step.op.name == "square" else step.op.arg
        bound = math.exp(30 / power) ** p
        expected = [bound + EPS] * 2 if step.op.name == "square" else [-bound, bound]
        assert step(big, D)[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_a_power_below_its_cap_is_the_plain_power_bit_for_bit_gradients_too():
    # the cap must not change a feature nor a gradient below it, where the gradient reaches the chain laid out
    # as the core's matmuls leave it (a clamp's backward would lay it out anew: other last bits in elu's)
    program = "sum(elu1.scale.pow(2))"
    capped, plain = (FormulaAttention(DIM, HEADS, program=program, **_layout()) for _ in "ab")
    for chain in (plain.features_q, plain.features_k):
        chain.steps[2].fn = lambda blocks, d: tuple(b.sign() * b.abs().pow(2.0) for b in blocks)
    grads = []
    for attn in (capped, plain):
        q, k, v = (t.float().requires_grad_(True) for t in _qkv(65))
        out = attn.attend(q, k, v)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), q.grad, k.grad))
    for mine, theirs in zip(*grads, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize(
    ("program", "first_power"),
    [("sum(square.pow(8).square.pow(8))", 256), ("len(pow(8).pow(8).pow(8))", 512)],  # square; signed pow
)
def test_a_capped_power_gives_the_same_features_with_and_without_autograd(program, first_power):
    # without a gradient to carry the cap is a plain clamp (the fast path search.speed times); the features
    # must be those training computes, bit for bit, below the cap and at it
    a = FormulaAttention(DIM, HEADS, program=program, **_layout())
    q = 20 * _qkv(65)[0].float()
    bound = math.exp(30 / first_power)
    assert (q.abs() > bound).any() and (q.abs() <= bound).any()  # both sides of the first cap are exercised
    with torch.no_grad():
        fast = torch.cat(a.features_q(q), -1)
    tracked = torch.cat(a.features_q(q.clone().requires_grad_(True)), -1)
    assert tracked.requires_grad and torch.equal(fast, tracked.detach())


def test_len_formula_is_signed_and_divides_by_the_token_count():
    a = FormulaAttention(DIM, HEADS, program="len(proj(8))", **_layout()).double()
    assert (
        a.map_kind.value == "signed" and get_attention_class("formula:len(proj)").map_kind.value == "signed"
    )
    q, k, v = _qkv(65)
    with torch.no_grad():
        w = a.features_q.steps[0].weight
        w.add_(0.1)
        explicit = (q @ w) @ (k @ a.features_k.steps[0].weight).transpose(-2, -1) / 65  # biases start at 0
        torch.testing.assert_close(a.attention_map(q, k), explicit)
        torch.testing.assert_close(a.attend(q, k, v), explicit @ v)
    assert explicit.min() < 0


def test_formula_names_resolve_to_one_class_per_canonical_program():
    a, b = get_attention_class("formula:sum( relu )"), get_attention_class("formula:sum(relu)")
    assert a is b and a.attention_name == "formula:sum(relu)"
    layer = a(dim=DIM, num_heads=HEADS)
    assert layer.options() == {"program": "sum(relu)"} and attention_name_of(layer) == "formula:sum(relu)"
    plain = create_attention("formula", dim=DIM, num_heads=HEADS, program="sum( relu )")
    assert attention_name_of(plain) == "formula:sum(relu)"
    with pytest.raises(ValueError, match="one program per attention name"):
        a(dim=DIM, num_heads=HEADS, program="sum(elu1)")
    with pytest.raises(FormulaSyntaxError, match=re.escape("at position 16 of 'formula:sum(relu'")):
        get_attention_class("formula:sum(relu")
    # a window beyond a layer's grid is refused where the student is built, naming the largest that fits
    get_attention_class("formula:sum(relu+win(7))")(dim=DIM, num_heads=HEADS, **_layout(grid=4))
    with pytest.raises(ValueError, match=r"^win 7 is larger than the 4x4 token grid .* use at most 4;"):
        efficient_student_from_teacher(tiny_vit(depth=1), "formula:sum(relu+win(7))")
    with pytest.raises(InvalidFormula, match="sum normalisation of signed features"):
        get_attention_class("formula:sum(proj)")(dim=DIM, num_heads=HEADS)


# ----------------------------------------------------------------------------------------------- zoo integration
MIXED = [
    "formula:sum(relu.cos)",
    "formula:len(proj(8))",
    "formula:sum(proj.cat(softmax,neg.softmax)+win(2)+conv(3))",
]


def test_formula_students_swap_save_export_and_load_bit_identically(tmp_path):
    teacher = tiny_vit(depth=3, num_classes=10)
    student = efficient_student_from_teacher(teacher, ["formula:sum( relu . cos )", *MIXED[1:]])
    assert attention_layout(student) == MIXED  # canonical names, whatever the spelling given
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    student.eval()
    # swap_attentions (how exports are rebuilt) with the options a layer reports
    again = swap_attentions(
        tiny_vit(depth=3, num_classes=10),
        attention_layout(student),
        [b.attn.options() for b in student.blocks],
    )
    again.load_state_dict(student.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), student(x))

    out = export_student(student, tmp_path / "export", card=ModelCardInfo(model_name="formula-student"))
    spec = json.loads((out / "config.json").read_text())["attnxfer"]["student"]
    assert spec["attention"] == MIXED
    assert [o["program"] for o in spec["attention_options"]] == [n.removeprefix("formula:") for n in MIXED]
    assert (
        "| 2 | formula:sum(proj.cat(softmax,neg.softmax)+win(2)+conv(3)) |" in (out / "README.md").read_text()
    )
    loaded = load_student(f"local-dir:{out}")
    assert attention_layout(loaded) == MIXED
    assert [b.attn.map_kind.value for b in loaded.blocks] == ["row_stochastic", "signed", "row_stochastic"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), student(x))


def test_every_grammar_op_has_one_implementation():
    assert set(FIXED_OPS).isdisjoint(LEARNED_OPS)
    assert set(FIXED_OPS) | set(LEARNED_OPS) == set(OPS)
    assert {n for n, spec in OPS.items() if spec.learned} == set(LEARNED_OPS)
