"""What a resumed run may change: the new config is compared with the one its checkpoint recorded.

A run continues only as the run it is. How it is optimised, how long, how it logs and saves, and where
it runs may change between attempts (the changes are printed); what the checkpoint's weights, optimiser
state and data position mean (model, teacher, transfer plan, data, batch) may not: that stops before
anything is written, naming the keys, and says how to start a new run instead. Which keys may change is
declared with each key (``key(..., resumable=True)`` in `attnxfer/config/schema.py`): `RESUMABLE_KEYS`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoints.resume_from import ResumeFrom
from ..checkpoints.run_dir import RunDir
from ..checkpoints.store import STATE_NAME, CheckpointError, CheckpointManager
from ..config import RESUMABLE_KEYS, ConfigError, TrainConfig, config_keys, find_key, respell, to_dict
from .world_size import BATCH_SPLIT_KEYS, keeps_global_batch

__all__ = [
    "RESUMABLE_KEYS",
    "allow_respelled_teacher",
    "check_resume",
    "check_teacher_content",
    "config_changes",
    "resume_source",
    "student_as_trained",
]


# what scoring a checkpoint may change besides RESUMABLE_KEYS: whether the data's labels are read (training
# without them changes no weight's meaning; the scores that need them do)
SCORING_KEYS = ("data.labels",)


def _may_change(key: str, resumable: Sequence[str]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in resumable)


def config_changes(
    recorded: dict[str, Any], cfg: TrainConfig, resumable: Sequence[str] = RESUMABLE_KEYS
) -> tuple[list[str], list[str]]:
    """``(allowed, refused)`` differences between a recorded config dict and ``cfg``, as readable lines;
    ``resumable`` lists the keys (and ``section.`` prefixes) a resumed run may change. A key's old spelling
    in the recorded config is read as its new one (`attnxfer.config.renamed`)."""
    recorded = respell(recorded, note=False)
    new = to_dict(cfg)
    allowed, refused = [], []
    for key in config_keys():
        known, old_value = find_key(recorded, key)
        if not known:
            continue  # recorded by an older attnxfer without this key
        _, new_value = find_key(new, key)
        if old_value == new_value:
            continue
        line = f"{key} ({old_value!r} -> {new_value!r})"
        (allowed if _may_change(key, resumable) else refused).append(line)
    return allowed, refused


def resume_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint dir ``cfg`` would resume from (cheap checks, no hashing), or None."""
    info = ResumeFrom.parse(cfg.checkpoint.resume).checkpoint(
        CheckpointManager(cfg.run_dir), verify_hash=False
    )
    return None if info is None else info.path


def check_resume(cfg: TrainConfig, log=print, world: int | None = None, scoring: bool = False) -> Path | None:
    """Refuse a resume whose config changes what the checkpoint means; log the changes it may make.

    With ``world`` (this run's number of processes), the per-rank batch and accumulation steps may change
    when they keep the recorded global batch (`attnxfer.apps.world_size`). ``scoring`` (`attnxfer eval`,
    which trains nothing) may also turn ``data.labels`` on: a run trained without labels is scored by its
    k-NN top-1 on the labelled split. Returns the checkpoint it checked against (None: the run starts
    fresh). Writes nothing.
    """
    source = resume_source(cfg)
    if source is None:
        return None
    try:
        state = json.loads((source / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the recorded state of {source}: {e}") from e
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        return source  # a checkpoint written without its config: nothing to compare with
    resumable = RESUMABLE_KEYS
    if world is not None and keeps_global_batch(source, cfg, world):
        resumable = (*resumable, *BATCH_SPLIT_KEYS)
    if scoring:
        resumable = (*resumable, *SCORING_KEYS)
    allowed, refused = config_changes(recorded, cfg, resumable)
    allow_respelled_teacher(state.get("teacher"), allowed, refused)
    if refused:
        run = Path(cfg.run_dir)
        raise ConfigError(
            f"{run} already holds a run (checkpoint {source.name}) trained with different values for: "
            f"{'; '.join(refused)}. These cannot change when a run resumes; nothing was written. To train "
            "with the new values, start a new run elsewhere (run_dir=...); to continue this run, drop them "
            f"(its config: {run / 'config.yaml'})"
        )
    if allowed:
        log(f"resume: changed since {source.name}: {', '.join(allowed)}")
    return source


def allow_respelled_teacher(recorded: dict[str, Any] | None, allowed: list[str], refused: list[str]) -> None:
    """Move a changed ``teacher.spec`` from ``refused`` to ``allowed`` when the saved state records the
    teacher's weights hash: the teacher is then judged by content once loaded (`check_teacher_content`)."""
    respelled = [r for r in refused if r.startswith("teacher.spec ")]
    if respelled and (recorded or {}).get("sha256"):
        refused.remove(respelled[0])
        allowed.append(f"{respelled[0]} [the weights must hash as recorded]")


def check_teacher_content(
    source: Path | None, record: dict[str, Any] | None, spec: str, *, run: Path | None = None
) -> None:
    """Refuse a resume whose teacher's weights differ from the ones the checkpoint was trained with.

    Teachers are compared by content (the sha256 of the weights file the checkpoint records), not by the
    spelling of ``teacher.spec``: ``local-dir:teacher`` and ``local-dir:/abs/teacher``, or a teacher folder
    that moved, are the same teacher. Teachers without a hash (random weights) keep the spelling rule of
    `check_resume`. ``source`` is a checkpoint dir of ``run`` (default: its grandparent) or, with ``run``
    given, any dir holding a ``state.json`` with a ``teacher`` record (a search's run dir). Writes nothing.
    """
    if source is None:
        return
    try:
        state = json.loads((source / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the recorded state of {source}: {e}") from e
    old = state.get("teacher") or {}
    want, have = old.get("sha256"), (record or {}).get("sha256")
    if not want or want == have:
        return
    saved = (
        f"the checkpoint {source.name} learned from"
        if run is None
        else f"the one its saved state ({source / STATE_NAME}) records"
    )
    run = source.parent.parent if run is None else run
    raise ConfigError(
        f"{run} was trained with teacher {old.get('spec')!r} (weights sha256 {want}), but teacher.spec={spec!r} "
        f"{'has random weights' if have is None else f'has weights sha256 {have}'}: another teacher than "
        f"{saved}; nothing was written. To continue this run, point teacher.spec "
        "at the original weights; to train with this teacher, start a new run elsewhere (run_dir=...)"
    )


def student_as_trained(run_dir: str | Path, built: dict[str, Any], *, scoring: bool) -> dict[str, Any] | None:
    """The student spec run.json records where the config builds another student (another architecture or
    attention), else None. Weights of one attention load into another's projections without a complaint
    (a relu_linear student's qkv fits a softmax block), so this is checked before any checkpoint is read.

    Scoring (`attnxfer eval`) returns the recorded spec, for the caller to rebuild the student it scores
    (a conversion's stage 2 records ``convert.attention``, not ``model.attention``); resuming training
    refuses in one line, since the config would train another model."""
    run = RunDir(run_dir)
    if not built or not run.is_run():  # parts a notebook built carry no spec to compare
        return None
    recorded = run.record().get("student")
    if not recorded or _same_student(recorded, built):
        return None
    if scoring:
        return recorded
    raise ConfigError(
        f"run_dir={run.path}: this config builds a student with {built.get('attention')!r} attention "
        f"({built.get('architecture')}), but the run trained one with {recorded.get('attention')!r} "
        f"({recorded.get('architecture')}); resume with the run's own config (-c {run.config_file}) or "
        "choose another run_dir"
    )


def _same_student(recorded: dict[str, Any], built: dict[str, Any]) -> bool:
    return all(recorded.get(k) == built.get(k) for k in ("architecture", "attention", "num_classes"))
