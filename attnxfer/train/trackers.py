"""Experiment trackers beside ``metrics.jsonl`` (TensorBoard, W&B, MLflow: `TRACKERS`), through accelerate's
tracker classes, on rank 0 only. A resumed run continues the same tracker run (the ids in
``RUN_DIR/trackers.json``). Compute nodes rarely reach the internet, so how each logs is decided once, before
any work (`prepare_trackers`): W&B without a key or a server logs offline; MLflow without
``MLFLOW_TRACKING_URI`` logs into ``RUN_DIR/mlruns`` (what ``mlflow-skinny`` opens); a tracking server that
does not answer stops the run with one line naming it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoints.atomic_io import atomic_write_text
from ..checkpoints.run_lock import refuse_file_in_the_way, refuse_unwritable
from ..errors import InputError, PathExistsError
from ..run_layout import STAGE_DIRS, TENSORBOARD_DIR
from ..speak import say, warn

#: the tracker run ids of a run directory, read back on resume
TRACKERS_JSON = "trackers.json"
#: seconds a tracker's server gets to answer before the run is refused (or W&B goes offline)
SERVER_TIMEOUT_S = 5.0


class TrackerMissingError(InputError):
    """A tracker named in ``log.trackers`` whose package is not installed."""


class TrackerUnavailableError(InputError):
    """A tracker named in ``log.trackers`` that cannot log from this machine; the message names what to change."""


@dataclass(frozen=True)
class TrackerSetup:
    """How one tracker logs for one run: options its builder and scope take (W&B's ``mode``, MLflow's
    ``tracking_uri``) and the line that says so at start-up (or None)."""

    options: Mapping[str, Any] = field(default_factory=dict)
    notice: str | None = None


@dataclass(frozen=True)
class TrackerContext:
    """What a tracker is built from; ``previous``: what an earlier start of the run recorded (or empty)."""

    run_dir: Path  # its name is the tracker run's
    project: str
    previous: Mapping[str, Any]
    purge_step: int | None
    options: Mapping[str, Any] = field(default_factory=dict)  # the run's `TrackerSetup.options`


@dataclass(frozen=True)
class TrackerKind:
    """One tracker: its config word, the module it needs (and the pip extra that brings it), how to build
    an accelerate tracker, what to record to resume it, and whether it takes hyper-parameters.
    ``prepare(run_dir)`` decides, before any work, how it logs from this machine (or refuses);
    ``scope(options)`` is what the process needs set while it runs (MLflow's tracking URI)."""

    name: str
    module: str
    extra: str | None
    build: Callable[[TrackerContext], Any]
    resume_record: Callable[[Any], dict[str, Any]]
    takes_hparams: bool = True
    #: it logs into a named project (``log.project``, which must not be empty)
    in_project: bool = True
    prepare: Callable[[Path], TrackerSetup] = lambda run_dir: TrackerSetup()
    scope: Callable[[Mapping[str, Any]], AbstractContextManager] = lambda options: contextlib.nullcontext()
    #: the tracker's name for a `tracker_tag` (MLflow's cannot have one name under another)
    key: Callable[[str], str] = lambda tag: tag


def run_name(run_dir: Path) -> str:
    """The tracker run's name: the run directory's, with its conversion's for a stage (``demo_hedgehog/stage2``,
    not every conversion's ``stage2``)."""
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name in STAGE_DIRS else run_dir.name


def _tensorboard(ctx: TrackerContext):
    from accelerate.tracking import TensorBoardTracker

    # RUN_DIR/tb, as before; purge_step drops the events of steps a resumed run trains again
    return TensorBoardTracker(TENSORBOARD_DIR, ctx.run_dir, purge_step=ctx.purge_step)


def _tensorboard_prepare(run_dir: Path) -> TrackerSetup:
    """Refuse, before any work, a ``RUN_DIR/tb`` that cannot become a writable folder: its writer would stop
    the run with a traceback at the first record, after the first steps."""
    tb = run_dir / TENSORBOARD_DIR
    try:
        refuse_file_in_the_way(tb, "run_dir", f"tensorboard's folder {tb}")
        refuse_unwritable(tb, "run_dir", f"tensorboard's folder {tb}")
    except PathExistsError as e:
        raise TrackerUnavailableError(f"{e} (or remove tensorboard from log.trackers)") from None
    return TrackerSetup()


def server_problem(url: str, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    """Why no server answers at ``url`` within ``timeout`` seconds, or None when one answers with any HTTP
    status (401 and 404 are answers). Proxies come from the environment, as the trackers' clients take them."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host  # credentials in the URI are the client's business
    if parts.port is not None:
        netloc += f":{parts.port}"
    try:
        with urllib.request.urlopen(parts._replace(netloc=netloc).geturl(), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):  # it answered; its certificate is the client's business
            return None
        return str(e.reason)
    except (OSError, ValueError) as e:  # a timeout while reading, a malformed URI
        return str(e) or type(e).__name__


def _wandb_prepare(run_dir: Path) -> TrackerSetup:
    """Offline (said in one line) without a W&B API key or W&B's server in reach; a refusal when
    ``WANDB_MODE=online`` asks for the server regardless."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        return TrackerSetup()
    try:
        settings = wandb.setup().settings
    except Exception as e:  # a WANDB_* value wandb cannot read
        raise TrackerUnavailableError(f"wandb cannot start: {str(e).splitlines()[0]}") from None
    # an API key on this machine (WANDB_API_KEY, `wandb login`'s netrc, its settings), without asking for one
    try:
        has_key = bool(wandb.login(verify=False, prompt=False))
    except TypeError:  # a wandb whose login() cannot be told not to prompt: its own key lookup
        has_key = bool(getattr(getattr(wandb, "api", None), "api_key", None))
    if has_key:
        problem = server_problem(settings.base_url)
        if problem is None:
            return TrackerSetup()
        why = f"{settings.base_url} does not answer within {SERVER_TIMEOUT_S:g} s ({problem})"
        refusal = f"W&B's server {why};"
    else:
        why = "no API key on this machine (no WANDB_API_KEY, no `wandb login`)"
        refusal = "this machine has no W&B API key: run `wandb login` (or set WANDB_API_KEY), or"
    if mode == "online":
        raise TrackerUnavailableError(
            f"log.trackers includes wandb with WANDB_MODE=online, but {refusal} unset WANDB_MODE to log "
            "offline under RUN_DIR/wandb and `wandb sync` it later"
        )
    wandb_dir = run_dir / "wandb"
    return TrackerSetup(
        {"mode": "offline"},
        f"wandb: {why}: logging offline to {wandb_dir}; upload it later with `wandb sync "
        f"{wandb_dir}/offline-run-*` (WANDB_MODE=offline skips this check)",
    )


def _wandb(ctx: TrackerContext):
    from accelerate.tracking import WandBTracker

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandBTracker(
        ctx.project,
        dir=str(ctx.run_dir),
        id=ctx.previous.get("id"),
        resume="allow",
        name=run_name(ctx.run_dir),
        **ctx.options,
    )


#: MLflow URI schemes of database stores (SQLAlchemy, which the full ``mlflow`` package brings)
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _check_mlflow_store(uri: str) -> None:
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0].lower()
    where = f"MLFLOW_TRACKING_URI={uri}"
    if scheme in ("http", "https"):
        problem = server_problem(uri.rstrip("/") + "/health")
        if problem is not None:
            raise TrackerUnavailableError(
                f"log.trackers includes mlflow, but the tracking server {where} does not answer within "
                f"{SERVER_TIMEOUT_S:g} s ({problem}): start it or point MLFLOW_TRACKING_URI at one that "
                "answers, or unset MLFLOW_TRACKING_URI to log into RUN_DIR/mlruns"
            )
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter too)
        import mlflow.environment_variables as env

        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes")
        # MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set; MLflow 2 has no such guard
        if not allowed and hasattr(env, "MLFLOW_ALLOW_FILE_STORE"):
            raise TrackerUnavailableError(
                f"log.trackers includes mlflow, and {where} is a file store, which MLflow 3 opens only with "
                "MLFLOW_ALLOW_FILE_STORE=true: export that too (or unset MLFLOW_TRACKING_URI to log into "
                "RUN_DIR/mlruns)"
            )
    elif scheme in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise TrackerUnavailableError(
            f"log.trackers includes mlflow, and {where} is a database store, which needs the full MLflow "
            "package (pip install mlflow; attnxfer[mlflow] brings mlflow-skinny only), or unset "
            "MLFLOW_TRACKING_URI to log into RUN_DIR/mlruns"
        )


def _mlflow_prepare(run_dir: Path) -> TrackerSetup:
    """The user's store (``MLFLOW_TRACKING_URI``), checked; without one, the run's own ``RUN_DIR/mlruns``."""
    import mlflow

    if mlflow.tracking.is_tracking_uri_set():
        _check_mlflow_store(mlflow.get_tracking_uri())
        return TrackerSetup()
    store = (run_dir / "mlruns").absolute()
    return TrackerSetup(
        {"tracking_uri": store.as_uri()},
        f"mlflow: no MLFLOW_TRACKING_URI: logging into this run's own store {store} (see it with "
        f"`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store.as_uri()}`)",
    )


@contextlib.contextmanager
def _mlflow_scope(options: Mapping[str, Any]) -> Iterator[None]:
    """The run's own store as MLflow's process-wide tracking URI while the run logs, with the file-store
    permission it needs; both undone after."""
    uri = options.get("tracking_uri")
    if uri is None:
        yield
        return
    import mlflow

    allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if allowed is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = allowed


def _mlflow(ctx: TrackerContext):
    import mlflow
    from accelerate.tracking import MLflowTracker

    # the store `prepare` chose (the user's MLFLOW_TRACKING_URI, or RUN_DIR/mlruns); a recorded run is
    # continued only in the store it was created in
    same_store = ctx.previous.get("tracking_uri") == mlflow.get_tracking_uri()
    run_id = ctx.previous.get("run_id") if same_store else None
    return MLflowTracker(experiment_name=ctx.project, run_id=run_id, run_name=run_name(ctx.run_dir))


def _mlflow_key(tag: str) -> str:
    """``split/name`` with the name's own ``/`` as ``_`` (``train/attn_ce_0`` for ``attn_ce/0``): MLflow's file
    store keeps a metric as a file at its name's path, so ``train/feat_cos`` beside ``train/feat_cos/prefix``
    cannot be written."""
    split, _, name = tag.partition("/")
    return f"{split}/{name.replace('/', '_')}" if name else tag


def _mlflow_record(tracker) -> dict[str, Any]:
    import mlflow

    return {"run_id": tracker.active_run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}


#: every tracker ``log.trackers`` may name, by its name
TRACKERS: dict[str, TrackerKind] = {
    kind.name: kind
    for kind in (
        TrackerKind(
            "tensorboard",
            "tensorboard",
            None,
            _tensorboard,
            lambda t: {},
            takes_hparams=False,
            in_project=False,
            prepare=_tensorboard_prepare,
        ),
        TrackerKind("wandb", "wandb", "wandb", _wandb, lambda t: {"id": t.run.id}, prepare=_wandb_prepare),
        TrackerKind(
            "mlflow",
            "mlflow",
            "mlflow",
            _mlflow,
            _mlflow_record,
            prepare=_mlflow_prepare,
            scope=_mlflow_scope,
            key=_mlflow_key,
        ),
    )
}


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


#: (tracker, run dir) -> the setup `prepare_trackers` decided for it, which `TrackerSet` then builds with
_SETUPS: dict[tuple[str, str], TrackerSetup] = {}


def _setup_key(name: str, run_dir: str | Path) -> tuple[str, str]:
    return name, str(Path(run_dir).absolute())


def prepare_trackers(names: Sequence[str], run_dir: str | Path) -> dict[str, TrackerSetup]:
    """Before any work: stop if a named tracker is missing or cannot log from this machine, and decide how each
    logs for ``run_dir``, saying so in one line each. `TrackerSet` builds them as decided; a decision holds
    until they finish."""
    check_trackers(names)
    setups = {}
    for name in dict.fromkeys(names):
        key = _setup_key(name, run_dir)
        if key not in _SETUPS:  # not decided yet for this run
            _SETUPS[key] = TRACKERS[name].prepare(Path(run_dir))
            if _SETUPS[key].notice:
                say(_SETUPS[key].notice)
        setups[name] = _SETUPS[key]
    return setups


def tracker_tag(split: str, name: str) -> str:
    """A metric's tracker tag: ``split/name``, the split said once (``val_top1`` is ``val/top1``,
    ``ema_val_top1`` ``val/ema_top1``; ``metrics.jsonl`` keeps the name as it is)."""
    for head in ("", "ema_"):  # the evaluation's names: val_*, and the EMA's ema_val_*
        if name.startswith(f"{head}{split}_"):
            return f"{split}/{head}{name[len(head) + len(split) + 1 :]}"
    return f"{split}/{name}"


def flat_hparams(config: Mapping[str, Any], plan: str | None = None) -> dict[str, Any]:
    """The run's config as dotted keys with scalar values (lists and dicts as JSON), plus the plan's text."""
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


class TrackerSet:
    """The run's trackers, started together on the first record (rank 0 only; nothing is created before)."""

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
        self._scopes = contextlib.ExitStack()

    def start(self) -> None:
        if self._trackers is not None:
            return
        path = self.run_dir / TRACKERS_JSON
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            previous = {}
        previous = previous if isinstance(previous, dict) else {}
        self._trackers = {}
        records = dict(previous)
        for name in self.names:
            kind = TRACKERS[name]
            # as decided before (or now: an engine by hand)
            setup = prepare_trackers([name], self.run_dir)[name]
            was = previous.get(name, {}).get("project")
            if was not in (None, self.project):  # a tracker run cannot move: it goes on where it began
                warn(
                    f"warning: log.project={self.project} is not where this run's {name} run logs: it began in "
                    f"{was} and goes on there (a new run_dir starts a {name} run in {self.project})"
                )
            self._scopes.enter_context(kind.scope(setup.options))
            ctx = TrackerContext(
                self.run_dir, self.project, previous.get(name, {}), self.purge_step, setup.options
            )
            tracker = kind.build(ctx)
            getattr(tracker, "start", lambda: None)()  # accelerate < 1.5 starts trackers in __init__
            if kind.takes_hparams and self.hparams:
                self._store_hparams(name, tracker)
            self._trackers[name] = tracker
            records[name] = {**kind.resume_record(tracker), "project": was or self.project}
        if records != previous:
            atomic_write_text(path, json.dumps(records, indent=1) + "\n")

    def _store_hparams(self, name: str, tracker) -> None:
        values = self.hparams
        if name == "mlflow":  # MLflow params are write-once: a resumed run adds only the keys it lacks
            import mlflow

            have = mlflow.get_run(tracker.active_run.info.run_id).data.params
            values = {k: v for k, v in values.items() if k not in have}
        if values:
            tracker.store_init_configuration(values)

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        self.start()
        values = {tracker_tag(split, k): float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if not values:
            return
        for name, tracker in self._trackers.items():
            key = TRACKERS[name].key
            tracker.log({key(tag): v for tag, v in values.items()}, step=int(step))

    def log_image(self, tag: str, step: int, image: Any) -> None:
        """A picture, (H, W, 3) uint8, to each tracker under its name for ``tag``: an image at ``step`` in
        TensorBoard and W&B, the artifact ``<tag>-step<N>.png`` in MLflow's run (accelerate's has no images)."""
        self.start()
        for name, tracker in self._trackers.items():
            key = TRACKERS[name].key(tag)
            if name == "mlflow":
                import mlflow

                run_id = tracker.active_run.info.run_id
                mlflow.MlflowClient().log_image(run_id, image, f"{key}-step{int(step):08d}.png")
            else:
                formats = {"dataformats": "NHWC"} if name == "tensorboard" else {}
                tracker.log_images({key: image[None]}, step=int(step), **formats)

    def finish(self) -> None:
        try:
            for tracker in (self._trackers or {}).values():
                tracker.finish()
        finally:
            self._trackers = None
            self._scopes.close()
            for name in self.names:  # the next run of this run dir (in a notebook) decides afresh
                _SETUPS.pop(_setup_key(name, self.run_dir), None)
