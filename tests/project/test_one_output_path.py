"""attnxfer speaks one way: every line goes through `attnxfer.speak` (one logger, one main-rank filter), so no
module prints on its own, keeps its own logger, or gates output on the rank in its own spelling."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "attnxfer"

# The one module that owns output; and onnx_export, which quiets torch's own logger (not attnxfer output)
# around the export call.
ALLOWED_LOGGING = {"speak.py", "checkpoints/onnx_export.py"}


def _calls_and_imports(path: Path):
    """(line, what) for every print() call, `import logging` and logging.getLogger(...) in one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            yield node.lineno, "print("
        elif isinstance(node, ast.Import) and any(a.name == "logging" for a in node.names):
            yield node.lineno, "import logging"
        elif isinstance(node, ast.ImportFrom) and node.module == "logging":
            yield node.lineno, "from logging import"
        elif isinstance(node, ast.Attribute) and node.attr == "getLogger":
            yield node.lineno, "logging.getLogger"


def test_no_print_or_logging_outside_speak():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, what in _calls_and_imports(path):
            if what == "print(" and rel == "speak.py":
                continue
            if what != "print(" and rel in ALLOWED_LOGGING:
                continue
            offenders.append(f"attnxfer/{rel}:{line}: {what} (use attnxfer.speak: say/warn/debug)")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_each_spelling(tmp_path):
    """The check above would pass on a tree it cannot read: it must see each way of printing or logging."""
    sample = tmp_path / "m.py"
    sample.write_text(
        "import logging\nfrom logging import getLogger\nlog = logging.getLogger(__name__)\nprint('x')\n"
    )
    assert [what for _, what in sorted(_calls_and_imports(sample))] == [
        "import logging",
        "from logging import",
        "logging.getLogger",
        "print(",
    ]
