"""docs/configuration.md is generated from the schema (`scripts/config_reference.py`) and stays so.

The page lists every key with its type, default, accepted values, resume rules and the comment the schema
writes above (or beside) it. It is committed, so that the site and a reader on GitHub see it; these tests
fail while it differs from what the generator writes for the schema of the same commit, and while the
generator leaves out a key or a comment. Regenerate with ``python scripts/config_reference.py
docs/configuration.md``.
"""

from __future__ import annotations

import importlib
import re

from helpers import script_module

from attnxfer.config import RESUMABLE_KEYS, TrainConfig, config_keys
from attnxfer.config.keys import leaves

from .doc_pages import ROOT

_reference = script_module("config_reference")
field_comments, reference_markdown = _reference.field_comments, _reference.reference_markdown

PAGE = ROOT / "docs" / "configuration.md"


def _rows(text: str) -> dict[str, list[str]]:
    """Key -> its table cells, from the generated Markdown (cells split on unescaped pipes)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.replace("\\|", "\0").strip("|").split("|")]
            rows[cells[0].strip("`")] = [c.replace("\0", "|") for c in cells]
    return rows


def test_the_committed_page_is_what_the_generator_writes():
    assert PAGE.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `python scripts/config_reference.py docs/configuration.md`"
    )


def test_every_key_of_the_schema_has_one_row_in_declaration_order():
    rows = _rows(reference_markdown())
    assert list(rows) == config_keys()


def test_each_row_says_what_the_schema_declares():
    rows = _rows(reference_markdown())
    for leaf in leaves(TrainConfig):
        accepts, resume, search = rows[leaf.name][3:6]
        assert resume == ("yes" if leaf.name in RESUMABLE_KEYS else "no"), leaf.name
        assert search == ("yes" if leaf.search_resumable else "no"), leaf.name
        for choice in leaf.range.choices or ():
            shown = f"`{choice}`" if choice else '`""`'
            assert shown in accepts, (leaf.name, choice)
    assert rows["optim.lr"][1:5] == ["`float | None`", "`null`", "> 0", "yes"]
    assert rows["seed"][3] == "0 ≤ x ≤ 4294967295" and rows["log.trackers"][2] == "`[tensorboard]`"
    assert rows["data.batch_size"][2:4] == ["`128`", "≥ 1"] and rows["model.kwargs"][2] == "`{}`"


def test_every_comment_of_the_schema_reaches_its_row():
    """A field's comment lines (the block above it and the one beside it) are its row's description."""
    comments = field_comments()
    rows = _rows(reference_markdown())
    described = 0
    for leaf in leaves(TrainConfig):
        text = comments.get((leaf.owner.__name__, leaf.name.rsplit(".", 1)[-1]), "")
        assert rows[leaf.name][-1] == text, leaf.name
        described += bool(text)
    assert described > 60  # most keys say what they are: the extraction is not vacuous
    # a block of several lines above a field, and a comment beside one, both arrive whole
    assert comments[("OptimConfig", "layer_decay_rule")].startswith(
        "Which block gets which power of layer_decay"
    )
    assert "decay^1 under timm, 1.0 under attention_transfer" in comments[("OptimConfig", "layer_decay_rule")]
    assert comments[("DataConfig", "batch_size")] == "per process"


def _exists(dotted: str) -> bool:
    """A dotted name is a module, or an attribute path inside the longest module prefix that imports."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_attnxfer_name_the_config_points_to_exists():
    """The schema's comments (the reference page) and the renamed keys' messages (what a user with an old
    config reads) send readers to attnxfer modules and functions: each name given still exists there."""
    config = ROOT / "attnxfer" / "config"
    names = set()
    for source in ("schema.py", "renamed.py"):
        names |= set(re.findall(r"\battnxfer(?:\.[A-Za-z_]\w*)+", (config / source).read_text()))
    assert "attnxfer.apps.run.evaluation.evaluate_run" in names  # the scan is not vacuous
    assert [n for n in sorted(names) if not _exists(n)] == []


def test_comments_belong_to_the_field_below_them_only():
    source = """
@dataclass
class Section:
    # about a
    # still about a
    a: int = key(1, range=ANY)  # beside a

    b: int = key(2, range=ANY)
    # about c
    c: int = key(
        3, range=ANY  # inside c's call
    )
"""
    comments = field_comments(source)
    assert comments[("Section", "a")] == "about a still about a beside a"
    assert comments[("Section", "b")] == ""
    assert comments[("Section", "c")] == "about c inside c's call"


def test_a_key_and_its_comment_reach_the_page():
    """The generator reads the schema it is given: a new section's key arrives with its type, default, range,
    resume rule and comment, and the section's docstring heads its table."""
    source = '''
from dataclasses import dataclass

from attnxfer.config.keys import POSITIVE, key, section


@dataclass
class ProbeSection:
    """What the probe section is for."""

    # how far the probe reaches
    reach: float = key(2.5, range=POSITIVE, resumable=True)  # in metres


@dataclass
class ProbeConfig:
    probe: ProbeSection = section(ProbeSection)
'''
    namespace: dict = {}
    exec(compile(source, "probe_schema.py", "exec"), namespace)
    page = reference_markdown(namespace["ProbeConfig"], source)
    assert "## `probe`\n\nWhat the probe section is for." in page
    assert _rows(page) == {
        "probe.reach": [
            "`probe.reach`",
            "`float`",
            "`2.5`",
            "> 0",
            "yes",
            "no",
            "how far the probe reaches in metres",
        ]
    }
    assert "A resumed run may change every key of this section." in page


def test_a_section_one_command_reads_says_which():
    page = reference_markdown()
    for section, command in (("convert", "convert"), ("mae", "pretrain"), ("search", "search")):
        body = page.split(f"## `{section}`\n", 1)[1].split("\n## ", 1)[0]
        assert f"Read by `attnxfer {command}` alone" in body, section
    assert page.count("Read by `attnxfer") == 3
    transfer = page.split("## `transfer`\n", 1)[1].split("\n## ", 1)[0]
    assert "Not read by `attnxfer pretrain`" in transfer and page.count("Not read by") == 1
