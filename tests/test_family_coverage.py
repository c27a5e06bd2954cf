"""The family table: which of timm's pretrained transformers (flat and hierarchical) plan a transfer (meta device, no weights).

`attnxfer.transfer.coverage.FAMILY_COVERAGE` is the table as data; the slow test re-measures it from
timm's registry and must find exactly it, the fast ones check a sample arch per family and the docs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attnxfer.transfer.coverage import (
    FAMILIES,
    FAMILY_COVERAGE,
    coverage_markdown,
    family_archs,
    measure_coverage,
    plan_error,
)

ROOT = Path(__file__).resolve().parents[1]


def test_table_covers_exactly_the_families_with_timms_arch_counts():
    archs = family_archs()
    assert tuple(FAMILY_COVERAGE) == FAMILIES
    assert {f: len(a) for f, a in archs.items()} == {f: r.archs for f, r in FAMILY_COVERAGE.items()}
    for row in FAMILY_COVERAGE.values():
        assert 0 <= row.planned <= row.archs


def test_goal_at_least_95_percent_of_the_families_plan_a_transfer():
    total = sum(r.archs for r in FAMILY_COVERAGE.values())
    planned = sum(r.planned for r in FAMILY_COVERAGE.values())
    assert planned / total >= 0.95, (planned, total)
    assert all(r.planned > 0 for r in FAMILY_COVERAGE.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_first_arch_of_each_family_plans_as_the_table_says(family):
    """The family's first pretrained arch (timm's order) on the meta device: it plans copy and distill when
    the table counts the whole family, and is refused with a message otherwise."""
    row = FAMILY_COVERAGE[family]
    arch = family_archs([family])[family][0]
    errors = plan_error(arch)
    if row.planned == row.archs:
        assert errors == {"copy": None, "distill": None}, errors
    elif row.planned == 0:
        assert all(errors.values()), errors


@pytest.mark.slow
def test_measured_table_equals_the_data():
    """Every pretrained arch of the families, teacher and mirrored student on the meta device."""
    rows, errors = measure_coverage()
    refused = {a: e for a, e in errors.items() if any(e.values())}
    assert rows == FAMILY_COVERAGE, refused


def test_docs_hold_the_table_generated_from_the_data():
    table = coverage_markdown()
    for doc in ("README.md", "docs/architecture.md"):
        assert table in (ROOT / doc).read_text(), (
            f"{doc}: paste coverage_markdown() (python -m attnxfer.transfer.coverage)"
        )
