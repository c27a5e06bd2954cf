"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases and MLflow, through accelerate's
tracker classes (`accelerate.tracking`), on rank 0 only.

Each tracker is one registered `TrackerKind`: its package (an optional extra, ``pip install 'attnxfer[wandb]'``),
how to build it for a run directory, and which id lets a resumed run continue the same tracker run. The ids
live in ``RUN_DIR/trackers.json`` (W&B's run ``id``, passed back with ``resume="allow"``; MLflow's ``run_id``
with the tracking URI it belongs to), so a job that is killed, requeued or extended keeps one curve per run.
W&B and MLflow get the run's config (dotted keys) and transfer plan as hyper-parameters; TensorBoard keeps
today's files (``RUN_DIR/tb``, redone steps purged on resume).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = [
    "TRACKERS",
    "TRACKERS_JSON",
    "TrackerKind",
    "TrackerMissingError",
    "TrackerSet",
    "check_trackers",
    "flat_hparams",
    "register_tracker",
]

#: the tracker run ids of a run directory, read back on resume
TRACKERS_JSON = "trackers.json"


class TrackerMissingError(InputError):
    """A tracker named in ``log.trackers`` whose package is not installed."""


@dataclass(frozen=True)
class TrackerContext:
    """What a tracker is built from: where the run lives, its name and project, and what a previous start
    of the same run recorded (empty on a fresh start)."""

    run_dir: Path
    run_name: str
    project: str
    previous: Mapping[str, Any]
    purge_step: int | None


@dataclass(frozen=True)
class TrackerKind:
    """One tracker: its config word, the module it needs (and the pip extra that brings it), how to build
    an accelerate tracker, what to record to resume it, and whether it takes hyper-parameters."""

    name: str
    module: str
    extra: str | None
    build: Callable[[TrackerContext], Any]
    resume_record: Callable[[Any], dict[str, Any]]
    takes_hparams: bool = True


TRACKERS: dict[str, TrackerKind] = {}


def register_tracker(kind: TrackerKind) -> TrackerKind:
    TRACKERS[kind.name] = kind
    return kind


def _tensorboard(ctx: TrackerContext):
    from accelerate.tracking import TensorBoardTracker

    # RUN_DIR/tb, as before; purge_step drops the events of steps a resumed run trains again
    return TensorBoardTracker("tb", ctx.run_dir, purge_step=ctx.purge_step)


def _wandb(ctx: TrackerContext):
    from accelerate.tracking import WandBTracker

    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = ctx.previous.get("id")
    return WandBTracker(ctx.project, dir=str(ctx.run_dir), id=run_id, resume="allow", name=ctx.run_name)


def _mlflow(ctx: TrackerContext):
    import mlflow
    from accelerate.tracking import MLflowTracker

    # MLflow's own setting decides where runs go (MLFLOW_TRACKING_URI); a recorded run is continued only
    # in the store it was created in
    same_store = ctx.previous.get("tracking_uri") == mlflow.get_tracking_uri()
    run_id = ctx.previous.get("run_id") if same_store else None
    return MLflowTracker(experiment_name=ctx.project, run_id=run_id, run_name=ctx.run_name)


def _mlflow_record(tracker) -> dict[str, Any]:
    import mlflow

    return {"run_id": tracker.active_run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}


register_tracker(
    TrackerKind("tensorboard", "tensorboard", None, _tensorboard, lambda t: {}, takes_hparams=False)
)
register_tracker(TrackerKind("wandb", "wandb", "wandb", _wandb, lambda t: {"id": t.run.id}))
register_tracker(TrackerKind("mlflow", "mlflow", "mlflow", _mlflow, _mlflow_record))


def check_trackers(names: Sequence[str]) -> None:
    """Stop before training when a named tracker's package is missing, with the pip command that adds it."""
    for name in names:
        if name not in TRACKERS:
            raise TrackerMissingError(
                f"log.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
            )
        kind = TRACKERS[name]
        if importlib.util.find_spec(kind.module) is None:
            how = f"pip install 'attnxfer[{kind.extra}]'" if kind.extra else f"pip install {kind.module}"
            raise TrackerMissingError(
                f"log.trackers includes {name}, but the {kind.module} package is not installed: "
                f"{how} (or remove {name} from log.trackers)"
            )


def flat_hparams(config: Mapping[str, Any], plan: str | None = None) -> dict[str, Any]:
    """The run's config as dotted keys with scalar values (lists and dicts as JSON), plus the plan's text:
    what W&B's config and MLflow's params hold."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, key + ".")
            elif v is None or isinstance(v, (bool, int, float, str)):
                out[key] = v
            else:
                out[key] = json.dumps(v, default=str)

    walk(config, "")
    if plan is not None:
        out["plan"] = plan
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class TrackerSet:
    """The run's trackers, started together on the first record (rank 0 only; nothing is created before).

    `log` sends finite scalars to every tracker under ``split/name`` at a step; `tensorboard` is the
    SummaryWriter (images) when TensorBoard is on; `finish` closes them all."""

    def __init__(
        self,
        run_dir: str | Path,
        names: Sequence[str],
        *,
        project: str = "attnxfer",
        hparams: Mapping[str, Any] | None = None,
    ):
        check_trackers(names)
        self.run_dir = Path(run_dir)
        self.names = list(dict.fromkeys(names))
        self.project = project
        self.hparams = dict(hparams or {})
        self.purge_step: int | None = None
        self._trackers: dict[str, Any] | None = None

    @property
    def started(self) -> bool:
        return self._trackers is not None

    def start(self) -> None:
        if self._trackers is not None:
            return
        path = self.run_dir / TRACKERS_JSON
        previous = _read_json(path)
        self._trackers = {}
        records = dict(previous)
        for name in self.names:
            kind = TRACKERS[name]
            ctx = TrackerContext(
                self.run_dir, self.run_dir.name, self.project, previous.get(name, {}), self.purge_step
            )
            tracker = kind.build(ctx)
            getattr(tracker, "start", lambda: None)()  # accelerate < 1.5 starts trackers in __init__
            if kind.takes_hparams and self.hparams:
                self._store_hparams(name, tracker)
            self._trackers[name] = tracker
            records[name] = kind.resume_record(tracker)
        if records != previous:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)

    def _store_hparams(self, name: str, tracker) -> None:
        values = self.hparams
        if name == "mlflow":  # MLflow params are write-once: a resumed run adds only the keys it lacks
            import mlflow

            have = mlflow.get_run(tracker.active_run.info.run_id).data.params
            values = {k: v for k, v in values.items() if k not in have}
        if values:
            tracker.store_init_configuration(values)

    @property
    def tensorboard(self):
        t = (self._trackers or {}).get("tensorboard")
        return None if t is None else t.writer

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        self.start()
        values = {f"{split}/{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if not values:
            return
        for tracker in self._trackers.values():
            tracker.log(values, step=int(step))

    def finish(self) -> None:
        for tracker in (self._trackers or {}).values():
            tracker.finish()
        self._trackers = None
