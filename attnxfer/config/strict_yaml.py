"""The one YAML reader for what users write. Not ``yaml.safe_load``: it keeps the last of two equal keys
without a word (``max_steps`` twice trains with whichever came last); here that is an error at its line, and
every YAML error is one line saying where (``describe_yaml_error``), not pyyaml's multi-line report."""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml import YAMLError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_HINTS = {  # pyyaml's words for the most common slips, and what they mean
    "'\\t'": "YAML indents with spaces, not tabs",
    "<block end>": "check this line's indentation against the lines above it",
    # several configs in one file (a study's --print-config prints one per student): a run reads one
    "another document": "a config file holds one YAML document: keep one of those --- separates",
}
_MERGE_TAG = "tag:yaml.org,2002:merge"  # ``<<: *anchor``: its keys may be restated on purpose


class DuplicateKeyError(ConstructorError):
    """A mapping that gives the same key twice; ``problem_mark`` is the second one."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping giving one key twice (keys compared as the dict would)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._open_anchors: list[str | None] = []  # the anchors of the values being composed, outermost first

    def get_single_node(self) -> Node | None:
        self._root = super().get_single_node()  # kept to name a repeated key by its dotted path
        return self._root

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        """Refuses an alias inside the mapping or list its anchor names (``kwargs: &x {depth: *x}``): a value
        that holds itself, which every later reader of the config (printing, copying) recursed on forever."""
        event = self.peek_event()
        if isinstance(event, AliasEvent) and event.anchor in self._open_anchors:
            raise ComposerError(
                None,
                None,
                f"*{event.anchor} is inside the value &{event.anchor} names: a config value cannot hold itself",
                event.start_mark,
            )
        anchor = event.anchor if isinstance(event, (MappingStartEvent, SequenceStartEvent)) else None
        self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                _refuse_colon_without_space(node, key_node, value_node)
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeConstructor's own error says so
                    continue
                if first is not key_node:
                    path = ".".join([*_path_to(self._root, node), str(key)]).replace(".[", "[")
                    at = first.start_mark
                    first_at = f"line {at.line + 1}" + (
                        f", column {at.column + 1}" if at.line == key_node.start_mark.line else ""
                    )
                    raise DuplicateKeyError(
                        None,
                        None,
                        f"key {path!r} is given twice (first on {first_at}); keep one of them",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 (and every reader) writes them: YAML 1.1, pyyaml's, reads 010 as octal 8, 1:30 as 90 and
# a revision 0123 as 83; here they stay strings, which a number's key refuses and a string's key keeps. 1e-3 is
# a float, as 1.0e-3 is.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_int(loader: yaml.SafeLoader, node: ScalarNode) -> int:
    """pyyaml's int, but past Python's limit on decimal digits (4300: ``int(str)`` refuses more) an error at
    the number's line, not a ValueError traceback from inside the reader."""
    try:
        return loader.construct_yaml_int(node)
    except ValueError:
        raise ConstructorError(
            None,
            None,
            f"an integer of {len(node.value)} characters is too large for any config value",
            node.start_mark,
        ) from None


_UniqueKeyLoader.add_constructor(_INT, _construct_int)


class Dumper(yaml.SafeDumper):
    """Quotes a string `load_yaml` reads as a number (1e3), as it quotes those YAML 1.1 reads so (1.5, 010):
    a config.yaml reads back as written."""


for _cls in (_UniqueKeyLoader, Dumper):
    _cls.add_implicit_resolver(
        _INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x(?!_)[0-9a-fA-F_]+|0b(?!_)[01_]+)$"), "-+0123456789"
    )
    _cls.add_implicit_resolver(
        _FLOAT,
        re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+.0123456789"),
    )
    # Python's None, as timm's docs and these spell it, is null (in a file as on the command line); 'None' the text
    _cls.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])


def _refuse_colon_without_space(mapping: MappingNode, key: Node, value: Node) -> None:
    """``{window_size:0}`` is, to YAML, the key 'window_size:0' with no value: a slip, never meant."""
    typed = isinstance(key, ScalarNode) and key.style is None and ":" in key.value
    if mapping.flow_style and typed and isinstance(value, ScalarNode) and value.value == "":
        name, _, given = key.value.partition(":")
        raise ConstructorError(
            None,
            None,
            f"{key.value!r} is read as a key without a value: YAML needs a space after the colon "
            f"({{{name}: {given}}}, not {{{name}:{given}}})",
            key.start_mark,
        )


def _path_to(root: Node | None, target: Node) -> list[str]:
    """The keys (and list indices) from the document's root down to ``target``; [] when it is the root."""
    stack: list[tuple[Node, list[str]]] = [(root, [])] if root is not None else []
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, MappingNode):
            stack.extend((value, [*path, str(key.value)]) for key, value in node.value)
        elif isinstance(node, SequenceNode):
            stack.extend((item, [*path, f"[{i}]"]) for i, item in enumerate(node.value))
    return []


def load_yaml(text: str) -> Any:
    """``text`` parsed as safe YAML; a repeated key raises `DuplicateKeyError`, bad YAML a `YAMLError`."""
    try:
        loader = _UniqueKeyLoader(text)  # the reader checks every character here, before any parsing
    except yaml.reader.ReaderError as e:  # marked by its offset alone: say its line and column instead
        line_start = text.rfind("\n", 0, e.position) + 1
        mark = yaml.Mark(
            "<text>", e.position, text.count("\n", 0, e.position), e.position - line_start, None, None
        )
        problem = (
            f"character U+{e.character:04X} is not allowed in YAML"
            if isinstance(e.character, int)
            else e.reason
        )
        raise yaml.MarkedYAMLError(problem=problem, problem_mark=mark) from None
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_value(value: Any) -> str:
    """A value as YAML writes it on one line (null, 16, [a, b])."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def describe_yaml_error(e: YAMLError) -> str:
    """One line: where in the text (line and column, 1-based) and what is wrong there."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = e.problem or e.context or "not valid YAML"
        if e.context and e.problem and e.context_mark and mark and e.context_mark.line != mark.line:
            what += f" ({e.context} on line {e.context_mark.line + 1})"
        what += "".join(f"; {hint}" for sign, hint in _HINTS.items() if sign in what)
        return where + " ".join(what.split())
    return " ".join(str(e).split())
