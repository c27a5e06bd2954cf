"""Resuming, judged once by one rule: a run continues only as the run it is.

How it is optimised, how long, how it logs and saves and where it runs may change (the changes are printed);
what the checkpoint's weights, optimiser state and data position mean may not: that stops before anything
is written, naming the keys. Which keys may change is declared with each key (`RESUMABLE_KEYS`,
`SEARCH_RESUMABLE_KEYS`), widened here by context: the batch split on another world size, scoring, a
teacher spelled another way whose weights hash as recorded, the same data in another folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ...checkpoints.resume_point import KeyChange, ResumePoint
from ...checkpoints.run_dir import RunDir
from ...config import RESUMABLE_KEYS, ConfigError, TrainConfig, config_keys, find_key, respell, to_dict
from ...config.loading import load_config
from ...errors import MissingPathError
from ...models.efficient.swap import options_in_effect
from ...sources.resolve import LocalModelMissing, Source, sha256_file
from ...speak import say, warn
from ...train.devices import Device, resolve_precision
from ...transfer import PlanError
from ...transfer.comparisons import comparison_from_entry
from .world_size import BATCH_SPLIT_KEYS, keeps_global_batch, recorded_split, split_for_world

# what scoring a checkpoint may change besides RESUMABLE_KEYS: whether the data's labels are read (training
# without them changes no weight's meaning; the scores that need them do)
SCORING_KEYS = ("data.labels",)

#: the keys only convert.attention=auto's choice of attentions reads (`apps.convert.selection`): an auto
#: conversion judges them against its recorded choice before its stages, and one of named attentions never
#: reads them (it warns that they are unused), so neither's stage 2 is refused for them
CHOICE_KEYS = (
    "convert.speedup",
    "convert.speed_tokens",
    "convert.candidates",
    "convert.selection_steps",
    "convert.selection_batches",
)


def _may_change(key: str, resumable: Sequence[str]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in resumable)


def _in_effect(key: str, value: Any, configs: Sequence[dict[str, Any]]) -> Any:
    """``transfer.losses`` entries and an attention's options (``*.attention_kwargs``, of the attentions
    ``configs`` name: both runs', so that another attention alone changes no option) with every option at the
    value the run uses (a default written out, or left out by an older run's record, is no change); an entry
    no loss reads, an attention not registered here, as written."""
    if key in ("model.attention_kwargs", "convert.attention_kwargs") and isinstance(value, dict):
        names = []
        for config in configs:
            found = find_key(config, key.removesuffix("_kwargs"))[1]
            found = find_key(config, "convert.candidates")[1] if found == "auto" else found
            names += [found] if isinstance(found, str) else found or []
        with contextlib.suppress(KeyError, ValueError):
            if names:  # options of no attention (refused as the student is built) stay as written
                return options_in_effect(names, value)
    if key != "transfer.losses" or not isinstance(value, list):
        return value
    out = []
    for i, entry in enumerate(value):
        try:
            c = comparison_from_entry(entry, f"{key}[{i}]")
        except PlanError:
            out.append(entry)
            continue
        out.append((c.loss, str(c.signal), c.weight, c.layers, {k: c.option(k) for k in c.loss_fn.options}))
    return out


def config_changes(
    recorded: dict[str, Any],
    cfg: TrainConfig,
    resumable: Sequence[str] = RESUMABLE_KEYS,
    compared: Sequence[str] | None = None,
    command: str = "train",
) -> list[KeyChange]:
    """Every key whose value in ``cfg`` differs from the recorded config, and whether ``resumable`` (keys and
    ``section.`` prefixes) lets a resume change it. ``compared`` limits the comparison to what a saved state
    depends on (stage 1 of a conversion reads no stage-2 key), ``command`` to the sections it reads (a run
    recorded with every section resumes whatever another command's says). Keys an older attnxfer did not
    record are skipped; old spellings are read as new ones."""
    recorded = respell(recorded, note=False)
    new = to_dict(cfg, command)
    changes = []
    for key in config_keys():
        if key.split(".", 1)[0] not in new or (compared is not None and not _may_change(key, compared)):
            continue
        if key == "checkpoint.resume":  # where the run starts (its resume line says which), not what it is
            continue
        known, old_value = find_key(recorded, key)
        if not known:
            continue
        _, new_value = find_key(new, key)
        # a run_dir spelled otherwise (./r, an absolute path) naming the folder it resumes is no change
        both = (recorded, new)
        if _in_effect(key, old_value, both) != _in_effect(key, new_value, both) and not (
            key == "run_dir" and Path(old_value).resolve() == Path(new_value).resolve()
        ):
            changes.append(KeyChange(key, old_value, new_value, _may_change(key, resumable)))
    return changes


def judge(
    point: ResumePoint | None,
    cfg: TrainConfig,
    *,
    world: int | None = None,
    scoring: bool = False,
    resumable: Sequence[str] = RESUMABLE_KEYS,
    compared: Sequence[str] | None = None,
    run_dir: str | Path | None = None,
    what: str = "run",
    command: str = "train",
    reader: str | None = None,
    config_file: Path | None = None,
    said: bool = True,
) -> ResumePoint | None:
    """``point`` with the config keys that changed since it was saved; refuses (one `ConfigError`, nothing
    written) a change that alters what the checkpoint means, and says the allowed ones. With ``world``, the
    batch split may change where it keeps the global batch; ``scoring`` (`attnxfer eval`, or ``reader``:
    a command that reads the run's own config.yaml, which says nothing of allowed changes) may turn
    ``data.labels`` on (a run trained without labels scored by k-NN). ``config_file``: what ``-c`` continues
    it from where that is not its config.yaml (a study's study.yaml); ``said`` False: the allowed changes
    not said, its caller's to say (a study's student: its study says them once)."""
    if point is None or point.config is None:  # nothing found, or saved without its config
        return point
    if world is not None and keeps_global_batch(point, cfg, world):
        resumable = (*resumable, *BATCH_SPLIT_KEYS)
    if scoring:
        resumable = (*resumable, *SCORING_KEYS)
    changes = config_changes(point.config, cfg, resumable, compared, command)
    allowed_here = {}  # keys this checkpoint lets change, and why
    # a recorded weights hash lets teacher.spec change: `check_teacher_content` judges the teacher once loaded
    if (point.teacher or {}).get("sha256"):
        allowed_here["teacher.spec"] = "the weights must hash as recorded"
    # a logit temperature is read only by logit distillation: a run without it (recipes set one) goes on
    if not cfg.transfer.logit_distill and not find_key(point.config, "transfer.logit_distill")[1]:
        allowed_here["transfer.logit_temperature"] = "read only where transfer.logit_distill > 0"
    # a conversion's stage 2 does not read the choice's keys (`CHOICE_KEYS`): its recorded choice judges them
    if command == "convert":
        allowed_here |= dict.fromkeys(
            CHOICE_KEYS, "read only to choose attentions for convert.attention=auto"
        )
    # a precision word that trains as the recorded one does on this device (auto is fp32 on CPU) changes
    # nothing: auto's own dtype already follows the device, which a resume may change
    if old := next((c.old for c in changes if c.key == "precision"), None):
        here = torch.device("cuda" if Device(cfg.device).uses_cuda else "cpu")
        if (now := resolve_precision(cfg.precision, here)) is resolve_precision(old, here):
            allowed_here["precision"] = f"both train in {now} on {here.type}"
    changes = [
        KeyChange(c.key, c.old, c.new, True, allowed_here[c.key])
        if c.key in allowed_here and not c.allowed
        else c
        for c in changes
    ]
    point = point.judged(changes)
    if point.refused:
        run = Path(run_dir or cfg.run_dir)
        changed = f"trained with different values for: {'; '.join(map(str, point.refused))}"
        if not Path(point.path).resolve().is_relative_to(run.resolve()):  # checkpoint.resume=PATH elsewhere
            other = Path(point.path).parent.parent
            if scoring:  # eval: that run's own config scores it
                raise ConfigError(
                    f"checkpoint.resume={point.path} is another {what}'s checkpoint, {changed}; score it with "
                    f"that run's own config: attnxfer eval -c {other / 'config.yaml'}"
                )
            raise ConfigError(
                f"checkpoint.resume={point.path} is another {what}'s checkpoint, {changed}. A resume continues "
                f"that {what} as it was; nothing was written. To start from its weights with the new values: "
                f"attnxfer export {other} OUT, then model.init=local-dir:OUT without checkpoint.resume"
            )
        own = config_file or RunDir(run).config_file
        own = own if own.is_file() else RunDir(cfg.run_dir).config_file  # stage 1's: its conversion's
        config = own if own.is_file() else point.path
        # the run's own config.yaml edited since (read by export or inspect, or given to eval -c): no
        # command line to drop the values from
        edited = reader is not None
        # a conversion's config.yaml holds its new values while its stage 1 is judged (put back on a refusal)
        if not edited and config == own and (scoring or what == "run"):
            with contextlib.suppress(ConfigError):
                now = to_dict(load_config(str(own)))
                edited = all(find_key(now, c.key) == (True, c.new) for c in point.refused)
        if scoring and edited:
            raise ConfigError(
                f"{run} holds a {what} (checkpoint {point.name}) {changed}, not as {config} says now; "
                f"{reader or 'eval'} reads it as it was trained: put those values back in {config}"
            )
        if scoring:  # eval continues nothing: a new run elsewhere would have nothing to score
            raise ConfigError(
                f"{run} holds a {what} (checkpoint {point.name}) {changed}; eval scores it as it was trained: "
                f"drop them, or score it with its own config (attnxfer eval -c {config})"
            )
        # a per-rank batch may change with accum_steps where the global batch stays
        batch_only = world is not None and {c.key for c in point.refused} <= set(BATCH_SPLIT_KEYS)
        recorded = recorded_split(point) if batch_only else None
        fitting = recorded and split_for_world(recorded.global_batch, world, cfg.data.batch_size)
        split = (
            f", or keep its global batch with {fitting.overrides()}"
            if fitting and fitting != recorded
            else ""
        )
        raise ConfigError(
            f"{run} already holds a {what} (checkpoint {point.name}) {changed}. These cannot change when a "
            f"{what} resumes; nothing was written. To train with the new values, start a new {what} elsewhere "
            f"(run_dir=...) or start it over here (checkpoint.resume=none, which keeps the earlier one aside); "
            f"to continue this one, give them the values it recorded: "
            f"{KeyChange.restoring(point.refused)}{split}"
            # a search writes none; the run's own, edited since it was written, is where they go back
            + (f" (its config: {config})" if own.is_file() and not edited else "")
            + (f", in {config}, which says the new values since it was edited" if edited else "")
        )
    # scored, a run's folder (moved or copied since) and what eval computes are no change to what was trained
    shown = [c for c in point.allowed if not (scoring and c.key.startswith(("run_dir", "eval.")))]
    if shown and reader is None and said:
        changed = ", ".join(map(str, shown))
        say(
            f"scoring {point.name} with keys changed since it was saved: {changed}"
            if scoring
            else f"resume: changed since {point.name}: {changed}"
        )
    return point


def config_as_trained(run: RunDir, reader: str) -> TrainConfig:
    """The run's config.yaml, refused as eval refuses it (`judge`) where it was edited since the run saved
    its checkpoints: ``reader`` (export's card, inspect's data and plan) would describe another run."""
    cfg = load_config(str(run.config_file))
    judge(ResumePoint.find(run.path, verify_hash=False), cfg, scoring=True, run_dir=run.path, reader=reader)
    return cfg


def check_teacher_content(
    point: ResumePoint | None,
    record: dict[str, Any] | None,
    spec: str,
    *,
    run: Path | str | None = None,
    scoring_alone: bool = False,
) -> None:
    """Refuse a resume whose teacher's weights file differs from the checkpoint's: compared by the sha256 the
    checkpoint records (the file's: the same weights resaved in another format differ), not by the spelling
    of ``teacher.spec`` (a moved folder is the same teacher). Teachers without a hash (random weights) keep
    the spelling rule of `judge`. ``scoring_alone``: eval of a student that attends without its teacher, whose
    own scores another teacher does not change: said, not refused."""
    if point is None:
        return
    old = point.teacher or {}
    want, have = old.get("sha256"), (record or {}).get("sha256")
    if not want or want == have:
        return
    run = point.path.parent.parent if run is None else Path(run)
    # a Hub branch that moved since: the commit the run resolved it to still names those weights; a local
    # teacher's folder replaced since (a later export) was set aside beside it, where the recorded file may be
    pinned = (
        f"hf-hub:{old['hf_repo']}@{old['hf_commit']}, the commit it trained with"
        if old.get("hf_repo") and old.get("hf_commit")
        else None
    )
    if pinned is None and (aside := _set_aside_teacher(spec, want)) is not None:
        pinned = f"local-dir:{aside}, where the folder's earlier contents were set aside"
    other = (
        f"{run} was trained with teacher {old.get('spec')!r} (a file of sha256 {want}), but "
        f"teacher.spec={spec!r} {'has random weights' if have is None else f'is a file of sha256 {have}'}: "
        f"another teacher file than the one {point.name} recorded (the same weights saved in another format "
        "are another file)"
    )
    recorded = f"teacher.spec at the recorded file{f' ({pinned})' if pinned else ''}"
    if scoring_alone:
        warn(
            f"warning: {other}. The student's own scores do not depend on it; a comparison with the teacher "
            f"(k-NN or features beside the teacher's) would be with this other one: for that, point {recorded}"
        )
        return
    raise ConfigError(
        f"{other}; nothing was written. To continue this run, point {recorded}; to train with this teacher, "
        "start it over here (checkpoint.resume=none, which keeps the earlier one aside) or elsewhere (run_dir=...)"
    )


def _set_aside_teacher(spec: str, sha256: str) -> Path | None:
    """The newest of a local teacher folder's set-aside copies (``FOLDER.replaced-*``: a later export or
    pre-training replaced it) holding the weights file of ``sha256``; None for another kind of spec."""
    if not spec.startswith("local-dir:"):
        return None
    folder = Path(spec.removeprefix("local-dir:"))
    for aside in sorted(folder.parent.glob(f"{folder.name}.replaced-*"), reverse=True):
        if any(sha256_file(f) == sha256 for f in aside.glob("*.safetensors")):
            return aside
    return None


@contextlib.contextmanager
def teacher_where_it_was(run: Path | str, resumes: bool) -> Iterator[None]:
    """A resumed run's (``resumes``) local teacher not found where it was named (the run's folder or the working
    folder moved) is named where it is now: not the demo's hint, whose new teacher its hash check refuses."""
    try:
        yield
    except LocalModelMissing as e:
        if not resumes or e.role != "teacher":
            raise
        prefix = "local-dir:" if e.spec.source is Source.LOCAL_DIR else ""
        raise MissingPathError(
            f"{e.said}; {run} resumes a run that learned from that teacher: "
            f"{'' if Path(e.spec.name).is_absolute() else 'run from the folder the run started in, or '}give "
            f"teacher.spec={prefix}/ABS/PATH where it is now (other weights, a new "
            "`attnxfer demo`'s, are refused by their hash)"
        ) from None


def check_same_data(
    point: ResumePoint | None,
    identity: dict[str, Any] | None,
    cfg: TrainConfig,
) -> bool:
    """Whether a resume goes on with its data position: True where the training data is what the checkpoint
    recorded (the same files in another ``data.root`` are the same data), or nothing to compare. Other data
    stops in one line unless ``checkpoint.allow_new_data``: then the epoch restarts on it (False)."""
    recorded = None if point is None else point.data
    if recorded is None or identity is None:
        return True
    if all(recorded.get(k) == identity.get(k) for k in ("samples", "fingerprint")):
        return True
    if recorded.get("of") != identity.get("of") and recorded.get("samples") == identity.get("samples"):
        say(
            f"resume: the checkpoint hashed its data another way ({recorded.get('of')}); the sample counts agree"
        )
        return True  # an older attnxfer listed what this one no longer reads whole (a stream, a HF table)
    what = f"{_describe_data(recorded)} at {point.name}, {_describe_data(identity)} now"
    if not cfg.checkpoint.allow_new_data:
        raise ConfigError(
            f"{cfg.run_dir}: the training data changed since the checkpoint was saved ({what}): its sampler "
            "position means nothing in other data; nothing was written. To go on with the new data from the start "
            "of an epoch, resume with checkpoint.allow_new_data=true; to continue on the recorded data, point "
            "data.root/data.dataset back at it; or start a new run elsewhere (run_dir=...)"
        )
    say(
        f"resume: the training data changed ({what}); checkpoint.allow_new_data=true: the epoch restarts on it"
    )
    return False


def _describe_data(identity: dict[str, Any]) -> str:
    samples = identity.get("samples")
    count = "an unknown number of" if samples is None else f"{samples:,}"
    return f"{count} training samples, {identity.get('of', 'fingerprint')} {str(identity.get('fingerprint'))[:12]}"


def student_as_trained(run_dir: str | Path, built: dict[str, Any], *, scoring: bool) -> dict[str, Any] | None:
    """The student spec run.json records where the config builds another student, else None: checked before
    any checkpoint is read, since one attention's weights load into another's projections without a
    complaint. Scoring gets the recorded spec to rebuild (a conversion's stage 2 records
    ``convert.attention``); resuming training refuses in one line."""
    run = RunDir(run_dir)
    if not built or not run.is_run():  # parts a notebook built carry no spec to compare
        return None
    recorded = run.record().get("student")
    keys = ("architecture", "attention", "num_classes")
    if not recorded or all(recorded.get(k) == built.get(k) for k in keys):
        return None
    if scoring:
        return recorded
    raise ConfigError(
        f"run_dir={run.path}: this config builds a student with {built.get('attention')!r} attention "
        f"({built.get('architecture')}), but the run trained one with {recorded.get('attention')!r} "
        f"({recorded.get('architecture')}); resume with the run's own config (-c {run.config_file}) or "
        "choose another run_dir"
    )
