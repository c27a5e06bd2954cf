"""README.md and the documentation site's pages (docs/) name only files, folders, recipes, modules and names that exist.

Modules move, and prose does not follow them by itself. Checked here, without running anything:
every repository path the docs write (``attnxfer/...py``, ``tests/...py``, ``benchmarks/...py``,
``cfgs/...yaml``, ``scripts/...``, figures, and paths relative to a package such as ``train/optim.py`` or
``families/_projections.py``) is a file of the repository, a folder in backticks (`` `launch/slurm/` ``) is
one of its folders, a recipe name (``paper/vit_large_copy``) resolves, every dotted ``attnxfer.x.y`` imports
(a module, or a name of one), and a name the docs place in a file (`` `path.py` `name` ``,
`` `name` (`path.py`) ``, ``path.py::name``, ``train/optim.build_adamw``) is defined there, and a config
key in backticks (`` `transfer.ce_path` ``, `` `data.root=...` ``) is one the schema declares.
Not checked: paths whose first folder is not the repository's (``runs/...``, ``RUN_DIR/...``, MAE's
``util/lr_decay.py``), a file as it was at a revision (``git show REV:path``, `` `REV:path` ``), and the
class beside a bare adapter file name (README's family table: `` `WindowAttention` (`swin.py`) `` is
timm's class in timm's module).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import typing
from functools import cache
from pathlib import Path

import pytest

from attnxfer.config import ConfigError, TrainConfig, config_keys, resolve_recipe
from attnxfer.config.keys import field_types, leaves

from .doc_pages import PAGES, ROOT, page_name

DOCS = PAGES

#: dotted words that name something else than a module: the plug-ins' entry-point groups
NOT_MODULES = {"attnxfer.datasets", "attnxfer.losses", "attnxfer.attentions"}

_EXT = "(?:py|yaml|sh|md|png|toml)"
_START = r"(?<![\w./<>:~-])"  # not the middle of a longer path, a placeholder or a `REV:path`
_PATH = re.compile(_START + rf"((?:[A-Za-z_][\w-]*/)+[\w-]+\.{_EXT})(?![\w/])")
_FOLDER = re.compile(r"`((?:[A-Za-z_]\w*/)+)`")
_RECIPE_GROUPS = sorted(p.name for p in (ROOT / "attnxfer" / "cfgs").iterdir() if p.is_dir())
_RECIPE = re.compile(_START + rf"((?:{'|'.join(_RECIPE_GROUPS)})/\w*[A-Za-z0-9])(?![\w/.*<-])")
_KEYS = frozenset(config_keys())
#: keys whose value is a mapping: `model.kwargs.depth=4` sets one of its entries, as an override does
_MAPPINGS = tuple(
    f"{leaf.name}."
    for leaf in leaves(TrainConfig)
    if typing.get_origin(field_types(leaf.owner)[leaf.name.rsplit(".")[-1]]) is dict
)
_SECTIONS = sorted({k.split(".")[0] for k in _KEYS if "." in k})
_CONFIG_KEY = re.compile(rf"`((?:{'|'.join(_SECTIONS)})\.[a-z_][\w.]*)(?:=[^`]*)?`")
_DOTTED = re.compile(r"(?<![\w./\"'-])attnxfer(?:\.[A-Za-z_]\w*)+")
_NAME = r"[A-Za-z_][\w.]*"
_IN_FILE = [  # (path, name) pairs the docs write; `bare` marks the form whose bare file names are skipped
    (re.compile(rf"(?P<path>[\w/]+\.py)::(?P<name>{_NAME})"), False),
    (re.compile(rf"`(?P<path>[\w/]+\.py)` `(?P<name>{_NAME})"), False),
    (re.compile(rf"`(?P<name>{_NAME})(?:\([^`]*\))?` \(`(?P<path>[\w/]+\.py)`\)"), True),
    (re.compile(rf"`(?P<path>(?:[A-Za-z_]\w*/)+\w+)\.(?!{_EXT}\b)(?P<name>[A-Za-z_]\w*)"), False),
]


@cache
def _tracked() -> tuple[str, ...]:
    out = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return tuple(out.split())


@cache
def _folders() -> frozenset[str]:
    """Every folder name of the repository (``cfgs`` is a link to ``attnxfer/cfgs``)."""
    return frozenset(part for path in _tracked() for part in Path(path).parts[:-1]) | {"cfgs"}


@cache
def _text(doc: Path) -> str:
    """The doc without ``git show REV:path`` commands (a file as it was, named on purpose)."""
    return re.sub(r"git show \S+", "", doc.read_text())


def _ours(path: str) -> bool:
    return Path(path).parts[0] in _folders()


def _resolve(path: str) -> str | None:
    """The repository file a doc's path names: as written, under the package, or as a unique suffix."""
    for candidate in (path, f"attnxfer/{path}"):
        if (ROOT / candidate).is_file():
            return candidate
    ends = [t for t in _tracked() if t.endswith("/" + path)]
    return ends[0] if len(ends) == 1 else None


def _found(pattern: re.Pattern, group: int = 1) -> list[tuple[str, str]]:
    return sorted({(page_name(doc), m.group(group)) for doc in DOCS for m in pattern.finditer(_text(doc))})


def _paths() -> list[tuple[str, str]]:
    return [(doc, p) for doc, p in _found(_PATH) if _ours(p)]


def _in_file() -> list[tuple[str, str, str]]:
    out = set()
    for doc in DOCS:
        for pattern, skip_bare in _IN_FILE:
            for m in pattern.finditer(_text(doc)):
                path = m.group("path") if m.group("path").endswith(".py") else m.group("path") + ".py"
                if _ours(path) if "/" in path else not skip_bare:
                    out.add((page_name(doc), path, m.group("name")))
    return sorted(out)


def _importable(dotted: str) -> bool:
    """A module, or a name reached from the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _defined(source: str, name: str) -> bool:
    """``name`` (or ``Class.member``) is bound at the top of ``source`` (def, class, assignment, import), or
    is a string the module registers (``@register_attention("hashing")``: a registered name)."""
    tree = ast.parse(source)
    if "." not in name and any(isinstance(n, ast.Constant) and n.value == name for n in ast.walk(tree)):
        return True
    body = tree.body
    for part in name.split("."):
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.asname or a.name for a in node.names]
            else:
                names = []
            if part in names:
                found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def test_the_checks_see_the_docs_references():
    """Not vacuous: the docs name many paths, folders, recipes, modules and placed names."""
    paths = [p for _, p in _paths()]
    assert len(paths) > 80
    for prefix in ("attnxfer/", "tests/", "benchmarks/", "cfgs/", "scripts/", "docs/figures/"):
        assert any(p.startswith(prefix) for p in paths), prefix
    assert "checkpoints/run_dir.py" in paths  # relative to the package
    assert ("docs/architecture.md", "launch/slurm/") in _found(_FOLDER)
    assert ("README.md", "paper/vit_large_copy") in _found(_RECIPE)
    assert len(_found(_DOTTED, 0)) > 10
    assert ("docs/architecture.md", "train/optim.py", "build_adamw") in _in_file()


@pytest.mark.parametrize(
    ("bad", "ok"),
    [
        ("`attnxfer/launch/slurm.py`", "`attnxfer/launch/slurm/options.py`"),
        ("`apps/world.py`", "`apps/search.py`"),
    ],
)
def test_a_moved_path_would_fail(bad, ok):
    assert _resolve(_PATH.search(bad).group(1)) is None
    assert _resolve(_PATH.search(ok).group(1)) is not None


def test_a_moved_module_or_name_would_fail():
    assert not _importable("attnxfer.checkpoints.store_io")
    assert not _importable("attnxfer.transfer.ce_select.no_such_name")
    assert _importable("attnxfer.launch.slurm") and _importable("attnxfer.transfer.ce_select.layer_shapes")
    source = (ROOT / "attnxfer/checkpoints/run_dir.py").read_text()
    assert _defined(source, "RunDir.load_student") and not _defined(source, "RunDir.no_such_method")
    assert not _defined(source, "no_such_function")
    renamed = _CONFIG_KEY.search("set `transfer.ce_pth=auto` there").group(1)
    assert renamed == "transfer.ce_pth" and renamed not in _KEYS and "transfer.ce_path" in _KEYS


def test_every_path_in_the_docs_exists():
    missing = [f"{doc}: {path}" for doc, path in _paths() if _resolve(path) is None]
    assert not missing, "paths the docs name that are not (or not uniquely) in the repository:\n" + "\n".join(
        missing
    )


def test_every_folder_in_the_docs_exists():
    missing = [
        f"{doc}: {folder}"
        for doc, folder in _found(_FOLDER)
        if _ours(folder) and not any((ROOT / base / folder).is_dir() for base in (".", "attnxfer"))
    ]
    assert not missing, "folders the docs name that are not in the repository:\n" + "\n".join(missing)


def test_every_recipe_in_the_docs_resolves():
    missing = []
    for doc, name in _found(_RECIPE):
        try:
            resolve_recipe(name)
        except ConfigError:
            missing.append(f"{doc}: {name}")
    assert not missing, "recipe names the docs write that do not resolve:\n" + "\n".join(missing)


def test_every_attnxfer_module_in_the_docs_imports():
    missing = [f"{doc}: {d}" for doc, d in _found(_DOTTED, 0) if d not in NOT_MODULES and not _importable(d)]
    assert not missing, "dotted names the docs write that do not import:\n" + "\n".join(missing)


def test_every_config_key_in_the_docs_is_declared():
    """A backticked ``section.key`` is a key of the schema (or a module under attnxfer: `train.measure`),
    unless it is a file name (`model.safetensors`)."""
    missing = [
        f"{doc}: {name}"
        for doc, name in _found(_CONFIG_KEY)
        if name not in _KEYS
        and not name.startswith(_MAPPINGS)
        and not name.endswith((".safetensors", ".json", ".yaml", ".py", ".md"))
        and not _importable(f"attnxfer.{name}")
    ]
    assert len(_found(_CONFIG_KEY)) > 50 and ("docs/distillation.md", "transfer.ce_path") in _found(
        _CONFIG_KEY
    )
    assert not missing, "config keys the docs write that the schema does not declare:\n" + "\n".join(missing)


def test_every_name_placed_in_a_file_is_defined_there():
    missing = []
    for doc, path, name in _in_file():
        where = _resolve(path)
        if where is None:
            missing.append(f"{doc}: {path} (no such file)")
        elif not _defined((ROOT / where).read_text(), name):
            missing.append(f"{doc}: `{name}` in {where}")
    assert not missing, "names the docs place in a file that does not define them:\n" + "\n".join(missing)
