"""The configuration reference (docs/configuration.md), generated from the schema.

Every key is declared once, in `attnxfer/config/schema.py`: its type, default, range and resume rules are the
field, and what it means is the comment written above it (or beside it). This script reads both, the field
through `attnxfer.config.keys.leaves` and the comments from the schema's source, so the reference cannot say
something the schema does not. It makes docs only, so it lives here and not in the package.
tests/project/test_config_reference.py fails while the committed page differs from what this writes.

    python scripts/config_reference.py docs/configuration.md     # rewrite the page (no path: print it)
"""

from __future__ import annotations

import ast
import dataclasses
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # this checkout's attnxfer, whatever is installed

from attnxfer.config import schema
from attnxfer.config.keys import Leaf, Range, leaves, section_command, section_unread_by
from attnxfer.config.schema import TrainConfig

_INTRO = """\
# Configuration reference

<!-- Generated from attnxfer/config/schema.py by `python scripts/config_reference.py docs/configuration.md`:
edit the schema's comments, not this page (tests/project/test_config_reference.py compares them). -->

Every key a run reads, section by section, as `attnxfer/config/schema.py` declares it: its type, its default,
the values it accepts (a value outside them stops the command before any work, naming the key), whether a
resumed run may change it, and what it means. Set keys in a YAML file (`-c my.yaml`, or a built-in recipe
such as `-c demo/copy`) or as dotted overrides after it (`optim.lr=1e-3`); `--print-config` prints the
resolved config and exits. A section that one command alone reads (`convert`, `mae`, `search`) is in that
command's config only, and `transfer` is in every config but `attnxfer pretrain`'s: a run's `config.yaml`
and `--print-config` hold the sections its command reads (a config that holds a section its command does not
read still loads, but one of its keys set away from the default is refused, since the command would drop
it). How configs, overrides and resumes work: [Runs and configs](training.md).

**Resume** says whether a run resumed from its checkpoint may change the key (`yes`: each change is printed;
`no`: the run stops and names the key, since the checkpoint's weights, optimiser state or data position mean
something else under another value: start a new `run_dir` instead). **Search** says whether a resumed
`attnxfer search` may change it.
"""


def field_comments(source: str | None = None) -> dict[tuple[str, str], str]:
    """(section class name, field name) -> the comment written above the field plus the one beside it.

    The comment block above a field is the run of whole-line comments that ends on the line before it;
    the one beside it is any comment on the field's own lines. Both are joined into one sentence."""
    source = source if source is not None else Path(schema.__file__).read_text(encoding="utf-8")
    whole_line, trailing = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            own_line = not tok.line[: tok.start[1]].strip()
            (whole_line if own_line else trailing)[tok.start[0]] = text
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in whole_line:
                above.insert(0, whole_line[line])
                line -= 1
            beside = [trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing]
            text = " ".join(t for t in [*above, *beside] if t)
            out[(node.name, stmt.target.id)] = re.sub(r"\s+", " ", text).strip()
    return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _accepts(rule: Range) -> str:
    if rule.choices is not None:
        return ", ".join(f"`{c}`" if c else '`""`' for c in rule.choices)
    low = None if rule.low is None else f"{'>' if rule.low_open else '≥'} {_number(rule.low)}"
    high = None if rule.high is None else f"{'<' if rule.high_open else '≤'} {_number(rule.high)}"
    if low and high:
        return f"{_number(rule.low)} {'<' if rule.low_open else '≤'} x {high}"
    return low or high or "any"


def _type(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "")


def _default(leaf: Leaf) -> Any:
    f = next(f for f in dataclasses.fields(leaf.owner) if f.name == leaf.name.rsplit(".", 1)[-1])
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:g}"
        return text + ".0" if re.fullmatch(r"-?\d+", text) else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value) if value != "" else '""'


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _section_rows(section: str, keys: list[Leaf], comments: dict[tuple[str, str], str]) -> list[str]:
    rows = [
        "| key | type | default | accepts | resume | search | what it is |",
        "|---|---|---|---|---|---|---|",
    ]
    for leaf in keys:
        what = comments.get((leaf.owner.__name__, leaf.name.rsplit(".", 1)[-1]), "")
        rows.append(
            f"| `{leaf.name}` | `{_cell(_type(leaf.type))}` | `{_cell(_yaml(_default(leaf)))}` "
            f"| {_cell(_accepts(leaf.range))} | {'yes' if leaf.resumable else 'no'} "
            f"| {'yes' if leaf.search_resumable else 'no'} | {_cell(what)} |"
        )
    return rows


def reference_markdown(config: type = TrainConfig, source: str | None = None) -> str:
    """The whole reference page: the top-level keys, then one table per section in declaration order.

    ``config`` and ``source`` (the module that declares it) are the schema's unless given: the tests feed a
    schema of their own to see that a key and its comment reach the page."""
    comments = field_comments(source)
    grouped: dict[str, list[Leaf]] = {}
    for leaf in leaves(config):
        grouped.setdefault(leaf.name.split(".")[0] if "." in leaf.name else "", []).append(leaf)
    sections = {f.name: f for f in dataclasses.fields(config)}
    parts = [_INTRO]
    for name, keys in grouped.items():
        if not name:
            parts.append("## Top level\n")
        else:
            parts.append(f"## `{name}`\n")
            doc = sections[name].default_factory.__doc__ or ""
            doc = "" if doc.startswith(f"{sections[name].default_factory.__name__}(") else doc
            if doc:
                parts.append(re.sub(r"\s+", " ", doc).strip().replace("``", "`") + "\n")
            if command := section_command(sections[name]):
                parts.append(
                    f"Read by `attnxfer {command}` alone: only its config.yaml and `--print-config` hold this "
                    "section.\n"
                )
            if unread := section_unread_by(sections[name]):
                parts.append(
                    f"Not read by {', '.join(f'`attnxfer {c}`' for c in unread)}: its config.yaml and "
                    "`--print-config` leave this section out.\n"
                )
            if all(leaf.resumable for leaf in keys):
                parts.append("A resumed run may change every key of this section.\n")
        parts.append("\n".join(_section_rows(name, keys, comments)) + "\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    """``python scripts/config_reference.py [PATH]``: write the page to PATH, or print it."""
    if argv and (argv[0].startswith("-") or len(argv) > 1):
        # an option taken for a path once wrote the page to a file named "--help"
        sys.stdout.write(__doc__ or "")
        return 0 if argv[0] in ("-h", "--help") else 2
    text = reference_markdown()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
