"""Every config key is one a reader can find in use: set by a built-in recipe (attnxfer/cfgs), written in a
code block of README.md or docs/ (a recipe, a ``key=value`` override, a Python mapping of overrides), or set
by a test's override. A key none of them sets is one nobody has run, shown or checked: give it an example
(or a test), or remove it with its old spelling kept (`attnxfer.config.renamed`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from attnxfer.config import RECIPES, config_keys

from .doc_pages import PAGES, ROOT

KEYS = frozenset(config_keys())
_TOP = frozenset(k for k in KEYS if "." not in k)
_FENCE = re.compile(r"^```\w*\n(.*?)^```", re.M | re.S)
# `key=value` (a CLI override, `--vary key=...`) and `"key": value` (a mapping of overrides); a key written
# inside a mapping key (data.kwargs.length) counts for the key that holds it
_OVERRIDE = re.compile(r"(?<![\w.\-/])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)=")
# a top-level key (seed, device, ...) only where a string (or, in the docs, a shell word) starts with it:
# ``seed=`` alone is a Python keyword argument
_TOP_IN_STRING = re.compile(r"[\"']([a-z_]+)=")
_TOP_IN_SHELL = re.compile(r"[\"'\s]([a-z_]+)=")
_MAPPING = re.compile(r"[\"']([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)[\"']\s*:")


def _schema_key(dotted: str) -> str | None:
    """The schema key ``dotted`` is, or sits inside (``data.kwargs.length`` -> ``data.kwargs``)."""
    parts = dotted.split(".")
    return next((k for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in KEYS), None)


def _set_in(data: Any, prefix: str = "") -> set[str]:
    """The schema keys a YAML mapping (a recipe, a study's students, a docs block) sets."""
    if not isinstance(data, Mapping):
        return set()
    found = set()
    for name, value in data.items():
        dotted = f"{prefix}{name}"
        if dotted in KEYS:
            found.add(dotted)
        elif isinstance(value, Mapping):
            found |= _set_in(value, dotted + ".")
        elif name == "students" and isinstance(value, list):
            found |= set().union(*(_set_in(s) for s in value))
        elif (key := _schema_key(dotted)) is not None:
            found.add(key)
    return found


def _in_text(texts: Iterable[str], top: re.Pattern[str]) -> set[str]:
    """The schema keys overrides in ``texts`` set (``top``: where a top-level key's override starts)."""
    found = set()
    for text in texts:
        names = _OVERRIDE.findall(text) + _MAPPING.findall(text)
        names += [n for n in top.findall(text) if n in _TOP]
        found |= {k for k in map(_schema_key, names) if k is not None}
    return found


def set_by_recipes() -> set[str]:
    return set().union(*(_set_in(yaml.safe_load(p.read_text())) for p in RECIPES.rglob("*.yaml")))


def shown_in_docs() -> set[str]:
    blocks = [b for page in PAGES for b in _FENCE.findall(page.read_text())]
    found = _in_text(blocks, _TOP_IN_SHELL)
    for block in blocks:
        with contextlib.suppress(yaml.YAMLError):  # a shell or Python block is no YAML
            found |= _set_in(yaml.safe_load(block))
    return found


def set_by_tests() -> set[str]:
    here = Path(__file__).resolve()
    files = [p for p in (ROOT / "tests").rglob("*.py") if p.resolve() != here]
    return _in_text((p.read_text() for p in files), _TOP_IN_STRING)


def test_every_config_key_is_set_by_a_recipe_shown_in_the_docs_or_set_by_a_test():
    unused = KEYS - set_by_recipes() - shown_in_docs() - set_by_tests()
    assert not unused, (
        f"config keys no recipe, docs example or test sets: {', '.join(k for k in config_keys() if k in unused)}; "
        "give each an example in docs/ (a key=value in a code block) or a test that sets it and checks its effect"
    )


def test_the_check_reads_each_source():
    """Each source on its own finds keys only it sets, so a broken reader cannot pass by another's luck."""
    recipes, docs, tests = set_by_recipes(), shown_in_docs(), set_by_tests()
    assert {"search.population", "mae.decoder_dim", "convert.stage1_lr"} <= recipes
    assert "transfer.mode" in docs and "transfer.mode" in tests
    assert _set_in({"data": {"kwargs": {"length": 8}}, "students": [{"name": "a", "optim.lr": 1}]}) == {
        "data.kwargs",
        "optim.lr",
    }
    shell = 'x "optim.blr": 1 attnxfer train data.kwargs.length=8 run_dir=r'
    assert _in_text([shell], _TOP_IN_SHELL) == {"optim.blr", "data.kwargs", "run_dir"}
    assert _in_text(["f(seed=0, x.y=1)", 'g(["seed=1"])'], _TOP_IN_STRING) == {"seed"}
