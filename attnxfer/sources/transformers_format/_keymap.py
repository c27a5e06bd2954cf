"""What every transformers-to-timm weight mapping needs: take tensors by their transformers name, and
check the result against the timm model the config builds before anyone loads it.

A mapping reads names through `WeightReader`, so that a name the checkpoint lacks is collected (and
reported together with the others) instead of raising at the first one, and a name nobody read is
unexpected. `check_fits` then builds the timm model on the meta device and compares names and shapes,
so a checkpoint that does not fit its config.json fails with one message naming what differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import timm
import torch

__all__ = ["WeightReader", "base_and_top", "check_fits", "head_classes", "legacy_names", "pair", "size_arg"]

_SHOWN = 8  # names listed per kind in an error; the rest are counted


def head_classes(config: dict) -> int:
    """Classes of the classifier a config.json describes: its ``id2label`` when the saved class is an image
    classifier (``architectures``), else 0 (a base model's config carries labels it has no head for)."""
    if not any(str(a).endswith("ForImageClassification") for a in config.get("architectures") or ()):
        return 0
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default label count


def pair(v: int | list | tuple) -> tuple[int, int]:
    """An ``int | [h, w]`` size from config.json as (h, w)."""
    return (int(v), int(v)) if isinstance(v, int | float) else (int(v[0]), int(v[1]))


def size_arg(v: int | list | tuple) -> int | tuple[int, int]:
    """A size as timm takes it: an int when square, else (h, w)."""
    h, w = pair(v)
    return h if h == w else (h, w)


def legacy_names(
    weights: dict[str, torch.Tensor], renames: Iterable[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Names as ``save_pretrained`` writes them (and as the Hub holds them), whichever spelling came in.

    transformers 5 renamed some modules in memory (``q_proj``, ``mlp.fc1``, ...) but still saves the
    original names; a state dict taken from a live model (``model.state_dict()``) uses the new ones.
    ``renames`` are (regex, replacement) pairs from the new spelling to the saved one, applied in order.
    """
    rules = [(re.compile(a), b) for a, b in renames]
    out = {}
    for k, v in weights.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return "[" + ", ".join(names[:_SHOWN]) + "]" + more


class WeightReader:
    """Hands out a state dict's tensors by name, remembering names it lacked and names never asked for.

    ``prefix`` is what the names had in the checkpoint (a task model's ``beit.``, ``swin.``), so that
    messages and the dropped list name the checkpoint's own keys.
    """

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
        self.weights = weights
        self.prefix = prefix
        self.missing: list[str] = []
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.weights

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor under ``name``, or None (and ``name`` noted as missing)."""
        if name not in self.weights:
            self.missing.append(self.prefix + name)
            return None
        self.used.add(name)
        return self.weights[name]

    def cat(self, names: list[str], dim: int = 0) -> torch.Tensor | None:
        """The tensors under ``names`` concatenated (a fused projection), or None if any is missing."""
        parts = [self.get(n) for n in names]
        if any(p is None for p in parts):
            return None
        try:
            return torch.cat(parts, dim=dim)
        except RuntimeError:
            shapes = ", ".join(f"{self.prefix}{n} {tuple(p.shape)}" for n, p in zip(names, parts))
            raise ValueError(f"cannot fuse {shapes} into one projection") from None

    def drop(self, unused: Callable[[str], bool]) -> list[str]:
        """Mark the names ``unused`` selects as deliberately not loaded; returns them as the checkpoint names them."""
        dropped = sorted(k for k in self.weights if k not in self.used and unused(k))
        self.used.update(dropped)
        return [self.prefix + k for k in dropped]

    def unread(self) -> list[str]:
        return sorted(self.prefix + k for k in self.weights if k not in self.used)


def base_and_top(weights: dict[str, torch.Tensor], prefix: str) -> tuple[WeightReader, WeightReader]:
    """Readers over the base model's weights (``prefix.`` removed) and the task model's own ones beside it.

    A ``XModel`` folder has no prefix (everything is the base model); a ``XForY`` folder keeps the base
    model under its ``base_model_prefix`` and its heads (classifier, decoder, ...) at the top level.
    """
    dotted = prefix + "."
    if not any(k.startswith(dotted) for k in weights):
        return WeightReader(dict(weights)), WeightReader({})
    base = {k[len(dotted) :]: v for k, v in weights.items() if k.startswith(dotted)}
    top = {k: v for k, v in weights.items() if not k.startswith(dotted)}
    return WeightReader(base, dotted), WeightReader(top)


def check_fits(
    readers: Iterable[WeightReader],
    state: dict[str, torch.Tensor | None],
    arch: str,
    kwargs: dict,
    what: str,
) -> dict[str, torch.Tensor]:
    """``state`` (timm names; None where a source tensor was missing) checked against the timm model that
    ``arch``/``kwargs`` build: raises ValueError naming missing and unexpected checkpoint names and every
    timm tensor whose shape differs; returns the complete state dict otherwise."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    readers = list(readers)
    problems = []
    missing = [n for r in readers for n in r.missing]
    if missing:
        problems.append(f"missing {_listed(missing)}")
    unread = [n for r in readers for n in r.unread()]
    if unread:
        problems.append(f"unexpected {_listed(unread)}")
    got = {k: v for k, v in state.items() if v is not None}
    not_built = sorted(set(got) - set(expected))
    if not_built:
        problems.append(f"no place in timm's {arch} for {_listed(not_built)}")
    unfilled = sorted(set(expected) - set(state))
    if unfilled:
        problems.append(f"timm's {arch} also needs {_listed(unfilled)}")
    shapes = [
        f"{k} {tuple(v.shape)} (the config gives {expected[k]})"
        for k, v in sorted(got.items())
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if shapes:
        problems.append(f"shapes that do not fit: {_listed(shapes)}")
    if problems:
        raise ValueError(f"{what} weights do not fit their config.json: " + "; ".join(problems))
    return got
