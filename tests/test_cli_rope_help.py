"""`attnxfer convert --help` lists every registered zoo attention with what a rope teacher does to its map
kind: the answers the attention classes declare themselves (`rope_keeps_map_kind`, `rope_why`, gathered by
`rope_support`). The help's table is a torch-free copy (tests/test_cli_startup.py keeps `--help` light)."""

from __future__ import annotations

import pprint

import pytest

from attnxfer.launch.cli import main
from attnxfer.launch.rope_help import ROPE_SUPPORT
from attnxfer.models.efficient.base import rope_support


def _help_rows(text: str) -> dict[str, tuple[str, str]]:
    """name -> (answer, why) from the help's rope table (a row's wrapped lines joined)."""
    table = text.split("(no: a rope teacher is refused for that attention, with the reason below)\n", 1)[1]
    rows: dict[str, list[str]] = {}
    for line in table.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            name, answer, why = line.split(maxsplit=2)
            rows[name] = [answer, why]
        elif line.strip():
            rows[name][1] += " " + line.strip()
    return {name: (answer, why) for name, (answer, why) in rows.items()}


def test_convert_help_names_each_attention_with_its_rope_answer(capsys):
    with pytest.raises(SystemExit) as done:
        main(["convert", "--help"])
    assert done.value.code == 0
    rows = _help_rows(capsys.readouterr().out)
    declared = rope_support()
    assert set(rows) == set(declared)
    for name, (keeps, why) in declared.items():
        assert rows[name] == ("yes" if keeps else "no", " ".join(why.split())), name


def test_the_help_table_is_a_copy_of_the_attentions_declarations():
    declared = rope_support()
    assert declared == ROPE_SUPPORT, (
        "attnxfer/launch/rope_help.py ROPE_SUPPORT is out of date; its entries should be:\n"
        + pprint.pformat(declared, width=120)
    )
