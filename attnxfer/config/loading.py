"""Loading a config: defaults, then a YAML recipe (after the recipes it starts from), then overrides."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..run_layout import (
    CHECKPOINTS_SUBDIR,
    EXPORTED_MODEL,
    RUN_CONFIG,
    RUN_DIR_MARKERS,
    STAGE_DIRS,
    STUDY_RECORD,
    STUDY_YAML,
    is_exported_model,
    missing_path,
)
from ..speak import warn
from .overrides import (
    ConfigError,
    apply_overrides,
    merge_values,
    merged_into_base,
    parse_overrides,
    refuse_unread_blr,
    validate_config,
)
from .renamed import find_key
from .schema import TrainConfig
from .strict_yaml import YAMLError, describe_yaml_error, load_yaml

RECIPES = Path(__file__).resolve().parent.parent / "cfgs"  # the built-in recipes, installed with the package


_SHADOWED: set[str] = set()  # recipe names said to shadow a file of the user's


def list_recipes() -> list[str]:
    """Built-in recipe names (``demo/copy``, ``paper/vit_large_distill``, ...)."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml"))


def resolve_recipe(path: str | Path, given_as_c: bool = True) -> Path:
    """A config file path, or the name of a built-in recipe (``paper/vit_large_copy``), else ``NAME.yaml`` from
    here: a built-in recipe of that name comes first, and ``-c NAME`` (``given_as_c``) says so where a
    ``NAME.yaml`` is here (``base: NAME`` takes the file beside its recipe first, and means no file here)."""
    if not str(path).strip():
        raise ConfigError(
            "-c was given an empty name; pass a YAML file or a built-in recipe (e.g. -c demo/copy)"
        )
    p = Path(path)
    _refuse_export(p)
    if p.is_file() and p.suffix == ".json" and (p.parent / RUN_CONFIG).is_file():  # run.json, result.json
        raise ConfigError(
            f"{str(p)!r} is a record of the run in {p.parent}, not its config: -c {p.parent / RUN_CONFIG}"
        )
    if p.is_file():
        return p
    if p.exists() and not p.is_dir():  # /dev/null, a pipe (-c <(...)): nothing to read twice
        raise ConfigError(f"config {str(p)!r} is not a regular file (a device or pipe?): give a YAML file")
    builtin = RECIPES / p.with_suffix(".yaml")
    # a folder is no config: a recipe's name is meant where one is so named (the demo's OUT/teacher is one)
    if p.is_dir() and (p.is_absolute() or not builtin.is_file()):
        step = p.parent.name == CHECKPOINTS_SUBDIR  # a checkpoint's folder: its run's config, and the step
        inside, study = (p.parent.parent if step else p) / RUN_CONFIG, _student_configs(p)
        hint = f"; a run's config is {inside}" if inside.is_file() else ""
        hint += f" (with checkpoint.resume={p} to score or go on from this step)" if step and hint else ""
        hint = f"; it is a study's folder: give one student's config: -c {study}" if study else hint
        if (p / STUDY_YAML).is_file():  # the study's own file, which `attnxfer study` takes
            whole = f"attnxfer study takes the whole study's, -c {p / STUDY_YAML}"
            hint = f"{hint} ({whole})" if study else f"; it is a study's folder: {whole}"
        raise ConfigError(f"config {str(p)!r} is a directory, not a YAML file{hint}")
    for candidate in (RECIPES / p, builtin, Path(f"{p}.yaml")):
        if candidate.is_file():
            # a name, not a path: a file of the same name here is not read (said once; loading reads it twice)
            shadows = given_as_c and candidate.is_relative_to(RECIPES) and Path(f"{p}.yaml").is_file()
            if shadows and str(p) not in _SHADOWED:
                _SHADOWED.add(str(p))
                warn(
                    f"warning: -c {path} reads the built-in recipe {path}; the file {p}.yaml here is not read "
                    f"(give -c {p}.yaml for it)"
                )
            return candidate
    study = _student_configs(p.parent)
    if study is not None:
        raise ConfigError(
            f"config file {str(p)!r} does not exist: {p.parent} is a study's folder; give one student's "
            f"config: -c {study}"
        )
    conversion = p.parent.parent
    if p.name == RUN_CONFIG and p.parent.name == STAGE_DIRS[0] and (conversion / RUN_CONFIG).is_file():
        # stage 1 trains the attention layers alone: the conversion's config runs (and scores) the whole of it
        raise ConfigError(
            f"config file {str(p)!r} does not exist: {p.parent} is stage 1 of the conversion {conversion}, "
            f"which keeps one config for both stages: -c {conversion / RUN_CONFIG}"
        )
    close = difflib.get_close_matches(str(path), list_recipes(), n=1)
    hint = f"; did you mean the built-in recipe {close[0]!r}?" if close else ""
    if fix := _recorded_config(p):  # moved or deleted from a run that is there
        raise ConfigError(f"config file {str(p)!r} does not exist; it is the run's own config, gone: {fix}")
    if not close and p.suffix in (".yaml", ".yml"):  # a file's path (runs/my-rn/config.yaml): what is there
        raise ConfigError(f"config file {missing_path(p)}")
    raise ConfigError(
        f"config file {str(p)!r} does not exist{hint} (built-in recipes: {', '.join(list_recipes())})"
    )


def _student_configs(folder: Path) -> str | None:
    """A study folder's students' own configs (``S/copy/config.yaml or S/distill/config.yaml``), the study's
    having none (its study.yaml runs the whole study); None for any other folder."""
    if not (folder / STUDY_RECORD).is_file():
        return None
    found = sorted(d / RUN_CONFIG for d in folder.iterdir() if (d / RUN_CONFIG).is_file())
    return " or ".join(map(str, found[:4])) or None  # no student started: nothing to point to


def _refuse_export(p: Path) -> None:
    """An export folder (or its config.json, timm's) is a model, not a config: say which config to give."""
    folder = p if p.is_dir() else p.parent
    if (p.is_dir() or p.name == EXPORTED_MODEL[0]) and is_exported_model(folder):
        raise ConfigError(
            f"{folder} holds an exported model (its config.json is timm's, not a run's): give the config of the "
            f"run it was exported from, -c RUN_DIR/{RUN_CONFIG} (as a teacher: teacher.spec=local-dir:{folder}; "
            f"scored as a model: attnxfer eval {folder} data.dataset=...)"
        )


def _own_run_dir(cfg: TrainConfig, p: Path) -> TrainConfig:
    """A run's own config.yaml refers to the folder it sits in, wherever the command runs from and wherever
    the run was moved: the ``run_dir`` it records only says where the run was first written."""
    folder = p.parent  # a run's own: a config.yaml beside what attnxfer writes into a run
    own = p.name == RUN_CONFIG and any((folder / m).exists() for m in RUN_DIR_MARKERS)
    if not own:
        return cfg
    recorded = Path(cfg.run_dir)
    if recorded.is_dir() and os.path.samefile(recorded, folder):
        return cfg
    cfg = dataclasses.replace(cfg, run_dir=str(folder.absolute()))
    # a relative run_dir the run's path ends with says the folder the run started in: the relative teacher
    # and data paths it records were given from there (`attnxfer eval -c runs/x/config.yaml` from elsewhere)
    here, tail = folder.absolute().parts, recorded.parts
    if recorded.is_absolute() or not tail or here[-len(tail) :] != tail:
        return cfg
    started = Path(*here[: -len(tail)])

    def from_start(path: str) -> str:
        given = Path(path).expanduser()
        if given.is_absolute() or given.exists() or not (started / given).exists():
            return path
        return str(started / given)

    spec, root = cfg.teacher.spec, cfg.data.root
    if spec:  # a folder or a weights file, as local-dir: or bare; names and hf-hub: ids name no path there
        prefix = "local-dir:" if spec.startswith("local-dir:") else ""
        spec = prefix + from_start(spec.removeprefix(prefix))
    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, spec=spec),
        data=dataclasses.replace(cfg.data, root=root and from_start(root)),
    )


BASE_KEY = "base"
#: the key under which a study's YAML lists its students (`attnxfer.config.study_spec`); not a run's key
STUDENTS_KEY = "students"
#: the key of a study's YAML that names its command (beside ``students:``); not a run's key
COMMAND_KEY = "command"


def _resolve_base(name: Any, child: Path) -> Path:
    """A recipe's ``base:``: a built-in recipe name, or a YAML path relative to the recipe that names it."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"config file {str(child)!r}: base must be a recipe name or a YAML path "
            f"(e.g. base: paper/vit_large_copy), got {name!r}"
        )
    beside = child.parent / name
    for candidate in (beside, beside.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    try:
        found = resolve_recipe(name, given_as_c=False)
    except ConfigError as e:
        raise ConfigError(f"config file {str(child)!r}: base {name!r} not found ({e})") from None
    # a file of the folder the command runs in, not beside the recipe: another folder would read another one
    if not found.resolve().is_relative_to(RECIPES.resolve()):
        raise ConfigError(
            f"config file {str(child)!r}: base {name!r} is neither a file beside it ({beside.with_suffix('.yaml')}) "
            f"nor a built-in recipe; the {found} where the command runs is not read, as a base is looked for beside "
            f"its recipe (which then reads the same from any folder): write its path from there, base: "
            f"{os.path.relpath(found, child.parent)}"
        )
    return found


def _unreadable(p: Path, problem: str, sep: str = " ", advice: str | None = None) -> ConfigError:
    """A config file that cannot be read, with ``advice`` for one the user wrote; a run's own config.yaml
    (written atomically: damaged by hand or by a copy) is told how to get back what its run recorded."""
    said = f"config file {str(p)!r}{sep}{problem}"
    if fix := _recorded_config(p):
        return ConfigError(f"{said}; it is the run's own config, damaged: {fix}")
    return ConfigError(f"{said}: {advice}" if advice else said)


def _recorded_config(p: Path) -> str | None:
    """Where the run whose own config.yaml ``p`` is (a folder beside a run's files; not a conversion's stage 1,
    which has none) recorded the config it trained with, which `attnxfer export` reads too: its newest
    checkpoint's state.json, not the defaults. None for any other file."""
    folder = p.parent
    if p.name != RUN_CONFIG or folder.name == STAGE_DIRS[0]:
        return None
    if not any((folder / m).exists() for m in RUN_DIR_MARKERS):
        return None
    # a conversion's own config holds the convert section, which stage 1's checkpoints record and stage 2's do not
    saves = [
        sorted(d for d in folder.glob(f"{stage}{CHECKPOINTS_SUBDIR}/step-*") if "." not in d.name)
        for stage in ("", f"{STAGE_DIRS[0]}/", f"{STAGE_DIRS[1]}/")
    ]  # not the step-*.replaced-* an earlier attempt kept aside
    newest = next((found[-1] for found in saves if found), None)
    if newest is None:
        return "the run saved no checkpoint to recover it from: start the run again"
    return f"write back the config its checkpoints record, 'config' in {newest}/state.json (JSON, which YAML reads)"


def recipe_chain(path: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """A recipe and the recipes it starts from (``base: NAME``), root first, each with its own keys: each file
    is applied over the previous one as overrides are, so a recipe stating only what differs equals a full copy."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    p = resolve_recipe(path)
    seen: list[Path] = []
    while True:
        if p.resolve() in seen:
            loop = " -> ".join(str(q) for q in [*seen, p.resolve()])
            raise ConfigError(f"recipes start from each other in a cycle: {loop}; remove one base")
        seen.append(p.resolve())
        try:  # a repeated key or bad YAML is one line naming the file and line
            data = load_yaml(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise _unreadable(p, "is not a text YAML file (binary content?)") from None
        except YAMLError as e:
            raise _unreadable(p, describe_yaml_error(e), ", ") from None
        if data is None:  # a `--print-config > FILE` that failed leaves one: the defaults would train unasked
            raise _unreadable(
                p,
                "holds no keys (empty, or only comments)",
                advice="write its keys, or leave out -c to run the defaults",
            )
        if not isinstance(data, Mapping):
            raise _unreadable(p, f"must hold a mapping of keys, got {type(data).__name__}")
        data = dict(data)
        if other := next((k for k in ("_base_", "defaults", "extends") if k in data), None):
            raise ConfigError(  # MMEngine's, Hydra's and others' word for it, else "unknown key" guesses
                f"config file {str(p)!r}: {other}: is how other tools start from a recipe; attnxfer's is "
                f"{BASE_KEY}: NAME (one recipe name or YAML path)"
            )
        parent = data.pop(BASE_KEY, None)
        chain.append((p, data))
        if parent is None:
            return chain[::-1]
        p = _resolve_base(parent, p)


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    command: str | None = None,
    *,
    checked: bool = True,
) -> TrainConfig:
    """Defaults, then the YAML file (after the recipes it starts from), then ``key=value`` overrides; every
    value range-checked (``checked`` False: the recipe as written, which a run's config is compared with, its
    overrides having mended it: no range check, and no refusal of an optim.blr that optim.lr=null on the
    command line makes count); an unknown key's refusal lists the sections ``command`` reads (None: every one). A
    run's own ``config.yaml`` sets ``run_dir`` to the folder it sits in (`_own_run_dir`), unless a ``run_dir=``
    override says otherwise; any other YAML's ``run_dir`` is taken as written."""
    if isinstance(overrides, str | Mapping):  # a str iterates as its letters, a dict as its keys
        raise ConfigError(
            f"overrides: a list of 'key=value' strings (['data.batch_size=4']), got {overrides!r}"
        )
    cfg, chain, parsed = TrainConfig(), [], {}
    unread_blr: tuple[Path, Mapping[str, Any]] | None = None  # the last file to set optim.blr, not optim.lr
    if path is not None:
        p = resolve_recipe(path)
        chain = recipe_chain(p)
        # the nearest file's students: decide, as a list replaces its base's: `students: []` drops a base's
        listing = [(file, data.pop(STUDENTS_KEY)) for file, data in chain if STUDENTS_KEY in data]
        if listing and listing[-1][1] != []:
            file, study = listing[-1][0], _student_configs(listing[-1][0].parent)
            raise ConfigError(
                f"config file {str(file)!r} lists students: it describes a study of several students; run "
                f"it with attnxfer study -c {path} or attnxfer submit --command study -c {path}"
                + (
                    f", or give one student's config: -c {study}"
                    if study
                    else " (a single run takes one student's keys, without students:"
                    # a study's file names its command too, which a single run's config has no key for
                    + (" and command:" if any(COMMAND_KEY in data for _, data in chain) else "")
                    + (f"; write students: [] in {p} to drop its base's)" if file != p else ")")
                )
            )
        for depth, (file, data) in enumerate(chain):
            if listing:  # the study's command: goes with the students dropped
                data.pop(COMMAND_KEY, None)
            # a recipe's mapping (model.kwargs: {depth: 4}) is merged into its base's, as a dotted override is:
            # YAML has no other way to set one key of it
            try:
                cfg = merge_values(cfg, merged_into_base(data) if depth else data, command=command)
            except ConfigError as e:  # which file of the chain holds the key
                raise ConfigError(f"config file {str(file)!r}: {e}") from None
            # an optim.blr over a base's optim.lr is judged once the whole chain (and the command line) is read:
            # a recipe over it may set optim.lr: null, which makes it count, as the refusal advises
            if find_key(data, "optim.lr")[0]:
                unread_blr = None
            elif find_key(data, "optim.blr")[0]:
                unread_blr = (file, data)
        cfg = _own_run_dir(cfg, p)
        # MAE pre-training's config (an mae section, no transfer one: an older train run's config.yaml has both)
        # given to another command, which would train a classifier with it and drop its mae section unread
        sections = {key for _, data in chain for key in data}
        if command in ("train", "convert", "study") and "mae" in sections and "transfer" not in sections:
            raise ConfigError(
                f"{path} is MAE pre-training's config (its mae section only `attnxfer pretrain` reads): run "
                f"attnxfer pretrain -c {path} (submit --command pretrain on SLURM); to fine-tune its encoder, "
                "export the run and give it as model.init (attnxfer train -c demo/mae_finetune)"
            )
    # a recipe, run dir, study or export given without -c (a study's student folder may be named lr=1e-3)
    for item in (o for o in overrides if "=" not in o or "/" in o.split("=", 1)[0]):
        _refuse_export(Path(item))
        study = _student_configs(Path(item))
        if study is not None:
            raise ConfigError(
                f"{item!r} is a study's folder, not a key=value override; give one student's config: -c {study}"
            )
        config = Path(item) / RUN_CONFIG if Path(item).is_dir() else item
        try:
            resolve_recipe(config)
        except ConfigError:
            continue  # no config either: parse_overrides says what an override is
        raise ConfigError(f"{item!r} is not a key=value override; to read its config, pass -c {config}")
    if overrides:
        parsed = parse_overrides(overrides)
        cfg = apply_overrides(cfg, parsed, command)
        if "optim.lr" in parsed:
            unread_blr = None
    if unread_blr is not None and checked:
        try:
            refuse_unread_blr(unread_blr[1], cfg)
        except ConfigError as e:
            raise ConfigError(f"config file {str(unread_blr[0])!r}: {e}") from None
    if not checked:  # run_dir as validate_config hands it out: ~ expanded
        return dataclasses.replace(cfg, run_dir=os.path.expanduser(cfg.run_dir))
    try:
        return validate_config(cfg)
    except ConfigError as e:  # out of range: named by the file that set it last, unless the command line did
        files = [file for file, data in chain if e.key and e.key not in parsed and find_key(data, e.key)[0]]
        if not files:
            raise
        raise ConfigError(f"config file {str(files[-1])!r}: {e}", key=e.key) from None


NO_CONVERT_TEACHER = (
    "attnxfer convert needs a teacher: set teacher.spec (timm name, hf-hub:ORG/NAME, local-dir:PATH or a "
    "weights file)"
)


def require_teacher(cfg: TrainConfig, conversion: bool = False) -> None:
    """A run that needs a teacher (a transfer mode other than none; any ``conversion``) and names none stops in
    one line: as its command starts (before torch is imported, or a resume judged), as its parts are built (a
    notebook's), and in `attnxfer submit` before the job is queued, not in the job after the queue's wait."""
    if cfg.teacher.spec:
        return
    if conversion:
        raise ConfigError(NO_CONVERT_TEACHER)
    if cfg.transfer.mode != "none":
        raise ConfigError(
            f"transfer.mode={cfg.transfer.mode} needs a teacher: set teacher.spec to a timm name "
            "(vit_base_patch16_224.mae), hf-hub:ORG/NAME, local-dir:PATH or a weights file; "
            "or use transfer.mode=none"
        )
