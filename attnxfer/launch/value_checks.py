"""The config values a registry checks (attention names), checked as the config loads, before torch is imported.

A closed set of values is a ``choices=`` key and the loader checks it (`attnxfer.config.keys`). The attention
names of ``model.attention`` and ``convert.attention`` are a registry's (`attnxfer.models.attention.registry`),
which takes torch and timm (seconds) to import: without this check a typo is found only after the teacher and
the data are built, or never, if one of them fails first. So the names are read by text from the decorators
that register them (``@register_attention("performer")``, ``register_parametric_attention(...)``) in
``attnxfer/models/``, in about a millisecond; where the registry is already imported (a Python session that
registered attentions of its own) it is asked instead. tests/cli/test_value_checks.py holds the text reading
equal to the imported registry.
"""

from __future__ import annotations

import difflib
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

from ..config import ConfigError

_MODELS = Path(__file__).resolve().parents[1] / "models"
#: the files that register attentions: softmax's and the zoo's
_REGISTERING = ("attention/softmax.py", "efficient/*.py")
_REGISTRY_MODULE = "attnxfer.models.attention.registry"
_CALL = re.compile(r"\bregister_(parametric_)?attention\(\s*(?:\"([^\"]+)\"|([A-Za-z_]\w*))")


def _constants(text: str) -> dict[str, str]:
    """A module's top-level string constants (``SOFTMAX = "softmax"``)."""
    return dict(re.findall(r"^([A-Za-z_]\w*)\s*(?::\s*\w+\s*)?=\s*\"([^\"]*)\"", text, flags=re.MULTILINE))


@cache
def _registered_by_text() -> tuple[frozenset[str], frozenset[str]]:
    """(names, parametric prefixes) the registering files declare; a prefix is written without its colon. A
    constant is looked up in the file that uses it, then in the others (one may import it from another)."""
    texts = [p.read_text(encoding="utf-8") for pattern in _REGISTERING for p in sorted(_MODELS.glob(pattern))]
    everywhere = {k: v for text in texts for k, v in _constants(text).items()}
    names: set[str] = set()
    prefixes: set[str] = set()
    for text in texts:
        consts = {**everywhere, **_constants(text)}
        for parametric, literal, constant in _CALL.findall(text):
            value = literal or consts.get(constant, "")
            if value:
                (prefixes if parametric else names).add(value.rstrip(":"))
    return frozenset(names), frozenset(prefixes)


def registered_attentions() -> tuple[frozenset[str], frozenset[str]]:
    """(names, parametric prefixes) of every attention a student may name: the imported registry's where it
    is loaded (it holds the attentions a Python session registered too), else what the source declares."""
    registry = sys.modules.get(_REGISTRY_MODULE)
    if registry is not None:
        return frozenset(registry._ATTENTIONS), frozenset(registry._PARAMETRIC)
    return _registered_by_text()


def _check_attention(key: str, value: Any) -> None:
    names, prefixes = registered_attentions()
    if not names:  # the source is not beside the package (a frozen install): the registry checks later
        return
    items = value if isinstance(value, list) else [value]
    for i, name in enumerate(items):
        prefix, colon, _ = name.partition(":") if isinstance(name, str) else ("", "", "")
        if not isinstance(name, str) or name in names or (colon and prefix in prefixes):
            continue
        where = f"{key}[{i}]" if isinstance(value, list) else key
        known = sorted(names) + [f"{p}:<spec>" for p in sorted(prefixes)]
        close = difflib.get_close_matches(name, sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where}: {name!r} is not a registered attention{hint} (one of {', '.join(known)})"
        )


def check_values(cfg: Any) -> Any:
    """``cfg`` (a `TrainConfig`) once the values its registries hold are known names; else a `ConfigError`
    naming the key, the value, the nearest name and the choices."""
    if cfg.model.attention:
        _check_attention("model.attention", cfg.model.attention)
    _check_attention("convert.attention", cfg.convert.attention)
    return cfg
