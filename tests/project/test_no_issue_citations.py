"""Comments, docstrings, test names and docs say what a thing is and why, never which tracker entry added it.

A number from the tracker means nothing to a reader of the code, and goes stale as the tracker moves on. This
greps the tracked source and doc files for such citations and names each one as file:line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACES = ("attnxfer", "tests", "benchmarks", "docs", "scripts", ".ci", "README.md")
WORD = "iss" + "ue"  # spelt in two parts so that this file's own text does not match
# "<word> 14", "<word>s 2", "<word> #7", "<word>-14"; not a path such as a URL's ".../<word>s/12"
CITATION = re.compile(rf"(?<![/\w]){WORD}(?:s? ?#?[0-9]{{1,3}}\b|-[0-9])", re.IGNORECASE)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", *PLACES], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    paths = [ROOT / p for p in out.split("\0") if p]
    return [p for p in paths if p.is_file()]


def test_the_pattern_finds_citations_and_passes_plain_words():
    for cited in (
        f"{WORD} 14",
        f"{WORD.title()} 25 (items 1, 2)",
        f"{WORD}s 2 and 5",
        f"{WORD} #7",
        f"{WORD}-14",
    ):
        assert CITATION.search(cited), cited
    for plain in (f"the {WORD}'s targets", f"every_{WORD}_type", f"https://github.com/o/r/{WORD}s/12"):
        assert not CITATION.search(plain), plain


def test_no_source_or_doc_file_cites_a_tracker_number():
    files = _tracked_text_files()
    assert any(p.suffix == ".py" for p in files)  # git saw the tree
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (a figure)
        for n, line in enumerate(text.splitlines(), 1):
            if CITATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "say what it is and why, not which tracker entry added it:\n" + "\n".join(hits)
