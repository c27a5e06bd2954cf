"""`attnxfer convert --help` lists every registered zoo attention with what a rope teacher does to its map
kind: the answers the attention classes declare themselves (`rope_keeps_map_kind`, `rope_why`, gathered by
`rope_support`), read from their source files without importing torch (tests/cli/test_cli_startup.py keeps
`--help` light), and the rope families as their files declare them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnxfer.launch.cli import main
from attnxfer.launch.rope_help import rope_families, rope_support_from_source
from attnxfer.models.attention import families, get_attention_class
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
    text = capsys.readouterr().out
    rows = _help_rows(text)
    declared = rope_support()
    assert set(rows) == set(declared)
    for name, (keeps, why) in declared.items():
        assert rows[name] == ("yes" if keeps else "no", " ".join(why.split())), name
    for family in families():
        assert (family.title in text) == family.rope, family.name


def test_the_source_reading_finds_what_the_classes_declare():
    """Every registered zoo attention, with its declaration as the imported class has it (inherited ones
    included); a declaration that is not a literal would show up here by name."""
    assert rope_support_from_source() == rope_support()
    assert rope_families() == sorted((f.title for f in families() if f.rope), key=_file_order)


def _install_lab_relu(install_package, call: str = "NAME") -> None:
    """A plug-in attention ``lab_relu`` (a ReLU-linear subclass) installed by an ``attnxfer.attentions`` entry point."""
    module = "from attnxfer.models import register_attention\nfrom attnxfer.models.efficient import ReLULinearAttention\n"
    module += (
        f"NAME = 'lab_relu'\n\n\n@register_attention({call})\nclass LabReLU(ReLULinearAttention):\n    pass\n"
    )
    install_package(
        {"labpkg/__init__.py": "", "labpkg/attention.py": module},
        "[attnxfer.attentions]\nx = labpkg.attention\n",
    )


@pytest.mark.parametrize("call", ["NAME", "name='lab_relu'"])
def test_a_name_given_as_the_cli_check_reads_it_has_its_row(install_package, call):
    """A registration by a module constant or by ``name=``, which the CLI's name check reads, has its row too."""
    _install_lab_relu(install_package, call)
    assert rope_support_from_source.__wrapped__()["lab_relu"] == rope_support()["lab_relu"]


def _file_order(title: str) -> str:
    return next(f.name for f in families() if f.title == title)


def test_conversion_docs_rope_table_is_what_the_classes_declare(install_package):
    """docs/conversion.md's table answers for every built-in zoo attention, as `--help` does: a new
    attention (or a changed answer) that the page leaves out would tell a reader nothing of it. An installed
    plug-in's attention is its package's to document, not attnxfer's page."""
    _install_lab_relu(install_package)
    page = (Path(__file__).parents[2] / "docs/conversion.md").read_text()
    table = page.split("| attention | rope keeps its map kind |")[1].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \| (.+) \|$", table, re.M)
    built_in = {
        n: a for n, a in rope_support().items() if get_attention_class(n).__module__.startswith("attnxfer.")
    }
    assert {name: (answer == "yes", why) for name, answer, why in rows} == built_in


def test_convert_help_says_what_stage_2_trains_by_default(capsys):
    """transfer.logit_distill is 0 unless set: the help must not promise logit distillation, and names the
    default stage 2 (labelled fine-tuning, or feature distillation without labels)."""
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with logit distillation" not in text, text
    assert "feature distillation" in text and "transfer.logit_distill" in text, text
