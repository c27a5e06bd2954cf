"""Keys merged into others: the one table of their old spellings (`RENAMED_KEYS`), read wherever a config
comes from (a recipe, an override, a run's config.yaml, a checkpoint's recorded config: an old run resumes
without a spurious change). Each one read says the new spelling once per process (`RenamedKeyWarning`); a
default value is dropped, any other moves where its row says, or stops with what to do instead."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .keys import ConfigError
from .strict_yaml import yaml_value


class RenamedKeyWarning(FutureWarning):
    """A config used a key's old spelling; the message says the new one."""


#: how an old key's value moves into the nested config data: (value, data, config so far or None) -> what the
#: note adds (None: nothing)
Move = Callable[[Any, dict, Any], "str | None"]


def _current(cfg: Any, dotted: str) -> Any:
    """The value at ``dotted`` in a config (sections are dataclasses, mapping keys dicts), or None."""
    node = cfg
    for part in dotted.split("."):
        if dataclasses.is_dataclass(node):
            node = getattr(node, part, None)
        elif isinstance(node, Mapping):
            node = node.get(part)
        else:
            return None
    return node


def find_key(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """(whether the nested config mapping ``data`` holds the dotted key, its value there)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _parent(data: dict, dotted: str, cfg: Any) -> dict:
    """The dict that holds ``dotted``'s last part, made where missing (a mapping-valued key starts from the
    config's current value, so setting one entry of ``data.kwargs`` keeps the others)."""
    node, parts = data, dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            now = _current(cfg, ".".join(parts[: depth + 1]))
            node[part] = dict(now) if isinstance(now, Mapping) else {}
        node = node[part]
    return node


def moved_to(new: str) -> Move:
    """The value moves to the key ``new``, unless the same source sets ``new`` itself: the new spelling wins,
    and where the two differ the note says which value is dropped (else a recipe's old key, set beside the new
    one it forgot, would be lost without a word)."""

    def move(value: Any, data: dict, cfg: Any) -> str | None:
        found, given = find_key(data, new)
        if not found:
            _parent(data, new, cfg)[new.rsplit(".", 1)[-1]] = value
        elif given != value:
            return (
                f"its {yaml_value(value)} is dropped: {new}={yaml_value(given)} is given beside it and wins"
            )
        return None

    return move


def dropped_from(key: str, item: str, old: str) -> Move:
    """``false`` means ``item`` is left out of the list ``key`` (the source's list, else the config's); the old
    switch ``old`` given anything but true or false is refused, not read as true (``log.tensorboard=0``)."""

    def move(value: Any, data: dict, cfg: Any) -> str | None:
        if not isinstance(value, bool):
            raise ConfigError(f"{old}: expected true/false, got {value!r}")
        found, items = find_key(data, key)
        given = items if found else None
        items = items if found else _current(cfg, key)
        if value is False and items is not None:
            _parent(data, key, cfg)[key.rsplit(".", 1)[-1]] = [x for x in items if x != item]
        # the list given beside it names the item, which the switch takes out: both said, not one silently lost
        if value is False and isinstance(given, list) and item in given:
            return f"{key}={yaml_value(given)} is given beside it and loses {item}: {old}=false leaves it out"
        return None

    return move


def synthetic_option(new: str) -> Move:
    """The value moves to ``new`` for the synthetic dataset (whose option it was); other datasets ignored it."""
    to_new = moved_to(new)

    def move(value: Any, data: dict, cfg: Any) -> str | None:
        found, dataset = find_key(data, "data.dataset")
        dataset = dataset if found else _current(cfg, "data.dataset")
        if dataset in (None, "synthetic"):
            return to_new(value, data, cfg)
        return (
            f"its {yaml_value(value)} is dropped: data.dataset={dataset} is not the synthetic dataset it set"
        )

    return move


def refused(why: str) -> Move:
    """A value the new spelling cannot hold: a `ConfigError` saying ``why`` (what to do instead)."""

    def move(value: Any, data: dict, cfg: Any) -> None:
        raise ConfigError(why)

    return move


def _pop(data: dict, dotted: str) -> tuple[bool, Any]:
    *path, last = dotted.split(".")
    node: Any = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return False, None
    return True, node.pop(last)


#: how an old spelling is taken out of the nested config data: (whether it was there, its value)
Take = Callable[[dict], tuple[bool, Any]]


def losses_entries(name: str) -> Take:
    """The ``transfer.losses`` entries named ``name``, taken out of the list (the other entries stay)."""

    def take(data: dict) -> tuple[bool, Any]:
        found, entries = find_key(data, "transfer.losses")
        if not found or not isinstance(entries, list):
            return False, None
        named = [e for e in entries if isinstance(e, Mapping) and e.get("name") == name]
        if not named:
            return False, None
        data["transfer"]["losses"] = [e for e in entries if e not in named]
        return True, named

    return take


_LOGIT_KD_HOW = (
    "write one logit distillation as transfer.logit_distill: WEIGHT (and transfer.logit_temperature: T)"
)


def logit_distillation_entry(entries: list[Mapping[str, Any]], data: dict, cfg: Any) -> None:
    """A ``{name: logit_kd, weight: W, temperature: T}`` entry (defaults 1 and 1) is ``transfer.logit_distill:
    W`` and ``transfer.logit_temperature: T``, the one spelling of logit distillation."""
    if len(entries) > 1:
        raise ConfigError(f"transfer.losses lists logit_kd {len(entries)} times; {_LOGIT_KD_HOW}")
    (entry,) = entries
    if set(entry) - {"name", "weight", "temperature", "signal"} or entry.get("signal", "logits") != "logits":
        raise ConfigError(
            f"transfer.losses entry {dict(entry)}: logit_kd takes weight and temperature; {_LOGIT_KD_HOW}"
        )
    found, weight = find_key(data, "transfer.logit_distill")
    if found and weight:
        raise ConfigError(
            f"transfer.logit_distill={weight} and a transfer.losses entry logit_kd ask for logit distillation "
            f"twice; {_LOGIT_KD_HOW}"
        )
    transfer = _parent(data, "transfer.logit_distill", cfg)
    transfer["logit_distill"] = entry.get("weight", 1.0)
    transfer["logit_temperature"] = entry.get("temperature", 1.0)


@dataclass(frozen=True)
class RenamedKey:
    """One merged key: its old spelling and default, what to write now, how its value moves, and (``take``,
    where the old spelling is not the dotted key ``old``) how it is found."""

    old: str
    default: Any
    new: str
    move: Move
    take: Take | None = None

    @property
    def note(self) -> str:
        return f"{self.old} is now {self.new}"


#: every key that was merged into another, by its old spelling
RENAMED_KEYS: tuple[RenamedKey, ...] = (
    RenamedKey(
        "log.tensorboard",
        True,
        "log.trackers: TensorBoard is on where tensorboard is among them (log.trackers=[] logs to none)",
        dropped_from("log.trackers", "tensorboard", "log.tensorboard"),
    ),
    RenamedKey(
        "eval_only",
        False,
        "the command `attnxfer eval -c RUN_DIR/config.yaml`",
        refused(
            "eval_only: true is gone: score the run with `attnxfer eval -c "
            "RUN_DIR/config.yaml` (attnxfer.apps.run.evaluation.evaluate_run in Python) and drop eval_only"
        ),
    ),
    RenamedKey(
        "convert.knn_bank_size",
        10_000,
        "eval.knn_bank_size (attnxfer eval's and conversion reports' k-NN bank)",
        moved_to("eval.knn_bank_size"),
    ),
    RenamedKey(
        "data.synthetic_length",
        512,
        "data.kwargs.length (the synthetic dataset's own option)",
        synthetic_option("data.kwargs.length"),
    ),
    RenamedKey(
        "transfer.losses entry {name: logit_kd}",
        None,
        "transfer.logit_distill (its weight) and transfer.logit_temperature (its temperature)",
        logit_distillation_entry,
        take=losses_entries("logit_kd"),
    ),
)


#: the notes said so far (`warnings`' registry: each is shown once per process under the default filter)
_SAID: dict = {}


def respell(data: Mapping[str, Any], cfg: Any = None, *, note: bool = True) -> dict[str, Any]:
    """``data`` (a config's nested keys) with every old spelling moved where its row says; ``cfg``: the config
    the data is applied to (None: a whole recorded config). Each one read is said once (``note``)."""
    out = copy.deepcopy(dict(data))
    for renamed in RENAMED_KEYS:
        # whether ``out`` spells it the old way, and the old value (taken out of ``out``)
        found, value = renamed.take(out) if renamed.take is not None else _pop(out, renamed.old)
        if not found:
            continue
        more = renamed.move(value, out, cfg) if value != renamed.default else None
        if note:  # once per process; the CLI shows it as "warning: <old> is now <new>"
            said = f"{renamed.note}; {more}" if more else renamed.note
            warnings.warn_explicit(said, RenamedKeyWarning, "config", 0, __name__, _SAID)
    return out
