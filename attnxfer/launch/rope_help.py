"""What a teacher's rope does to each zoo attention's map kind, for `attnxfer convert --help`: read by text
(`ast`) from each attention's ``rope_keeps_map_kind``/``rope_why`` and each family's ``rope=True``, since
importing the attentions loads torch, which ``--help`` must not; and only when the help is printed, since
parsing the ~25 files costs every other command a noticeable fraction of a second.
tests/cli/test_cli_rope_help.py holds the table equal to what the imported classes declare.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.metadata
import sys
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..plugins import ATTENTION_GROUP
from .value_checks import _constants

_MODELS = Path(__file__).resolve().parents[1] / "models"
#: The epilog a parser names to get the rope table when its help is printed (`RopeHelpFormatter`).
ROPE_EPILOG = "{rope table: attnxfer.launch.rope_help}"
_DECLARED = ("rope_keeps_map_kind", "rope_why")


@dataclass
class _Class:
    """What one class statement of a zoo file says: its bases, its registered name, its rope declarations."""

    bases: list[str]
    registered: str | None = None
    declared: dict[str, object] = field(default_factory=dict)


def _name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _classes(paths: list[Path]) -> dict[str, _Class]:
    """Every class statement in the modules at ``paths``, by class name."""
    found: dict[str, _Class] = {}
    for path in paths:
        text = path.read_text(encoding="utf-8")
        constants = _constants(text)
        for node in ast.parse(text).body:
            if not isinstance(node, ast.ClassDef):
                continue
            # the name in a ``@register_attention(...)`` decorator, if any, written as the CLI's name check reads
            # it (`value_checks`): a literal, ``name=`` or a module constant
            calls = [d for d in node.decorator_list if isinstance(d, ast.Call)]
            names = [
                a for d in calls if _name(d.func) == "register_attention" for a in (*d.args, *d.keywords)
            ]
            said = (a.value if isinstance(a, ast.keyword) else a for a in names)  # its one parameter: `name`
            registered = next((constants.get(_name(n), getattr(n, "value", None)) for n in said), None)
            cls = _Class([_name(b) for b in node.bases], registered)
            for stmt in node.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
                value = getattr(stmt, "value", None)
                if _name(target) in _DECLARED and value is not None:
                    # a value that is no literal is left out: tests/cli/test_cli_rope_help.py names the attention
                    with contextlib.suppress(ValueError):
                        cls.declared[_name(target)] = ast.literal_eval(value)
            found[node.name] = cls
    return found


def _lookup(classes: dict[str, _Class], name: str, attr: str) -> object:
    """``attr`` as class ``name`` has it: its own declaration, else its bases' (left to right, depth first)."""
    cls = classes.get(name)
    if cls is None:
        return None
    if attr in cls.declared:
        return cls.declared[attr]
    found = (_lookup(classes, base, attr) for base in cls.bases)
    return next((value for value in found if value is not None), None)


def _is_zoo(classes: dict[str, _Class], name: str) -> bool:
    cls = classes.get(name)
    return cls is not None and any(b == "EfficientAttention" or _is_zoo(classes, b) for b in cls.bases)


def _plugin_files() -> list[Path]:
    """The files of the modules ``attnxfer.attentions`` entry points name, found as an import would find them
    (its finders, package by package) without running them: a package's own imports may load torch."""
    files = []
    for ep in importlib.metadata.entry_points(group=ATTENTION_GROUP):
        spec, path, parts = None, None, ep.module.split(".")
        for i in range(len(parts)):
            found = (
                f.find_spec(".".join(parts[: i + 1]), path) for f in sys.meta_path if hasattr(f, "find_spec")
            )
            spec = next(filter(None, found), None)
            if spec is None:
                break
            path = spec.submodule_search_locations
        if spec is not None and spec.has_location and spec.origin.endswith(".py"):
            files.append(Path(spec.origin))
    return files


@cache
def rope_support_from_source() -> dict[str, tuple[bool, str]]:
    """`attnxfer.models.efficient.base.rope_support()` read from the zoo's source and that of the modules
    installed packages name (``attnxfer.attentions`` entry points), importing nothing."""
    classes = _classes([*sorted((_MODELS / "efficient").glob("*.py")), *_plugin_files()])
    table = {
        cls.registered: (
            bool(_lookup(classes, name, _DECLARED[0])),
            str(_lookup(classes, name, _DECLARED[1])),
        )
        for name, cls in classes.items()
        if cls.registered and _is_zoo(classes, name)
    }
    return dict(sorted(table.items()))


@cache
def rope_families() -> list[str]:
    """The titles of the families whose blocks pass a rope (``Family(..., rope=True)``), by file name."""
    titles = []
    for path in sorted((_MODELS / "attention" / "families").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _name(node.func) == "Family":
                kw = {k.arg: k.value for k in node.keywords}
                if isinstance(kw.get("rope"), ast.Constant) and kw["rope"].value is True:
                    titles.append(ast.literal_eval(kw["title"]))
    return titles


def rope_epilog(width: int = 100) -> str:
    """Per zoo attention, whether a rope teacher's rotary embedding keeps its map kind, and why."""
    support = rope_support_from_source()
    name_w = max(map(len, support)) + 2
    lines = [
        f"rope teachers ({', '.join(rope_families())}): each convert.attention applies the",
        "teacher's rotary embedding to q and k before its feature map. Does that keep its map kind?",
        "(no: a rope teacher is refused for that attention, with the reason below)",
    ]
    for name, (keeps, why) in support.items():
        head = f"  {name:<{name_w}}{'yes' if keeps else 'no':<4}"
        body = textwrap.wrap(why, width - len(head)) or [""]
        lines.append(head + body[0])
        lines.extend(" " * len(head) + more for more in body[1:])
    return "\n".join(lines) + "\n"


class RopeHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw-description help with the rope table in place of `ROPE_EPILOG`, read only when printed."""

    def add_text(self, text: str | None) -> None:
        super().add_text(rope_epilog() if text == ROPE_EPILOG else text)
