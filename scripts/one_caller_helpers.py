"""Count the one-caller helpers in attnxfer/: functions of at most two statements called from exactly one place.

The rule in docs/architecture.md ("What belongs together") folds such a helper back into its caller unless
its name says something the caller's code would not (a registry entry, a protocol's method, a name tests
call). This script is how the count is measured:

- a function is every ``def`` under attnxfer/ (module functions, methods, nested functions), dunders apart;
- its statements are the top-level statements of its body after the docstring;
- its callers are the calls ``name(...)`` or ``obj.name(...)`` anywhere under attnxfer/, every ``def`` of
  that name counted together (so a method that implements a protocol is counted once per definition);
- a decorated function is kept apart (``@property``, ``@register_*``, ``@staticmethod`` ...): it is reached
  through its decorator, not only by its call, and is listed under "decorated".

    python scripts/one_caller_helpers.py            # the count, then each helper as file:line name
    python scripts/one_caller_helpers.py --count    # the count alone
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _body_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
    body = node.body
    first = body[0] if body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return body[1:]
    return body


def one_caller_helpers(package: Path) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    """(helpers, decorated): each a list of (file, line, name), the second the decorated ones kept apart."""
    defs: dict[str, list[tuple[str, int, int, bool]]] = collections.defaultdict(list)
    calls: collections.Counter[str] = collections.Counter()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(package.parent))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                statements = len(_body_without_docstring(node))
                defs[node.name].append((where, node.lineno, statements, bool(node.decorator_list)))
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name):
                    calls[func.id] += 1
                elif isinstance(func, ast.Attribute):
                    calls[func.attr] += 1
    helpers, decorated = [], []
    for name, places in defs.items():
        if name.startswith("__") or calls[name] != 1:
            continue
        for where, line, statements, is_decorated in places:
            if statements <= 2:
                (decorated if is_decorated else helpers).append((where, line, name))
    return sorted(helpers), sorted(decorated)


def main(argv: list[str]) -> None:
    helpers, decorated = one_caller_helpers(ROOT / "attnxfer")
    if "--count" in argv:
        print(len(helpers))
        return
    print(f"one-caller helpers of <= 2 statements: {len(helpers)} (decorated, kept apart: {len(decorated)})")
    for where, line, name in helpers:
        print(f"  {where}:{line} {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
