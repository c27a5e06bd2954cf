"""The layering is kept by a tool, not by reviews: import-linter's contracts, plus the import rules they cannot see."""

import ast
import subprocess
import sys
from pathlib import Path

from helpers import script_module

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "attnxfer"


def test_layers_import_downward_only():
    """import-linter's contracts in pyproject.toml: launch > apps > train > checkpoints > sources > transfer >
    models | data > config; models import nothing of transfer/train/apps/launch; only apps and launch read
    configs. Run in a subprocess from the repository root, where pyproject.toml is."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout, run.stdout[-2000:]


def _local_attnxfer_imports(path: Path):
    """(line, module) of every attnxfer import made inside a function body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (
                node.level > 0 or (node.module or "").startswith("attnxfer")
            ):
                yield node.lineno, "." * node.level + (node.module or "")


def test_no_function_local_imports_below_launch():
    """A function-local import of attnxfer code hides a cycle. Only the CLI imports lazily (so that
    `attnxfer --help` does not load torch); everywhere else imports sit at the top of the module."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "launch":
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{line} imports {mod}" for line, mod in _local_attnxfer_imports(path)
        ]
    assert not offenders, "function-local imports of attnxfer modules:\n" + "\n".join(offenders)


#: the most one-caller helpers of <= 2 statements the package may hold (scripts/one_caller_helpers.py): the
#: rule in docs/architecture.md "What belongs together" folds a helper whose name adds nothing into its
#: caller; lower this as helpers are folded, never raise it to let one in
MAX_ONE_CALLER_HELPERS = 125


def test_one_caller_helpers_do_not_grow():
    """Code that is read together stays together: a two-line function called from one place is a fragment
    unless its name says something its caller's code would not (the count and how it is taken are in
    scripts/one_caller_helpers.py)."""
    helpers, _ = script_module("one_caller_helpers").one_caller_helpers(PACKAGE)
    listed = "\n".join(f"  {where}:{line} {name}" for where, line, name in helpers)
    assert len(helpers) <= MAX_ONE_CALLER_HELPERS, (
        f"{len(helpers)} one-caller helpers (at most {MAX_ONE_CALLER_HELPERS}): fold the new ones into "
        f"their caller, or say in the name what the caller's code would not:\n{listed}"
    )


def test_bare_import_loads_no_config_apps_or_launch():
    """`import attnxfer` gives the library (models, algorithm, sources, export), not the config schema,
    the apps or the CLI."""
    code = (
        "import sys, attnxfer; print(sorted({m.split('.')[1] for m in sys.modules "
        "if m.startswith('attnxfer.')} & {'config', 'apps', 'launch', 'train'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_style_is_ruffs():
    """One voice, kept by ruff (configured in pyproject.toml): lint clean and formatted."""
    ruff = [sys.executable, "-m", "ruff"]
    lint = subprocess.run([*ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-2000:]
    fmt = subprocess.run(
        [*ruff, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, "run `ruff format .`:\n" + fmt.stdout[-4000:] + fmt.stderr[-2000:]


#: the one module whose code steps an optimiser (`train_step`: the engine's loop and conversion's stage 1)
STEPPING_MODULE = PACKAGE / "train" / "engine.py"


def _optimiser_steps(path: Path) -> list[int]:
    """Lines of ``X.step(...)`` calls whose receiver is named as an optimiser or a grad scaler (``optimizer``,
    ``self.optimizer``, ``opt``, ``optim``, ``scaler``, ...)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step":
            receiver = ast.unparse(node.func.value).rsplit(".", 1)[-1].lower()
            if "optim" in receiver or receiver in ("opt", "scaler", "grad_scaler"):
                lines.append(node.lineno)
    return lines


def test_no_optimiser_step_outside_the_engine():
    """Every loop that trains (train, pretrain, convert's stages 1 and 2, studies, the search's fits) steps its
    optimiser through `attnxfer.train.engine.train_step`: a new loss or a new loop changes what is stepped,
    never how. A second ``optimizer.step()`` anywhere else in the package would be a loop of its own."""
    elsewhere = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != STEPPING_MODULE
        for line in _optimiser_steps(path)
    ]
    assert not elsewhere, "optimiser steps outside train/engine.py's train_step:\n" + "\n".join(elsewhere)
    assert len(_optimiser_steps(STEPPING_MODULE)) == 1, "train/engine.py steps an optimiser in one place"
