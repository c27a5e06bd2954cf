"""The documentation's pages, for the docs tests: README.md and every Markdown page of the site (docs/).

One list, so that every test that reads the docs (code blocks run, references checked) reads every page,
including pages added later or in sub-folders; `nav_pages` is what mkdocs.yml puts in the site's navigation.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = ROOT / "docs"
PAGES: list[Path] = [ROOT / "README.md", *sorted(DOCS_DIR.rglob("*.md"))]


def page_name(path: Path) -> str:
    """A page as the tests name it: its path from the repository root (``docs/copy.md``, ``README.md``)."""
    return path.relative_to(ROOT).as_posix()


def _walk(entries) -> list[str]:
    out = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += _walk(value) if isinstance(value, list) else [value]
    return out


def nav_pages() -> list[str]:
    """Every page mkdocs.yml's ``nav`` names, relative to docs/, in order."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return _walk(config["nav"])
