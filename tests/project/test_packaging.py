"""The conda environment and pyproject name the same dependencies (conda can't be solved here: parse both)."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONDA_NAMES = {"pytorch": "torch"}  # conda package name -> PyPI name


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower().replace("-", "_")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]} | {
        _name(r) for r in project["optional-dependencies"]["test"]
    }
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    conda = {CONDA_NAMES.get(n, n) for n in conda}
    assert conda == wanted, f"only in environment.yml: {conda - wanted}; only in pyproject: {wanted - conda}"


def test_builtin_recipes_parse_and_ship_with_the_package():
    from attnxfer.config import RECIPES, list_recipes, load_config

    assert RECIPES.is_relative_to(ROOT / "attnxfer")
    names = list_recipes()
    assert {
        "demo/teacher",
        "demo/copy",
        "demo/distill",
        "demo/scratch",
        "paper/vit_large_copy",
        "paper/vit_large_distill",
    } <= set(names)
    large = load_config("paper/vit_large_distill")
    assert (large.transfer.mode, large.transfer.end_layer, large.transfer.atd_weight) == ("distill", -6, 3.0)
    assert (large.optim.blr, large.optim.beta2, large.optim.weight_decay, large.schedule.epochs) == (
        1e-4,
        0.95,
        0.3,
        200,
    )
    copy = load_config("paper/vit_large_copy")
    assert (copy.transfer.mode, copy.optim.layer_decay, copy.schedule.epochs) == ("copy", 0.75, 100)


_BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def test_every_marker_the_tests_use_is_declared_and_strict():
    """The fast lane (``-m "not slow and not slurm"``) selects by marker name: a misspelt marker (``slwo`` for ``slow``)
    would silently put a slow test in it. pyproject declares every marker the tests use, and
    ``--strict-markers`` makes an undeclared one a collection error."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = {m.split(":")[0].strip() for m in cfg["markers"]}
    assert {"slow", "slurm"} <= declared
    assert "--strict-markers" in cfg["addopts"].split()
    used = {
        name
        for path in (ROOT / "tests").rglob("*.py")
        for name in re.findall(r"pytest\.mark\.(\w+)", path.read_text())
    }
    assert "slow" in used and "slurm" in used  # the scan sees the markers (not vacuous)
    assert used - _BUILTIN_MARKS <= declared, (
        f"undeclared markers: {sorted(used - _BUILTIN_MARKS - declared)}"
    )


def test_a_run_from_a_clone_records_its_commit_and_whether_it_had_changes():
    """run.json's software record names the commit a result came from (``-dirty``: uncommitted changes in
    tracked files), so that a clone of it gives the same code back; a wheel's install records its version."""
    import subprocess

    from attnxfer.version import software_record

    clone = Path(__file__).resolve().parents[2]
    record = software_record()
    if not (clone / ".git").exists():
        assert "git_commit" not in record
        return
    head = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout
    changed = subprocess.run(
        ["git", "-C", str(clone), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout
    assert record["git_commit"] == head.strip() + ("-dirty" if changed.strip() else "")
