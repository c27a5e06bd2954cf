"""The config values a registry checks (attention names, timm architectures), checked as the config loads:
importing torch and timm takes seconds and a typo would surface only after the teacher and data are built. So
names are read by text from the decorators that register them (milliseconds), and from an imported registry
where there is one; tests/cli/test_value_checks.py holds the two equal.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from functools import cache
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..errors import InputError, did_you_mean
from ..plugins import ATTENTION_GROUP, LOSS_GROUP, load_entry_points, missing_plugin
from ..run_layout import CHECKPOINTS_SUBDIR, RUN_RECORD, STAGE_DIRS, read_record

_MODELS = Path(__file__).resolve().parents[1] / "models"
#: the files that register attentions: softmax's and the zoo's
_REGISTERING = ("attention/softmax.py", "efficient/*.py")
_REGISTRY_MODULE = "attnxfer.models.attention.registry"
_CALL = re.compile(
    r"\bregister_(parametric_)?attention\(\s*(?:(?:name|prefix)\s*=\s*)?(?:[\"']([^\"']+)[\"']|([A-Za-z_]\w*))"
)


_CONSTANT = r"^([A-Za-z_]\w*)\s*(?::\s*\w+\s*)?=\s*[\"']([^\"']*)[\"'][ \t\r]*(?:\#.*)?$"
#: a string or a comment, matched where it starts: a registration or a constant written inside one (a
#: docstring's example, a line commented out) is consumed with it, never read as the module's
_NOT_CODE = r"""\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|\#[^\n]*"""
_CODE = re.compile(f"{_NOT_CODE}|{_CONSTANT}|{_CALL.pattern}", re.MULTILINE)


def _constants(text: str) -> dict[str, str]:
    """A module's top-level string constants (``SOFTMAX = "softmax"``, or in single quotes)."""
    return dict(re.findall(_CONSTANT, text, flags=re.MULTILINE))


def _registrations(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """A module's top-level string constants and its registrations (`_CALL`'s groups), outside its comments
    and strings: a regular expression, not `ast`, which takes a noticeable part of a second for the zoo."""
    constants: dict[str, str] = {}
    calls: list[tuple[str, str, str]] = []
    for name, value, *call in _CODE.findall(text):
        if name:
            constants[name] = value
        elif any(call):
            calls.append(tuple(call))
    return constants, calls


@cache
def _registered_by_text() -> tuple[frozenset[str], frozenset[str], bool]:
    """(names, parametric prefixes, whether a registration's name could not be read) the registering files
    declare; a prefix is written without its colon. A constant is looked up in the file that uses it, then in
    the others (one may import it from another); a name built by code (an f-string in a loop) is not read."""
    read = [
        _registrations(p.read_text(encoding="utf-8"))
        for pattern in _REGISTERING
        for p in sorted(_MODELS.glob(pattern))
    ]
    everywhere = {k: v for own, _ in read for k, v in own.items()}
    names: set[str] = set()
    prefixes: set[str] = set()
    unread = False
    for own, calls in read:
        consts = {**everywhere, **own}
        for parametric, literal, constant in calls:
            value = literal or consts.get(constant, "")
            if value:
                (prefixes if parametric else names).add(value.rstrip(":"))
            unread |= not value
    return frozenset(names), frozenset(prefixes), unread


def registered_attentions() -> tuple[frozenset[str], frozenset[str]]:
    """(names, parametric prefixes): the imported registry's where loaded, else the source's."""
    registry = sys.modules.get(_REGISTRY_MODULE)
    if registry is not None:
        return frozenset(registry._ATTENTIONS), frozenset(registry._PARAMETRIC)
    return _registered_by_text()[:2]


#: ``@comparison_loss("x")``, ``(name="x")`` or ``(NAME)``, at a line's start (a docstring's example is indented),
#: decorated through its module too (``@transfer.comparison_loss``) or called (``comparison_loss("x")(Cls)``), as
#: Python registers each alike; any other argument (a name built by code) matches with both groups empty
_COMPARISON = re.compile(
    r"^@?(?:[A-Za-z_]\w*\.)*comparison_loss\(\s*(?:name\s*=\s*)?(?:[\"']([^\"']+)[\"']\s*\)|([A-Za-z_]\w*)\s*\))?",
    re.MULTILINE,
)
_COMPARISONS_MODULE = "attnxfer.transfer.comparisons"


@cache
def _comparisons_by_text() -> tuple[frozenset[str], bool]:
    """The ``@comparison_loss`` names the files of ``transfer/`` declare, a constant looked up in its file, and
    whether a registration's name could not be read (built by code)."""
    folder = Path(__file__).resolve().parents[1] / "transfer"
    names: set[str] = set()
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        consts = _constants(text)
        names.update(literal or consts.get(constant, "") for literal, constant in _COMPARISON.findall(text))
    return frozenset(names - {""}), "" in names


def _comparison_names() -> frozenset[str]:
    """The names entries may give: the imported registry's where it is loaded (a session's own losses, an
    installed package's), else what the source declares."""
    module = sys.modules.get(_COMPARISONS_MODULE)
    return frozenset(module.COMPARISON_LOSSES) if module is not None else _comparisons_by_text()[0]


def _latest_state(run_dir: Path) -> dict[str, Any]:
    """The state of ``run_dir``'s latest intact checkpoint, read as a resume reads it; {} where there is none
    (a broken checkpoint is the resume's to report, once)."""
    from ..checkpoints.resume_point import CheckpointError, ResumePoint  # torch: only where a stage 1 saved

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            point = ResumePoint.find(run_dir, verify_hash=False)
        except CheckpointError:
            return {}
    return point.state if point is not None else {}


def _refuse_uninstalled(group: str, where: str, name: str, run_dir: str) -> None:
    """A name the run's run.json (a conversion's: its stages', and its stage 1 checkpoint's state while stage 2
    has written none) records as a plug-in's, not registered here, is refused naming the package to install:
    the nearest built-in name would train or score something else. A new run, or one recorded before run.json
    named its plug-ins, gets the generic refusal."""
    folder = Path(run_dir)
    records = [read_record(folder / s / RUN_RECORD) for s in ("", *STAGE_DIRS)]
    if (folder / STAGE_DIRS[0] / CHECKPOINTS_SUBDIR).is_dir():
        records.append(_latest_state(folder / STAGE_DIRS[0]))
    for record in records:
        # a hand-edited record that is not entry_point_origin's shape is passed over, as if unrecorded
        groups = record.get("plugins")
        names = groups.get(group) if isinstance(groups, dict) else None
        if said := missing_plugin(name, names.get(name) if isinstance(names, dict) else None):
            raise ConfigError(f"{where}: {said}")
    trained = [r.get("student") for r in records if isinstance(r.get("student"), dict)]
    if group == ATTENTION_GROUP and any(name in _as_list(s.get("attention")) for s in trained):
        # registered where it trained, by no package (a fork's file, a script's import): no other name will do
        raise ConfigError(
            f"{where}: {name!r} is the attention {run_dir} was trained with, and nothing registers it here: run "
            f"with the code that registered it (a fork's attnxfer/models/efficient/ file, or a package named by an "
            f"'{ATTENTION_GROUP}' entry point)"
        )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _check_comparisons(entries: Any, run_dir: str) -> None:
    names = _comparison_names()
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name not in names:
            # an installed package's: it imports the registry, which then holds the built-ins too
            load_entry_points(LOSS_GROUP)
            if _comparisons_by_text()[1]:  # a name the source builds by code: the imported package holds it
                importlib.import_module("attnxfer.transfer")
            names = _comparison_names()
        if not isinstance(name, str) or name in names or not names:
            continue  # a malformed entry is refused, with its own message, where the plan is built
        _refuse_uninstalled(LOSS_GROUP, f"transfer.losses[{i}].name", name, run_dir)
        raise ConfigError(
            f"transfer.losses[{i}].name: {name!r} is not a comparison loss{did_you_mean(name, names)} (one "
            f"of {', '.join(sorted(names))}; a loss of your own: @comparison_loss in a file of "
            f"attnxfer/transfer/ or in a module named by an '{LOSS_GROUP}' entry point)"
        )


_MODEL_DEF = re.compile(r"@register_model\s*\n\s*def\s+(\w+)")
_DEPRECATIONS = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}", re.DOTALL)
_DEPRECATED_NAME = re.compile(r"[\'\"](\w+)[\'\"]\s*:")


def _model_names(folder: Path) -> frozenset[str]:
    """The architectures the model files in ``folder`` register, deprecated aliases included."""
    names: set[str] = set()
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        names.update(_MODEL_DEF.findall(text))
        for block in _DEPRECATIONS.findall(text):
            names.update(_DEPRECATED_NAME.findall(block))
    return frozenset(names)


@cache
def _timm_names() -> frozenset[str]:
    """timm's architectures, read from its model files; empty where they are not plain files."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        return frozenset()
    return _model_names(Path(spec.origin).parent / "models")


def is_architecture(name: str) -> bool | None:
    """Whether timm builds ``name`` (``.tag`` allowed); None where that cannot be told without timm."""
    arch = name.split(".", 1)[0]
    if arch in _model_names(_MODELS):
        return True
    timm = sys.modules.get("timm")
    if timm is not None and timm.is_model(arch):  # a session's own registrations
        return True
    return arch in _timm_names() if _timm_names() else None


def _check_architecture(key: str, value: Any) -> None:
    if not isinstance(value, str) or ":" in value or is_architecture(value) is not False:
        return  # hf-hub: and local-dir: names are resolved where the model is built
    arch = value.split(".", 1)[0]
    # MAE's repository names its models without timm's resolution: vit_large_patch16, mae_vit_large_patch16
    as_timm = f"{arch.removeprefix('mae_')}_224"
    hint = (
        f"; MAE's {arch} is timm's {as_timm!r}"
        + " (with a decoder the mae section shapes)" * arch.startswith("mae_")
        if as_timm in _timm_names()
        else did_you_mean(arch, _timm_names() | _model_names(_MODELS))
    )
    raise ConfigError(
        f"{key}: {value!r} is not a timm architecture{hint} (timm.list_models() lists them; attnxfer adds "
        f"{', '.join(sorted(_model_names(_MODELS)))})"
    )


def _refuse_split_formulas(key: str, value: list) -> None:
    # a split leaves one item opening more than it closes and another closing more; one alone is a typo, which
    # the formula's parse names
    texts = [n for n in value if isinstance(n, str)]
    if any(n.count("(") > n.count(")") for n in texts) and any(n.count(")") > n.count("(") for n in texts):
        raise ConfigError(
            f"{key}: {value!r}: a formula was split at a comma inside it (YAML's [...] splits at every comma): "
            "quote each formula in a list, e.g. ['formula:sum(proj.cat(softmax,neg.softmax))', 'formula:sum(relu)']"
        )


def _check_attention(key: str, value: Any, run_dir: str, also: frozenset[str] = frozenset()) -> None:
    """``also``: names the key takes besides the registry's as one value (convert.attention's ``auto``)."""
    names, prefixes = registered_attentions()
    if not names:  # the source is not beside the package (a frozen install): the registry checks later
        return
    items = _as_list(value)
    if any(isinstance(n, str) and n not in names and n.partition(":")[0] not in prefixes for n in items):
        # an installed package's: it imports the registry, which then holds the built-ins too
        load_entry_points(ATTENTION_GROUP)
        if _registered_by_text()[2]:  # a name the source builds by code: the zoo, imported, holds it
            importlib.import_module("attnxfer.models.efficient")
        names, prefixes = registered_attentions()
    if isinstance(value, list):
        _refuse_split_formulas(key, value)
    for i, name in enumerate(items):
        prefix, colon, _ = name.partition(":") if isinstance(name, str) else ("", "", "")
        if not isinstance(name, str) or name in names or (colon and prefix in prefixes):
            continue
        where = f"{key}[{i}]" if isinstance(value, list) else key
        _refuse_uninstalled(ATTENTION_GROUP, where, name, run_dir)
        if not isinstance(value, list):
            names |= also
        known = sorted(names) + [f"{p}:<spec>" for p in sorted(prefixes)]
        # no registered name holds a call: a formula written without its prefix (its parse says what is wrong)
        formula = f"; a formula is named with its prefix: did you mean 'formula:{name.rpartition(':')[2]}'?"
        hint = formula if "(" in name else did_you_mean(name, names)
        raise ConfigError(
            f"{where}: {name!r} is not a registered attention{hint} (one of {', '.join(known)}; an attention "
            f"of your own: @register_attention in a module named by an '{ATTENTION_GROUP}' entry point)"
        )


def _check_options(key: str, names: Any, options: dict[str, Any], named_in: str = "") -> None:
    """Options no named attention takes (a recipe's, left behind when the command line names another
    attention), or one an attention has no default for, refused before the teacher and data load. torch is
    imported only where there are options or the registry is already imported (a plug-in's or a session's
    attention): the zoo's, read from the source, have a default for every option. A parametric name's spec,
    parsed here first (formula:...), is refused under ``named_in``, the key listing ``names`` (else ``key``'s)."""
    if not names or not (options or _REGISTRY_MODULE in sys.modules):
        return
    from ..models.efficient.swap import check_attention_names, check_options

    try:
        check_attention_names(names, named_in or key.removesuffix("_kwargs"))
    except InputError as e:
        raise ConfigError(e.args[0]) from None
    try:
        check_options(names if isinstance(names, list) else [names], options)
    except TypeError as e:
        raise ConfigError(f"{key}: {e}") from None


#: timm's policy strings (timm/data/auto_augment.py): each section after the policy's name is a key and its
#: number; RandAugment's ``t...`` names its transforms. timm passes over a section without a digit unread.
_AUTO_AUGMENT = {
    "rand": {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int},
    "augmix": {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float},
    **{name: {"mstd": float} for name in ("v0", "v0r", "original", "originalr", "3a")},
}


def _check_auto_augment(value: str) -> None:
    """``aug.auto_augment`` read as timm reads it, a section it would ignore or assert on refused by name."""
    policy, *parts = value.split("-")
    if policy not in _AUTO_AUGMENT:
        raise ConfigError(
            f"aug.auto_augment={value}: {policy!r} is none of timm's policies ({', '.join(_AUTO_AUGMENT)}), "
            "e.g. rand-m9-mstd0.5-inc1"
        )
    keys = _AUTO_AUGMENT[policy]
    for part in parts:
        if policy == "rand" and part.startswith("t"):
            continue
        key, number = re.fullmatch(r"([a-z]*)(.*)", part).groups()
        if key not in keys:
            raise ConfigError(
                f"aug.auto_augment={value}: timm's {policy} policy has no section {part!r}; after the policy "
                f"each section is a key and its number, the keys {', '.join(keys)} (e.g. rand-m9-mstd0.5-inc1)"
            )
        try:
            keys[key](number)
        except ValueError:
            kind = "an integer" if keys[key] is int else "a number"
            raise ConfigError(f"aug.auto_augment={value}: {part!r}: {key} takes {kind}") from None


def check_values(cfg: Any) -> Any:
    """``cfg`` once its registry values are known names and its attentions take their options; else a
    `ConfigError` with the nearest name or the options to drop."""
    _check_architecture("model.name", cfg.model.name)
    _check_architecture("teacher.arch", cfg.teacher.arch)
    if cfg.model.attention:
        _check_attention("model.attention", cfg.model.attention, cfg.run_dir)
    auto = cfg.convert.attention == "auto"  # auto: each block chosen among convert.candidates
    if not auto:
        _check_attention("convert.attention", cfg.convert.attention, cfg.run_dir, frozenset({"auto"}))
    _check_attention("convert.candidates", list(cfg.convert.candidates), cfg.run_dir)
    _check_comparisons(cfg.transfer.losses, cfg.run_dir)
    # keys of the model section itself: timm would be handed them twice (a TypeError, not a message)
    if own := [k for k in ("num_classes", "drop_path_rate") if k in cfg.model.kwargs]:
        raise ConfigError(
            f"model.kwargs sets {', '.join(own)}, which the model section sets itself: give "
            f"{' '.join(f'model.{k}={cfg.model.kwargs[k]}' for k in own)} instead"
        )
    _check_options("model.attention_kwargs", cfg.model.attention, cfg.model.attention_kwargs)
    names = list(cfg.convert.candidates) if auto else cfg.convert.attention
    named_in = "convert.candidates" if auto else "convert.attention"
    _check_options("convert.attention_kwargs", names, cfg.convert.attention_kwargs, named_in)
    if cfg.mae.decoder_dim % 4:  # else refused once data and encoder are built, naming no key
        raise ConfigError(
            f"mae.decoder_dim={cfg.mae.decoder_dim}: the decoder's 2-D sin-cos position embedding needs a width "
            "divisible by 4 (sin and cos of rows and of columns): make it a multiple of 4"
        )
    if cfg.mae.decoder_dim % cfg.mae.decoder_heads:
        raise ConfigError(
            f"mae.decoder_dim={cfg.mae.decoder_dim} does not split into mae.decoder_heads="
            f"{cfg.mae.decoder_heads} heads: make the width a multiple of the head count"
        )
    if cfg.aug.auto_augment:
        _check_auto_augment(cfg.aug.auto_augment)
    if cfg.search.seeds is not None and not cfg.search.seeds:
        raise ConfigError(
            "search.seeds=[] names no formula to start from: give one or more, or null for the zoo"
        )
    _refuse_split_formulas("search.seeds", cfg.search.seeds or [])
    return cfg
