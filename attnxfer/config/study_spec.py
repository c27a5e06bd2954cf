"""A study's configuration (`attnxfer study`): one base config and K students trained (or, ``command:
convert``, converted) from one teacher on one stream of batches, each a name and the keys it changes, from a
``students:`` list and/or ``--vary KEY=V1,V2`` (crossed). A key every student must share is refused first."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..run_layout import RUN_RECORD, STAGE_DIRS, STUDY_FILES, STUDY_RECORD, STUDY_YAML
from .loading import COMMAND_KEY, STUDENTS_KEY, recipe_chain, resolve_recipe
from .overrides import (
    ConfigError,
    TypedStr,
    apply_overrides,
    dump_config,
    merge_values,
    merged_into_base,
    parse_overrides,
    to_dict,
    validate_config,
)
from .renamed import find_key
from .schema import TrainConfig, config_keys
from .strict_yaml import load_yaml, yaml_value

#: what every student of a study shares (keys, and ``section.`` prefixes): one batch and one teacher pass per
#: step, one schedule length and one way of saving for all
SHARED_KEYS: tuple[str, ...] = (
    "run_dir",
    "device",
    "precision",
    "deterministic",
    "teacher.",
    "data.",
    "aug.",
    "schedule.epochs",
    "schedule.max_steps",
    "optim.accum_steps",
    "checkpoint.",
    "log.",
    "eval.",
    "dist.",
)

#: what the students of a convert study share besides: one stage-1 batch and teacher pass per stage-1 step,
#: one set of probe images, one speed measurement
CONVERT_SHARED_KEYS: tuple[str, ...] = (
    "convert.stage1_batch_size",
    "convert.agreement_batches",
    "convert.speed_batch_size",
    "convert.speed_repeats",
    "convert.speed_sweep",
)


def shared_by_students(key: str, command: str) -> bool:
    """Whether every student of a study of ``command`` (train or convert) shares ``key``: no student sets it."""
    keys = SHARED_KEYS + (CONVERT_SHARED_KEYS if command == "convert" else ())
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in keys)


#: what a study runs for each student: `attnxfer train` (the default) or `attnxfer convert`
COMMANDS: tuple[str, ...] = ("train", "convert")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,-]*$")


@dataclass(frozen=True)
class Student:
    """One student of a study: its name (its folder in the study's run dir) and the keys it changes."""

    name: str
    overrides: Mapping[str, Any]

    def describe(self) -> str:
        # a value a YAML list typed is shown as YAML writes it (null, false, [a, b]); a string as given
        shown = {k: v if isinstance(v, str) else yaml_value(v) for k, v in self.overrides.items()}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) or "the base config"


@dataclass(frozen=True)
class StudySpec:
    """A study: its base config (``run_dir``: the study's folder), its students in order (the report compares
    the others with the first), and what it runs for each (`COMMANDS`)."""

    base: TrainConfig
    students: tuple[Student, ...]
    command: str = "train"

    @property
    def run_dir(self) -> str:
        return self.base.run_dir

    @property
    def device(self) -> str:
        return self.base.device

    @property
    def dist(self) -> Any:
        """The base's ``dist`` section (a submitted study's process group reads its timeout)."""
        return self.base.dist

    def shared_base(self) -> TrainConfig:
        """The base as every student reads it: the data's seed written out (students seeded differently still
        read the study's batches), which no student changes."""
        seed = self.base.data.seed if self.base.data.seed is not None else self.base.seed
        return dataclasses.replace(self.base, data=dataclasses.replace(self.base.data, seed=seed))

    def config_of(self, student: Student) -> TrainConfig:
        """The student's whole config as `attnxfer train` would run it alone: the shared base with its keys
        set, in its own folder."""
        base = self.shared_base()
        cfg = apply_overrides(base, dict(student.overrides)) if student.overrides else base
        return dataclasses.replace(cfg, run_dir=str(Path(self.base.run_dir) / student.name))

    def configs(self) -> list[tuple[Student, TrainConfig]]:
        return [(s, self.config_of(s)) for s in self.students]

    def with_overrides(self, overrides: Mapping[str, Any]) -> StudySpec:
        """The study with base keys set (what `attnxfer submit --sweep` does to a config)."""
        return dataclasses.replace(self, base=apply_overrides(self.base, overrides))

    def __str__(self) -> str:
        """The study as YAML: its base config and its students (``attnxfer study -c`` reads it back)."""
        listed = "\n".join(
            f"  - name: {s.name}" + "".join(f"\n    {k}: {json.dumps(v)}" for k, v in s.overrides.items())
            for s in self.students
        )
        command = f"{COMMAND_KEY}: {self.command}\n" if self.command != "train" else ""
        return f"{dump_config(self.base, self.command).rstrip()}\n{command}{STUDENTS_KEY}:\n{listed}\n"

    def record(self) -> list[dict[str, Any]]:
        """``study.json``'s students: each name, its overrides and its folder (relative to the study)."""
        return [{"name": s.name, "overrides": dict(s.overrides), "folder": s.name} for s in self.students]


def load_study(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    vary: Mapping[str, Sequence[str]] | None = None,
    command: str | None = None,
) -> StudySpec:
    """The study a YAML file (``students:`` and ``command:`` beside the base keys), base overrides, ``--vary``
    and ``--command`` (agreeing with the YAML's) describe; every student checked before any work."""
    base, listed, written = _base_and_students(path)
    command = _command(command, written, path)
    if overrides:
        base = apply_overrides(base, parse_overrides(overrides))
    base = validate_config(base)
    students = names_on_record(base.run_dir, _cross(listed, _combinations(vary)))
    names = [s.name for s in students]  # each student once: two with one name would share a folder
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ConfigError(f"two students are named {twice!r}: give each student its own name")
    if not students:
        # a study's folder named by run_dir= alone: its own YAML lists them
        own = Path(base.run_dir) / STUDY_YAML
        folder = None if path is None else resolve_recipe(path).parent
        records = {RUN_RECORD: "run", f"{STAGE_DIRS[1]}/{RUN_RECORD}": "conversion"}
        run = next((what for f, what in records.items() if folder and (folder / f).is_file()), None)
        if run is not None:  # a run's own config.yaml lists no students: it is not what was meant
            raise ConfigError(
                f"config file {str(path)!r} is the config of the {run} {folder}, not of a study: it lists no "
                "students; give a study's own YAML (-c STUDY/study.yaml), or start a study from this config "
                "with --vary KEY=V1,V2 and a run_dir=... of its own"
            )
        raise ConfigError(
            "a study needs students: list them under students: in the YAML (each a name and the keys it "
            "changes) or vary keys with --vary KEY=V1,V2"
            + (f"; the study in {base.run_dir} lists its own: -c {own}" if own.is_file() else "")
        )
    spec = StudySpec(base, tuple(students), command)
    runs: dict[str, str] = {}  # each student's config as it trains (its folder aside): the student it is
    for student in spec.students:
        _check_student(student, command)
        try:
            cfg = spec.config_of(student)
        except ConfigError as e:
            raise ConfigError(f"student {student.name!r}: {e}") from None
        # every section: a key of one the command does not read is refused for that below, not as a twin
        whole = json.dumps(
            dataclasses.asdict(dataclasses.replace(cfg, run_dir="")), sort_keys=True, default=str
        )
        same = runs.setdefault(whole, student.name)
        if same != student.name:  # one seed, one data order: the same weights trained twice
            raise ConfigError(
                f"students {same!r} and {student.name!r} train the same config (the same seed too): the study "
                "would train one run twice; give one of them the key it should differ in (a seed=... of its "
                "own for a repeat), or drop it"
            )
    return spec


def from_text(text: str) -> TrainConfig | StudySpec:
    """A run's config or a study as its YAML reads (`dump_config`'s, `StudySpec`'s): merged as a file's keys
    are, unchecked (checked as it was written)."""
    data = dict(load_yaml(text))
    if STUDENTS_KEY not in data:
        return merge_values(TrainConfig(), data)
    students = tuple(_listed(Path(STUDY_YAML), data.pop(STUDENTS_KEY)))
    command = data.pop(COMMAND_KEY, "train")
    return StudySpec(merge_values(TrainConfig(), data), students, command)


def study_base(path: str | Path | None) -> TrainConfig:
    """The base config a study's YAML writes, its students set aside (what ``--print-config`` compares with)."""
    return _base_and_students(path)[0]


def _base_and_students(path: str | Path | None) -> tuple[TrainConfig, list[Student], str | None]:
    """(the base config of a study's YAML, its listed students, the command it names): the nearest file's list
    and command win over those of the recipes it starts from."""
    cfg, listed, command = TrainConfig(), None, None
    if path is None:
        return cfg, [], None
    p = resolve_recipe(path)
    chain = recipe_chain(p)
    sections = {key for _, data in chain for key in data}
    if "mae" in sections and "transfer" not in sections:  # an older train run's config.yaml has both
        raise ConfigError(  # MAE pre-training's config: no student to vary, no teacher to ask for
            f"{path} is MAE pre-training's config (its mae section only `attnxfer pretrain` reads): run attnxfer "
            f"pretrain -c {path}; a study trains or converts students"
        )
    for depth, (file, data) in enumerate(chain):
        data = dict(data)
        if STUDENTS_KEY in data:
            listed = (file, data.pop(STUDENTS_KEY))
        if COMMAND_KEY in data:
            command = str(data.pop(COMMAND_KEY))
        for key in (k for k in data if k not in {f.name for f in dataclasses.fields(TrainConfig)}):
            if near := difflib.get_close_matches(str(key), (STUDENTS_KEY, COMMAND_KEY), n=1, cutoff=0.7):
                raise ConfigError(
                    f"config file {str(file)!r}: unknown key {key!r}; did you mean {near[0]!r}?"
                )
        cfg = merge_values(cfg, merged_into_base(data) if depth else data)  # as `load_config` merges
    if (p.parent / STUDY_RECORD).is_file():  # a study's own study.yaml: the study is the folder it sits in
        cfg = dataclasses.replace(cfg, run_dir=str(p.parent.absolute()))
    return cfg, [] if listed is None else _listed(*listed), command


def _command(flag: str | None, written: str | None, path: str | Path | None) -> str:
    """The study's command: ``--command``, the YAML's ``command:``, else train; the two must agree."""
    for value in (flag, written):
        if value is not None and value not in COMMANDS:
            raise ConfigError(
                f"{COMMAND_KEY}: {value!r} is not a study's command; choose one of {', '.join(COMMANDS)}"
            )
    if flag is not None and written is not None and flag != written:
        raise ConfigError(
            f"config file {str(path)!r} is a study of {COMMAND_KEY}: {written}, and --command says {flag}: drop "
            "--command, or run the other command's study elsewhere (run_dir=...)"
        )
    return flag or written or "train"


def _listed(file: Path, entries: Any) -> list[Student]:
    where = f"config file {str(file)!r}: students"
    if not isinstance(entries, list):
        raise ConfigError(f"{where} must be a list, each entry a name and its keys (- name: copy ...)")
    students = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}[{i}] must be a mapping with a name and the keys it changes")
        if "name" not in entry:  # its keys as given: a misspelt `nme:` among them
            raise ConfigError(
                f"{where}[{i}] has no name (its keys: {', '.join(map(str, entry))}): give it one"
            )
        name = entry["name"]
        if name is None:  # `name:` with nothing after it
            raise ConfigError(f"{where}[{i}] has an empty name: give it one (its folder in the study)")
        if isinstance(name, bool):  # YAML's switches: on, off, yes, no, true, false
            raise ConfigError(
                f"{where}[{i}] name: YAML reads it as the switch {name}, not a name: quote it (name: 'off')"
            )
        keys = {k: v for k, v in entry.items() if k != "name"}
        flat = _flat(keys, where=f"{where}[{i}] ({entry['name']})")
        typed = {k: TypedStr(v) if isinstance(v, str) else v for k, v in flat.items()}
        students.append(Student(str(entry["name"]), typed))
    return students


def _flat(data: Mapping[str, Any], prefix: str = "", where: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (``{transfer: {mode: copy}}`` -> ``{"transfer.mode": "copy"}``); a
    section's mapping-valued key (``model.kwargs``) stays one value. A key given both ways is refused (in
    ``where``): one of its values would be dropped without a word."""
    # every section's dotted name: each key's proper prefixes
    sections = {k.rsplit(".", i)[0] for k in config_keys() for i in range(1, k.count(".") + 1)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        nested = isinstance(value, Mapping) and dotted in sections
        for k, v in (_flat(value, f"{dotted}.", where) if nested else {dotted: value}).items():
            if k in out:
                raise ConfigError(f"{where} gives {k} twice, dotted and nested; keep one of them")
            out[k] = v
    return out


def _combinations(vary: Mapping[str, Sequence[str]] | None) -> list[Student]:
    """The cartesian product of ``--vary``'s values, each student named by what it sets: a word value alone
    (``copy``), else the key's last part and value (``atd_weight=3``), ``_`` between; every key spelled out
    whole where names would not be unique."""
    if not vary:
        return []
    for key, values in vary.items():
        # compared as the run reads them: 0.001 and 1e-3 would be one student twice
        read = [_as_read(key, v) for v in values]
        twice = next((v for i, v in enumerate(values) if read[i] in read[:i]), None)
        if twice is not None:
            raise ConfigError(f"--vary {key} lists {twice!r} twice: each value makes one student")
    keys = list(vary)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves, strict=True)}
    alone = {k: all(_WORD.match(v) and v.lower() not in _NOT_NAMES for v in vary[k]) for k in keys}
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(vary[k] for k in keys))]
    # each key's part a folder name of its own: a value's end (runs/a/) is not left as a dash before the next
    names = [
        "_".join(_folder_name(v if alone[k] else f"{short[k]}={v}") for k, v in c.items()) for c in combos
    ]
    if len(set(names)) < len(names):
        names = ["_".join(_folder_name(f"{k}={v}") for k, v in c.items()) for c in combos]
    # a value read as null kept as None: study.yaml would quote "null", which reads back as that string
    nulls = [{k: None if _as_read(k, v) is None else v for k, v in c.items()} for c in combos]
    return [Student(_folder_name(n), c) for n, c in zip(names, nulls, strict=True)]


def _as_read(key: str, value: str) -> Any:
    """``value`` of ``key`` as a run's config holds it (typed, a mapping key's entry included); an old spelling's
    (`renamed.py`: the config has no such key) as given."""
    found, read = find_key(to_dict(apply_overrides(TrainConfig(), {key: value})), key)
    return read if found else value


#: a value that names a student alone (``copy``, ``hedgehog``); numbers and switches need their key beside them
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9._+-]*$")
_NOT_NAMES = frozenset({"true", "false", "null", "none", "yes", "no", "on", "off"})


def _folder_name(label: str) -> str:
    """``label`` as a folder name: each run of other characters one ``-``, dropped at either end and beside
    ``=`` or ``,`` (a list or mapping value: ``losses=[{name: mse}]`` names ``losses=name-mse``)."""
    other = "[^A-Za-z0-9._=+,-]+"
    return re.sub(other, "-", re.sub(f"^{other}|(?<=[=,]){other}|{other}(?=[=,]|$)", "", label))


def recorded_students(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The students the study in ``run_dir`` started with, as its study.json lists them (each its name,
    overrides and folder); None where no study is there to read."""
    try:
        listed = json.loads((Path(run_dir) / STUDY_RECORD).read_text())["students"]
        return [{k: entry[k] for k in ("name", "overrides", "folder")} for entry in listed]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def names_on_record(run_dir: str | Path, students: Sequence[Student]) -> list[Student]:
    """``students`` as the study already in ``run_dir`` named and wrote the same students: a study started
    when ``--vary`` named folders ``transfer.mode=copy`` goes on in them, and ``--vary atd_weight=1.0,3.0``
    goes on with the students of ``atd_weight=1,3`` (the same values, as YAML reads them)."""
    listed = recorded_students(run_dir)

    def values(overrides: Mapping[str, Any]) -> dict[str, Any]:  # 1 and 1.0 alike, true and 1 not
        read = {
            k: load_yaml(v) if isinstance(v, str) else v
            for k, v in json.loads(json.dumps(dict(overrides))).items()
        }
        return {k: repr(v) if isinstance(v, bool) else v for k, v in read.items()}

    if listed is None or [values(e["overrides"]) for e in listed] != [values(s.overrides) for s in students]:
        return list(students)
    return [Student(str(e["name"]), e["overrides"]) for e in listed]


def _cross(listed: list[Student], varied: list[Student]) -> list[Student]:
    if not listed or not varied:
        return listed or varied
    out = []
    for a, b in itertools.product(listed, varied):
        both = sorted(set(a.overrides) & set(b.overrides))
        if both:
            raise ConfigError(
                f"student {a.name!r} sets {', '.join(both)}, which --vary varies too: drop it from one of them"
            )
        out.append(Student(f"{a.name}_{b.name}", {**a.overrides, **b.overrides}))
    return out


def _check_student(student: Student, command: str) -> None:
    safe = _folder_name(student.name)
    if not _NAME.match(student.name) or student.name in (".", ".."):
        e_g = f"; e.g. {safe!r}" if _NAME.match(safe) else ""  # none where no such name is in it ('.', '/')
        raise ConfigError(
            f"student name {student.name!r} must be a folder name (letters, digits, . _ = + , -, starting with a "
            f"letter or digit{e_g})"
        )
    if student.name in STUDY_FILES:  # a student's run folder sits in the study's folder, beside these
        raise ConfigError(
            f"student name {student.name!r} is taken by the study's own {', '.join(STUDY_FILES)}: rename it"
        )
    shared = [k for k in student.overrides if shared_by_students(k, command)]
    if shared:
        raise ConfigError(
            f"student {student.name!r} sets {', '.join(shared)}, which every student of a study shares (one "
            "batch, one teacher pass and one schedule for all): set it once for the study (-c BASE or a "
            "key=value before --vary), or run another study"
        )
