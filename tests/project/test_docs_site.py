"""The documentation site (mkdocs.yml + docs/) builds in strict mode, and README.md stays a front page.

`mkdocs build --strict` turns every warning into an error: a link to a page or an anchor that does not exist,
a page left out of the nav (mkdocs.yml's ``validation`` says which checks warn). The build writes into a
temporary folder, never into the repository. The figures the pages show come from real runs
(`scripts/docs_figures.sh` makes each one again) and none lies unused in docs/figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .doc_pages import DOCS_DIR, PAGES, ROOT, nav_pages, page_name

README = ROOT / "README.md"
FIGURES = DOCS_DIR / "figures"
FIGURE_SCRIPT = ROOT / "scripts" / "docs_figures.sh"
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")


def _tracked_changes() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout


@pytest.mark.slow
def test_the_site_builds_in_strict_mode_outside_the_repository(tmp_path):
    before = _tracked_changes()
    site = tmp_path / "site"
    build = ["build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)]
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", *build],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for page in nav_pages():
        assert (site / page.removesuffix(".md").replace("index", "") / "index.html").is_file(), page
    assert _tracked_changes() == before  # nothing written into the repository


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    pages = {p.relative_to(DOCS_DIR).as_posix() for p in DOCS_DIR.rglob("*.md")}
    nav = nav_pages()
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    assert set(nav) == pages, (
        f"not in the nav: {pages - set(nav)}; in the nav, no such page: {set(nav) - pages}"
    )


def test_the_docs_tests_read_every_page_of_the_site():
    """test_docs.py and test_doc_refs.py read `PAGES`: README and every page the site builds."""
    read = {page_name(p) for p in PAGES}
    assert {f"docs/{p}" for p in nav_pages()} | {"README.md"} == read


def test_readme_is_a_front_page():
    """Short (room is kept for a section to come), and free of lab notes: dated measurements and commit hashes
    belong to the docs pages that name their device and commit (docs/benchmarks.md, docs/demo-results.md)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text), "a date in README.md"
    assert not re.findall(r"`[0-9a-f]{7,40}`", text), "a commit hash in README.md"
    for command in (
        "bash scripts/install.sh && .venv/bin/attnxfer demo",
        "bash scripts/install.sh && bash scripts/test.sh",
    ):
        assert f"```bash\n{command}\n```" in text, command
    assert "bash scripts/install.sh && bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _shown_figures() -> dict[str, set[str]]:
    """figure file name -> the pages that show it (README's paths start at the repository, docs' at docs/)."""
    shown: dict[str, set[str]] = {}
    for page in PAGES:
        for target in _IMAGE.findall(page.read_text()):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page_name(page)}: {target} does not exist"
            assert path.parent == FIGURES, f"{page_name(page)}: {target}: pictures live in docs/figures"
            shown.setdefault(path.name, set()).add(page_name(page))
    return shown


def test_every_figure_is_shown_and_can_be_made_again():
    """No stale figure lies in docs/figures, and the script that makes the figures from real runs names each."""
    shown = _shown_figures()
    on_disk = {p.name for p in FIGURES.glob("*.png")}
    assert set(shown) == on_disk, f"figures no page shows: {on_disk - set(shown)}"
    script = FIGURE_SCRIPT.read_text()
    unmade = [name for name in sorted(on_disk) if not re.search(rf"[/\"]{re.escape(name)}\"", script)]
    assert not unmade, f"{FIGURE_SCRIPT.name} does not make: {unmade}"
    assert {"README.md"} < set().union(*shown.values())  # README shows pictures (the test is not vacuous)


def test_the_demo_figures_come_from_the_last_demo_not_an_older_run_beside_it(tmp_path):
    """runs/docs/demo keeps an earlier demo's mae-<hash>/ and mae_study-<hash>/ when a recipe changes: the
    script took the reconstructions, the study's curves and the conversion's teacher by the hashes' sort
    order, so an older run's could become the docs' figure. The last demo names its own (results.json and the
    export it publishes at mae/export)."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / FIGURE_SCRIPT.name).write_text(FIGURE_SCRIPT.read_text())
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    demo = tmp_path / "runs" / "docs" / "demo"
    for name in ("curves", "attention", "agreement"):
        (demo / f"{name}.png").parent.mkdir(parents=True, exist_ok=True)
        (demo / f"{name}.png").write_text(name)
    for run in ("mae-00000000", "mae-77777777", "mae-ffffffff"):  # the demo's is in the middle
        (demo / run / "pictures").mkdir(parents=True)
        (demo / run / "pictures" / "val-reconstruction-step00000060.png").write_text(run)
        (demo / run / "export").mkdir()
        (demo / f"mae_study-{run[4:]}").mkdir()
        (demo / f"mae_study-{run[4:]}" / "study.png").write_text(run)
    (demo / "mae" / "export").mkdir(parents=True)
    (demo / "mae" / "export" / "model.safetensors").write_text("the demo's")
    current = {"run_dir": "runs/docs/demo/mae-77777777"}
    rows = {"copy": [{"run_dir": "runs/docs/demo/mae_study-77777777/copy"}], "scratch": [{"run_dir": "x-1"}]}
    (demo / "results.json").write_text(json.dumps({"teachers": {"mae": current}, "rows": rows}))
    fake = tmp_path / "attnxfer"  # the demo has run; convert and inspect say what they were given
    fake.write_text(
        '#!/bin/sh\necho "$@" >> calls.txt\nmkdir -p runs/docs/inspect_convert\n'
        "echo cls > runs/docs/inspect_convert/cls_maps_0_img0.png\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "ATTNXFER": str(fake), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", "scripts/docs_figures.sh", "demo", "convert"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    figures = tmp_path / "docs" / "figures"
    assert (figures / "mae_reconstructions.png").read_text() == "mae-77777777"
    assert (figures / "study_curves.png").read_text() == "mae-77777777"
    assert "teacher.spec=local-dir:runs/docs/demo/mae/export " in (tmp_path / "calls.txt").read_text()
