"""No two modules of attnxfer import each other, directly or round a longer loop: a circle means two files
share one job (or one names the other's type), and it breaks as soon as either imports at load time. Read
from the source, `if TYPE_CHECKING:` imports included (a circle hidden behind one is still a circle).
Imports of a package (its ``__init__``, which re-exports its modules) are not edges: the layers contract
in pyproject.toml orders the packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__)."""
    out = {}
    for path in (ROOT / "attnxfer").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


def _imports(name: str, path: Path, is_init: bool, modules: dict) -> set[str]:
    """The attnxfer modules (not packages) that module ``name`` imports."""
    here = name.split(".") if is_init else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name and not modules[m][1]}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles_between_modules():
    modules = _modules()
    graph = {n: _imports(n, p, init, modules) for n, (p, init) in modules.items() if not init}
    assert _circles(graph) == []


def test_the_check_sees_a_circle():
    """The check itself: a loop of three is found (and a module leading into it is not part of it); a chain is none."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
