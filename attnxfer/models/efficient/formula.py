"""Formula attention: a kernel attention described by a program of the formula grammar.

The grammar (parsing, printing, checks, random programs, mutation and crossover) lives in
`formula_grammar`; this module is its public face.
"""

from __future__ import annotations

from .formula_grammar import (
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

__all__ = [
    "HAND_DESIGNED",
    "Formula",
    "FormulaSyntaxError",
    "InvalidFormula",
    "check_formula",
    "crossover",
    "mutate",
    "parse_formula",
    "random_formula",
]
