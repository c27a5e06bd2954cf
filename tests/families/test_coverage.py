"""The coverage table: which of timm's pretrained transformers (flat and hierarchical) plan a transfer (meta
device, no weights), one row per timm module, declared by the family file that covers it.

`scripts/family_coverage.py`'s `COVERAGE` gathers the families' declared rows; the slow test re-measures them from
timm's registry and must find exactly them, the fast ones check a sample arch per module and the docs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import script_module

from attnxfer.models.attention import families

from .cases import CASES

_coverage = script_module("family_coverage")
COVERAGE, TIMM_MODULES = _coverage.COVERAGE, _coverage.TIMM_MODULES
coverage_markdown, measure_coverage = _coverage.coverage_markdown, _coverage.measure_coverage
module_archs, plan_error = _coverage.module_archs, _coverage.plan_error

ROOT = Path(__file__).resolve().parents[2]


def _planned(row) -> int:
    """Archs of a coverage row that plan both a copy and a distillation."""
    return min(row.copy, row.distill)


def test_table_covers_exactly_the_declared_modules_with_timms_arch_counts():
    archs = module_archs()
    assert tuple(COVERAGE) == TIMM_MODULES
    assert {m: len(a) for m, a in archs.items()} == {m: r.archs for m, r in COVERAGE.items()}
    for row in COVERAGE.values():
        assert 0 <= _planned(row) <= row.archs


def test_every_family_file_covers_a_timm_module_and_no_module_twice():
    declared = [m.module for f in families() for m in f.modules]
    assert len(declared) == len(set(declared)) == len(COVERAGE)
    assert all(f.modules for f in families())


def test_every_family_has_cases_in_the_table():
    """Adding a family is its file, its docs rows and its cases in `cases.CASES`, which every shared suite runs."""
    assert {f.name for f in families()} == {case.family for case in CASES.values()}


def test_goal_at_least_95_percent_of_the_families_plan_a_transfer():
    total = sum(r.archs for r in COVERAGE.values())
    planned = sum(_planned(r) for r in COVERAGE.values())
    assert planned / total >= 0.95, (planned, total)
    assert all(_planned(r) > 0 for r in COVERAGE.values())


@pytest.mark.parametrize("module", TIMM_MODULES)
def test_first_arch_of_each_module_plans_as_the_table_says(module):
    """The module's first pretrained arch (timm's order) on the meta device: it plans copy and distill when
    the table counts the whole module, and is refused with a message otherwise."""
    row = COVERAGE[module]
    arch = module_archs([module])[module][0]
    errors = plan_error(arch)
    if _planned(row) == row.archs:
        assert errors == {"copy": None, "distill": None}, errors
    elif _planned(row) == 0:
        assert all(errors.values()), errors


@pytest.mark.slow
def test_measured_table_equals_the_data():
    """Every pretrained arch of the modules, teacher and mirrored student on the meta device."""
    rows, errors = measure_coverage()
    refused = {a: e for a, e in errors.items() if any(e.values())}
    assert rows == COVERAGE, refused


def test_docs_hold_the_table_generated_from_the_data():
    """The families page of the documentation site holds the table, generated from the families' declarations."""
    doc = "docs/families.md"
    assert coverage_markdown() in (ROOT / doc).read_text(), (
        f"{doc}: paste coverage_markdown() (python scripts/family_coverage.py)"
    )


def test_the_logits_table_names_every_family_file():
    """docs/families.md says what each family's logits add, by its adapter file: a new family file gets a row."""
    doc = (ROOT / "docs/families.md").read_text()
    table = doc[doc.index("## What each family's logits add") :].split("\n## ", 1)[0]
    folder = ROOT / "attnxfer" / "models" / "attention" / "families"
    named = {f.stem for f in folder.glob("*.py") if not f.name.startswith("_")}
    assert {f for f in named if f"`{f}.py`" not in table} == set(), "give each a row in the logits table"
