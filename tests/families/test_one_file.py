"""One timm family, one file: what attnxfer knows about a family lives in its file under
``attnxfer/models/attention/families/``, and generic code asks the adapter or the family registry.

Kept by a tool, not a review: every source file of the package outside ``families/`` is parsed, and its
code (identifiers and string literals; comments and docstrings are prose, left out) is split into words.
A family's words are derived from its own declarations (its file name, the timm modules it covers, its
title, the timm classes its file adapts or refuses), minus the words that name no one family (shared by
several families' declarations, or generic: ``vit``, ``transformer``, ``attention``...). A family's words
may appear in at most one file outside ``families/`` (a test model registered beside the demo's micro ViTs,
say); a second file means family-specific code leaked out of its file. The modules of
``sources/transformers_format/`` are the same pattern for another format (one file per transformers model
type, mapping its checkpoints onto a family's timm model, found by the package without a list): they are
that type's one file, not generic code, and are left out; the package's own shared modules are not.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

from attnxfer.models.attention import families, list_adapters

PACKAGE = Path(__file__).resolve().parents[2] / "attnxfer"
FAMILY_DIR = PACKAGE / "models" / "attention" / "families"

#: Words in families' declarations that name no one family: what every timm ViT is, and what kind of module.
GENERIC = frozenset(("vit", "vision", "transformer", "attention"))


def _declaration_words(text: str) -> set[str]:
    """Lower-case words of a declaration (a file, module, class name or a title): its alphanumeric runs."""
    return {w.lower() for w in re.findall(r"[A-Za-z0-9]+", text) if len(w) >= 3 and not w.isdigit()}


def _code_words(text: str) -> set[str]:
    """Lower-case words of code: alphanumeric runs whole (``TransferPvtV2Attention``), and their camel-case
    parts (``pvt``), so a family's word is found wherever an identifier spells it."""
    out = set()
    for run in re.findall(r"[A-Za-z0-9]+", text):
        out.add(run.lower())
        out.update(p.lower() for p in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", run))
    return {w for w in out if len(w) >= 3}


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _code_of(path: Path) -> str:
    """A module's identifiers and non-docstring string literals (comments and docstrings are prose)."""
    docstrings: set[int] = set()
    texts = []
    for node in ast.walk(_tree(path)):  # parents before their children
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docstrings.add(id(body[0].value))
        if isinstance(node, ast.Name):
            texts.append(node.id)
        elif isinstance(node, ast.Attribute):
            texts.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            texts.append(node.name)
        elif isinstance(node, ast.arg | ast.keyword) and node.arg:
            texts.append(node.arg)
        elif isinstance(node, ast.alias):
            texts.append(node.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            texts.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts.append(node.value)
    return "\n".join(texts)


TRANSFORMERS_TYPES = PACKAGE / "sources" / "transformers_format"


def _outside_families() -> list[Path]:
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if FAMILY_DIR not in p.parents and not (p.parent == TRANSFORMERS_TYPES and not p.name.startswith("_"))
    ]


@cache
def _own_class_names() -> frozenset[str]:
    """Names of the classes attnxfer defines outside the family files (the zoo's ``WindowAttention``, say): a
    timm class of the same name says nothing about one family."""
    return frozenset(
        node.name.lower()
        for path in _outside_families()
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ClassDef)
    )


@cache
def _declared_words() -> dict[str, frozenset[str]]:
    """Each family's words, from its declarations: file name, title, timm modules, the timm classes it adapts;
    less the generic ones, attnxfer's own class names, and words two families of different names share."""
    classes: dict[str, set[str]] = defaultdict(set)  # family file -> timm class names it adapts
    for timm_class, adapter in list_adapters().items():
        classes[adapter.rsplit(".", 2)[-2]].add(timm_class.rsplit(".", 1)[-1])
    words = {}
    for family in families():
        texts = [family.name, family.title, *(m.module for m in family.modules), *classes[family.name]]
        words[family.name] = set().union(*map(_declaration_words, texts)) - GENERIC - _own_class_names()
    stem = {name: name.split("_")[0] for name in words}  # swin, swin_v2, swin_v2_cr: one stem
    shared = {w for a in words for b in words if stem[a] != stem[b] for w in words[a] & words[b]}
    return {name: frozenset(ws - shared) for name, ws in words.items()}


def test_every_family_names_words_of_its_own():
    words = _declared_words()
    assert set(words) == {f.name for f in families()}
    # the adapted classes' words are found by the adapter's file name: a family named otherwise would lose them
    files = {a.rsplit(".", 2)[-2] for a in list_adapters().values() if ".families." in a}
    assert files <= set(words), f"family files not named as their Family: {sorted(files - set(words))}"
    assert all(words.values()), {n: w for n, w in words.items() if not w}


def test_no_family_leaks_into_a_second_file_outside_its_own():
    words = _declared_words()
    found: dict[str, dict[str, set[str]]] = defaultdict(dict)
    for path in _outside_families():
        code = _code_words(_code_of(path))
        for family, own in words.items():
            if own & code:
                found[family][str(path.relative_to(PACKAGE))] = own & code
    leaks = {family: files for family, files in found.items() if len(files) > 1}
    assert not leaks, (
        "family-specific code outside its family file (ask the adapter or the registry):\n"
        + "\n".join(
            f"  {family}: " + "; ".join(f"{file} ({', '.join(sorted(w))})" for file, w in files.items())
            for family, files in leaks.items()
        )
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("pvt_v2_micro_56", {"pvt", "micro"}),
        ("TransferSwinV2Attention", {"transferswinv2attention", "transfer", "swin", "attention"}),
        ("NaFlexViT", {"naflexvit", "flex"}),
    ],
)
def test_code_words_split_identifiers_as_people_read_them(text, words):
    assert _code_words(text) == words


def test_the_declared_words_of_a_family_are_its_own_names():
    words = _declared_words()
    assert {"pvt", "pvtv2"} <= words["pvt_v2"]
    assert {"eva", "dinov3", "evaattention"} <= words["eva"]
    assert "swin" in words["swin"] & words["swin_v2"] & words["swin_v2_cr"]
    assert "windowattention" not in words["swin"]  # also the zoo's own class name
