"""The formula grammar: parse, print and check kernel-attention programs (no torch here; the search moves
are `formula_search`). The grammar and its ops are documented in docs/conversion.md, "Formula attention";
``str(formula)`` is the one canonical form and ``parse_formula(str(f)) == f``."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ...errors import InputError

#: How a formula is named where an attention name is expected.
PREFIX = "formula:"
#: Normalisations: ``sum`` is row-stochastic, ``len`` (divide by N) is signed.
NORMS = ("sum", "len")
#: The widest feature vector a formula may have, in units of the head dim (linear attention must stay cheap).
MAX_FEATURE_FACTOR = 8
#: Local-term sizes random formulas and mutations draw from (any positive size parses).
WINDOW_SIZES = (2, 3, 4, 5, 7)
CONV_SIZES = (3, 5)
POWERS = (1.5, 2.0, 3.0, 4.0)


class FormulaSyntaxError(InputError):
    """A program that does not parse: says where (0-based position) and what was expected."""

    def __init__(self, text: str, position: int, expected: str, found: str) -> None:
        self.text, self.position, self.expected, self.found = text, position, expected, found
        super().__init__(
            f"formula syntax error at position {position} of {text!r}: expected {expected}, found {found} "
            "(see the grammar in docs/conversion.md, 'Formula attention')"
        )


class InvalidFormula(InputError):
    """A program that parses but cannot be a valid attention (shape, positivity, normalisation)."""


class Sign(enum.IntEnum):
    """What is known about the features' signs, weakest first. OVERLAP: non-negative with positive pairwise
    dot products (cos of positive features); row-sum normalisation needs OVERLAP or better."""

    SIGNED = 0
    OVERLAP = 1
    POSITIVE = 2


@dataclass(frozen=True)
class OpSpec:
    """One unary op of the grammar: its argument, and how it changes the features' sign and width."""

    doc: str
    sign: Callable[[Sign], Sign]
    arg: str | None = None  # None, "int" (a width) or "float" (a power)
    arg_range: tuple[float, float] | None = None
    width: Callable[[int, int, float | None], int] = lambda m, d, a: m  # (width in, head dim, arg) -> out
    needs_nonneg: bool = False
    learned: bool = False
    optional_arg: bool = False


_positive = lambda s: Sign.POSITIVE
_kept = lambda s: s
_signed = lambda s: Sign.SIGNED
_cos_sign = lambda s: Sign.SIGNED if s is Sign.SIGNED else Sign.OVERLAP


#: The op registry: the grammar's unary ops (their torch code is in ``formula.py``).
OPS: dict[str, OpSpec] = {
    "relu": OpSpec("relu(x) + eps", _positive),
    "elu1": OpSpec("elu(x) + 1 + eps", _positive),
    "exp": OpSpec("exp(min(x, 30 / D)) + eps, D the power later ops raise it to", _positive),
    "softplus": OpSpec("softplus(x) + eps", _positive),
    "square": OpSpec("min(|x|, e^(30 / D))^2 + eps, D the power it and later ops raise x to", _positive),
    "softmax": OpSpec("softmax over the feature dim + eps", _positive),
    "neg": OpSpec("-x", _signed),
    "scale": OpSpec("x * d^-1/4", _kept),
    "l2": OpSpec("x / |x|", _kept),
    "pow": OpSpec(
        "sign(x) min(|x|, e^(30 / D))^p, D as for square", _kept, arg="float", arg_range=(1.0, 8.0)
    ),
    "focus": OpSpec(
        "|x| (x/max)^p / |(x/max)^p|", _kept, arg="float", arg_range=(1.0, 8.0), needs_nonneg=True
    ),
    "lscale": OpSpec("x / softplus(s), s learned", _kept, learned=True),
    "proj": OpSpec(
        "x W + b, W identity-initialised",
        _signed,
        arg="int",
        arg_range=(0, 4096),
        width=lambda m, d, a: m if a is None else int(a),
        learned=True,
        optional_arg=True,
    ),
    "cos": OpSpec("[x cos t_i, x sin t_i], t_i = pi/2 i/N", _cos_sign, width=lambda m, d, a: 2 * m),
}


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Op:
    """A unary op by name (see `OPS`), with its number argument when it has one."""

    name: str
    arg: float | int | None = None

    def __post_init__(self) -> None:
        spec = OPS.get(self.name)
        if spec is not None and spec.arg is not None and self.arg is not None:
            object.__setattr__(self, "arg", float(self.arg) if spec.arg == "float" else int(self.arg))

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}({_number_text(self.arg)})"


@dataclass(frozen=True)
class Cat:
    """Two branches applied to the same input, concatenated along the feature dim."""

    left: tuple[Step, ...]
    right: tuple[Step, ...]

    def __str__(self) -> str:
        return f"cat({_chain_text(self.left)},{_chain_text(self.right)})"


Step = Op | Cat


def _chain_text(chain: tuple[Step, ...]) -> str:
    return ".".join(map(str, chain)) if chain else "x"


@dataclass(frozen=True)
class Formula:
    """A kernel-attention program; ``str(f)`` is canonical, ``f.name`` the attention name."""

    features: tuple[Step, ...]
    norm: str = "sum"
    window: int | None = None
    conv: int | None = None

    def __str__(self) -> str:
        locals_ = (f"+win({self.window})" if self.window is not None else "") + (
            f"+conv({self.conv})" if self.conv is not None else ""
        )
        return f"{self.norm}({_chain_text(self.features)}{locals_})"

    @property
    def name(self) -> str:
        return PREFIX + str(self)

    @property
    def row_stochastic(self) -> bool:
        return self.norm == "sum"


_TOKEN = re.compile(r"\s*(?:(?P<name>[a-z][a-z0-9_]*)|(?P<number>\d+(?:\.\d+)?)|(?P<punct>[().,+]))")


@dataclass
class _Parser:
    text: str
    offset: int = 0  # of the program inside ``text`` (after a "formula:" prefix)
    pos: int = 0
    tokens: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        program = self.text[self.offset :]
        i = 0
        while program[i:].strip():
            m = _TOKEN.match(program, i)
            if m is None:
                start = i + len(program[i:]) - len(program[i:].lstrip())
                raise self._error(start, "a name, a number or one of ( ) . , +", repr(program[start]))
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            i = m.end()
        self.end = len(program)

    def _error(self, position: int, expected: str, found: str) -> FormulaSyntaxError:
        return FormulaSyntaxError(self.text, self.offset + position, expected, found)

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def fail(self, expected: str) -> FormulaSyntaxError:
        token = self.peek()
        if token is None:
            return self._error(self.end, expected, "the end of the program")
        return self._error(token[2], expected, repr(token[1]))

    def take(self, value: str | None = None, kind: str | None = None, expected: str | None = None) -> str:
        token = self.peek()
        if (
            token is None
            or (value is not None and token[1] != value)
            or (kind is not None and token[0] != kind)
        ):
            raise self.fail(expected or repr(value))
        self.pos += 1
        return token[1]

    def at(self, value: str) -> bool:
        token = self.peek()
        return token is not None and token[1] == value

    def formula(self) -> Formula:
        norm = self.take(kind="name", expected=" or ".join(map(repr, NORMS)))
        if norm not in NORMS:
            self.pos -= 1
            raise self.fail(" or ".join(map(repr, NORMS)))
        self.take("(")
        chain = self.chain()
        terms: dict[str, int] = {}
        while self.at("+"):
            self.take("+")
            choices = [t for t in ("win", "conv") if t not in terms]
            expected = " or ".join(f"'{t}'" for t in choices) or "')' (win and conv are given once each)"
            token = self.peek()
            if token is None or token[1] not in choices:
                raise self.fail(expected)
            self.pos += 1
            self.take("(")
            terms[token[1]] = self.integer()
            self.take(")")
        self.take(")", expected=("'.', '+'" if chain else "'+'") + " or ')'")
        if self.peek() is not None:
            raise self.fail("the end of the program")
        return Formula(chain, norm, terms.get("win"), terms.get("conv"))

    def chain(self) -> tuple[Step, ...]:
        if self.at("x"):
            self.take("x")
            return ()
        steps = [self.step()]
        while self.at("."):
            self.take(".")
            steps.append(self.step())
        return tuple(steps)

    def step(self) -> Step:
        token = self.peek()
        known = "an op (" + ", ".join([*OPS, "cat"]) + ") or 'x'"
        if token is None or token[0] != "name" or (token[1] not in OPS and token[1] != "cat"):
            raise self.fail(known)
        self.pos += 1
        name = token[1]
        if name == "cat":
            self.take("(")
            left = self.chain()
            self.take(",", expected="',' or '.'")
            right = self.chain()
            self.take(")", expected="')' or '.'")
            return Cat(left, right)
        spec = OPS[name]
        if spec.arg is None:
            return Op(name)
        if not self.at("("):
            if spec.optional_arg:
                return Op(name)
            raise self.fail(f"'(' and a number after {name!r}")
        self.take("(")
        value = self.integer() if spec.arg == "int" else float(self.take(kind="number", expected="a number"))
        self.take(")")
        return Op(name, value)

    def integer(self) -> int:
        token = self.peek()
        if token is None or token[0] != "number" or "." in token[1]:
            raise self.fail("an integer")
        self.pos += 1
        return int(token[1])


def parse_formula(text: str) -> Formula:
    """Parse a program (with or without ``formula:``) into a `Formula`: syntax only (`check_formula`
    checks validity); `FormulaSyntaxError` names the 0-based position and the expected token."""
    if not isinstance(text, str):
        raise TypeError(f"a formula is a string, got {type(text).__name__}")
    offset = len(PREFIX) if text.startswith(PREFIX) else 0
    return _Parser(text, offset).formula()


def _walk(chain: tuple[Step, ...], width: int, sign: Sign, head_dim: int, where: str) -> tuple[int, Sign]:
    for i, step in enumerate(chain):
        at = f"{where}step {i + 1} ({step})"
        if isinstance(step, Cat):
            lw, ls = _walk(step.left, width, sign, head_dim, f"{at}, left branch: ")
            rw, rs = _walk(step.right, width, sign, head_dim, f"{at}, right branch: ")
            width, sign = lw + rw, min(ls, rs)
            continue
        spec = OPS[step.name]
        if step.arg is not None and spec.arg_range is not None:
            lo, hi = spec.arg_range
            if not lo <= step.arg <= hi:
                raise InvalidFormula(
                    f"{at}: the argument must lie in [{_number_text(lo)}, {_number_text(hi)}]"
                )
        if spec.needs_nonneg and sign is Sign.SIGNED:
            raise InvalidFormula(
                f"{at}: {step.name} needs non-negative input but its input is signed; put a positive op "
                "(relu, elu1, softplus, softmax, exp, square) before it"
            )
        width, sign = spec.width(width, head_dim, step.arg), spec.sign(sign)
        if width < 1:
            raise InvalidFormula(f"{at}: makes a zero-size feature dim")
    return width, sign


def check_formula(formula: Formula, head_dim: int, grid_size: tuple[int, int] | None = None) -> None:
    """Raise `InvalidFormula` (the reason and the fix) unless ``formula`` is a valid attention: checked
    before any training, so a bad program fails in seconds, not after a stage."""
    if not isinstance(formula, Formula):
        raise TypeError(f"check_formula takes a Formula (parse_formula(text)), got {type(formula).__name__}")
    if head_dim < 1:
        raise InvalidFormula(f"head_dim must be >= 1, got {head_dim}")
    if formula.norm not in NORMS:
        raise InvalidFormula(f"unknown normalisation {formula.norm!r}; choose one of {NORMS}")
    width, sign = _walk(formula.features, head_dim, Sign.SIGNED, head_dim, "")  # feature width m, its sign
    if width > MAX_FEATURE_FACTOR * head_dim:
        raise InvalidFormula(
            f"{formula}: {width} features per head is more than {MAX_FEATURE_FACTOR} x head_dim "
            f"({head_dim}); fewer cat/cos or a narrower proj(m)"
        )
    if formula.norm == "sum" and sign is Sign.SIGNED:
        raise InvalidFormula(
            f"{formula}: sum normalisation of signed features (rows could sum to zero or go negative); end "
            "the chain with a positive op (relu, elu1, softplus, softmax, exp, square) or use len(...)"
        )
    if formula.window is not None:
        if formula.norm != "sum":
            raise InvalidFormula(f"{formula}: win shares the row-sum normaliser; use sum(...)")
        if formula.window < 1:
            raise InvalidFormula(f"{formula}: the window size must be >= 1")
        if any(isinstance(step, Op) and step.name == "cos" for step in _all_steps(formula.features)):
            raise InvalidFormula(f"{formula}: cos reweighting by position cannot be combined with win")
    if formula.conv is not None and (formula.conv < 1 or formula.conv % 2 == 0):
        raise InvalidFormula(f"{formula}: the conv size must be odd and >= 1 (a same-size depthwise conv)")
    if grid_size is not None:
        gh, gw = grid_size
        for term, size in (("win", formula.window), ("conv", formula.conv)):
            if size is not None and size > min(gh, gw):
                raise InvalidFormula(f"{formula}: {term}({size}) is larger than the {gh}x{gw} token grid")


def _all_steps(chain: tuple[Step, ...]) -> Iterator[Step]:
    for step in chain:
        yield step
        if isinstance(step, Cat):
            yield from _all_steps(step.left)
            yield from _all_steps(step.right)


def _is_valid(formula: Formula) -> bool:
    # Validity of generated formulas does not depend on the head dim (no explicit proj widths).
    try:
        check_formula(formula, head_dim=64)
    except InvalidFormula:
        return False
    return True


#: The hand-designed zoo members as formulas (numerically the same attention, given the same weights). Hedgehog
#: is written as its paper's (m = d per sign: ``proj`` keeps the head dim); the zoo's default is m = d / 2.
HAND_DESIGNED: dict[str, str] = {
    "relu_linear": "formula:sum(relu)",
    "elu_linear": "formula:sum(scale.elu1)",
    "hedgehog": "formula:sum(proj.cat(softmax,neg.softmax))",
    "cosformer": "formula:sum(relu.cos)",
    "focused_linear": "formula:sum(relu.lscale.focus(3)+conv(5))",
    "window_linear": "formula:sum(proj.cat(softmax,neg.softmax)+win(7))",
}
