"""``attnxfer eval``: score a run's newest checkpoint, or a model that is no run, with Wilson intervals for its
top-1 and k-NN top-1."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...run_layout import RUN_CONFIG
from ...speak import say
from .base import add_config_args, load, register_command


@register_command(
    "eval",
    help="evaluate a run's newest checkpoint, or a timm or Hub model, on a validation set",
    description="Score the run's newest checkpoint (or checkpoint.resume=PATH): attnxfer eval RUN_DIR "
    "[key=value ...], or -c RUN_DIR/config.yaml; a conversion's folder scores its final student (stage 2). Writes "
    "nothing into the run but its eval-<step>.json (a conversion's in RUN_DIR/stage2); a run without a checkpoint "
    "is refused. A model that is "
    "no run (a timm name, hf-hub:ORG/NAME, local-dir:PATH, a weights file, an exported model's folder, a "
    "converted student's too): attnxfer "
    "eval SPEC data.dataset=... data.root=...: its top-1 where its head has the data's classes and k-NN top-1, "
    "as timm's validate.py; nothing is written.",
    arguments=add_config_args,
)
def run(args) -> int:
    spec = _model_spec(args)
    if spec is not None:
        return _score_model(args, spec)
    first = Path(args.overrides[0]).expanduser() if args.config is None and args.overrides else None
    if first is not None and "=" not in args.overrides[0] and "/" in str(first) and not first.exists():
        from ...config import ConfigError, resolve_recipe
        from ...errors import MissingPathError
        from ...run_layout import missing_path

        try:
            resolve_recipe(args.overrides[0])  # a recipe's name (demo/copy): loading says to give it as -c
        except ConfigError:
            raise MissingPathError(
                f"run folder {missing_path(first)}: give a run's folder, or a model (SPEC)"
            ) from None
    if first is not None:  # a folder, or an override (a study's student's folder is named like one: lr=1e-3)
        _read_as_a_run(args, first)
    cfg = load(args)
    from ...apps.run.evaluation import evaluate_run
    from ...apps.run.pretrain import MODE, build_pretrain_engine
    from ...checkpoints.run_dir import RunDir
    from ...config import ConfigError, config_changes, load_config
    from ...config.keys import reads_section, section_command
    from ...errors import InputError
    from ...run_layout import CHECKPOINTS_SUBDIR, SEARCH_CANDIDATES, STAGE_DIRS
    from ...sources.load_errors import run_folder_hint
    from ...transfer.modes import MODES
    from ..value_checks import check_values

    given = config_changes(load_config(args.config, checked=False), cfg)  # the keys given beside -c
    run_dir = RunDir(cfg.run_dir)
    if (run_dir.path / SEARCH_CANDIDATES).is_file():  # formulas, no student: said as a teacher spec hears it
        raise InputError(f"{run_folder_hint(run_dir.path)}; eval scores a run's student")
    final = run_dir.final_student()  # a study's folder is refused, naming its students' runs
    if final is not run_dir:  # a conversion: its final student, as export and inspect read the folder
        run_dir = final
        say(f"{cfg.run_dir} is a conversion; evaluating its final student, {run_dir.path}")
        # the user's keys, but not the folder they named (``run_dir=CONVERSION``): its stage 2 is scored
        cfg = check_values(load_config(run_dir.config_file, [*args.overrides, f"run_dir={run_dir.path}"]))
    # a folder that is no run says what it is: checkpoints, runs, an export, a conversion's stage 1
    unscored = run_dir.path.name in STAGE_DIRS or not (run_dir.path / CHECKPOINTS_SUBDIR).is_dir()
    if run_dir.path.is_dir() and not run_dir.is_run() and unscored:
        run_dir.record()
    mode = run_dir.record().get("mode") if run_dir.is_run() else None
    # a key of a section its run's command does not read would be dropped without a word (train refuses
    # them too); mae.* sets the model and masking a pretrain run's val loss is scored with (a folder that
    # is no run is refused below, for what it is)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    reads = "pretrain" if mode == MODE else None
    unread = [k for k in given if not reads_section(fields[k.split(".")[0]], reads)]
    if unread and run_dir.is_run():
        sections = sorted({k.split(".")[0] for k in unread})
        who = ", ".join(
            f"only `attnxfer {owner}`{' (and eval of its runs)' * (s == 'mae')} reads {s}.*"
            if (owner := section_command(fields[s]))
            else f"`attnxfer {reads}` reads no {s}.*"
            for s in sections
        )
        them = "it" if len(unread) == 1 else "them"
        raise ConfigError(
            f"{', '.join(unread)}: eval of {run_dir.path} does not read {them}: it scores the checkpoint as its "
            f"run trained it, and {who}; remove {them}"
        )
    if mode == MODE:  # MAE pre-training: its own val loss
        result = evaluate_run(
            cfg,
            build=lambda c, point: build_pretrain_engine(c, scoring=True, found=point),
            command="pretrain",
        )
    elif mode is not None and mode not in MODES:  # scored as a transfer, its checkpoint would be misread
        raise InputError(
            f"{run_dir.record_file} names the objective {mode!r}, which eval has no scorer for: it scores runs "
            f"of train, convert and pretrain (a new objective's scorer goes beside MAE's in {__name__})"
        )
    else:
        result = evaluate_run(cfg)
    _say_scores(result.metrics)
    say(f"step {result.step} ({result.checkpoint}) -> {result.path}")
    return 0


def _read_as_a_run(args, first: Path) -> None:
    """`attnxfer eval FOLDER` where FOLDER is a run's (the run scored, whatever run_dir its config.yaml names: a
    copy of another run's), its checkpoints/ (the newest), or one of its checkpoints (that one, as
    checkpoint.resume=PATH): ``-c RUN/config.yaml`` with ``run_dir=RUN``; a run that lost its config.yaml is told
    where its checkpoints recorded it (the loader's answer for a missing config.yaml of a run)."""
    from ...errors import InputError
    from ...run_layout import CHECKPOINTS_SUBDIR, RUN_DIR_MARKERS, STUDY_RECORD, no_run_folder

    run, resume = first, []
    if first.parent.name == CHECKPOINTS_SUBDIR and first.name.startswith("step-"):
        run, resume = first.parent.parent, [f"checkpoint.resume={first}"]
    elif first.name == CHECKPOINTS_SUBDIR:
        run = first.parent
    if not any((run / marker).exists() for marker in RUN_DIR_MARKERS) and not (run / RUN_CONFIG).is_file():
        if run.is_dir():  # a folder attnxfer did not write (an export's is a model, read before this)
            raise InputError(
                f"{no_run_folder(run)}; eval scores a run's folder, one of its checkpoints, or a model (an "
                "export's folder, a weights file, a timm name)"
            )
        return  # an override, or a path that is not there: answered where the word is read
    # a study's folder has no config of its own: refused naming its students' runs, as export refuses it
    if (run / STUDY_RECORD).is_file():
        from ...checkpoints.run_dir import RunDir

        RunDir(run).final_student()
    if run != first:
        say(f"attnxfer eval: {first} is {'a checkpoint' if resume else 'the checkpoints'} of the run {run}")
    args.config, args.overrides = str(run / RUN_CONFIG), [*resume, *args.overrides[1:], f"run_dir={run}"]


def _say_scores(m: dict[str, float]) -> None:
    """Each score, then each top-1 with its 95 % Wilson interval (and the k-NN share's bootstrap one)."""
    from ...apps.run.uncertainty import correct_count, format_top1

    for k, v in m.items():  # counts and k as the whole numbers they are
        say(f"{k}: {v:.0f}" if k.endswith(("_count", "_k")) else f"{k}: {v:.4f}")
    knn = f", k={m.get('knn_k', 0):.0f}, T={m.get('knn_temperature', 0):g}"
    for who in ("val", "ema_val", "knn_teacher", "knn"):  # knn: k-NN top-1 of the embeddings
        count, rule = ("knn", knn) if who.startswith("knn") else (who, "")
        top1, n = m.get(f"{who}_top1"), int(m.get(f"{count}_count", 0))
        if top1 is not None and n:
            interval = format_top1(correct_count(top1, n), n)
            say(f"{who}_top1 (%) [95% Wilson interval, {n} images{rule}]: {interval}")
    if "knn_share" in m:
        low, high = m["knn_share_low"], m["knn_share_high"]
        say(
            f"knn_share (student / teacher) [95% paired bootstrap]: {m['knn_share']:.4f} [{low:.4f}, {high:.4f}]"
        )


#: what scoring a model that is no run reads: the model, the data, what to score, where it runs
_READ_FOR_A_MODEL = ("teacher", "data", "eval", "device", "precision", "deterministic", "seed", "dist")


def _model_spec(args) -> str | None:
    """The first argument where it names a model that is no run (timm's validate.py): a timm name,
    ``hf-hub:``/``local-dir:``, a weights file, an exported model's folder; None for a run's folder (or
    a path that is not there, which the config's loading words)."""
    if args.config is not None or not args.overrides or "=" in args.overrides[0]:
        return None  # an override, or -c's config: a run's (and no torch imported for a refusal)
    first = args.overrides[0]
    path = Path(first).expanduser()
    if path.is_dir():  # an export: timm's (or transformers') config.json, and no run's config.yaml
        exported = (path / "config.json").is_file() and not (path / RUN_CONFIG).is_file()
        return f"local-dir:{first}" if exported else None  # any other folder: loading says what it is
    # a web address is a spec too: its reader answers with its hf-hub: spec
    if first.startswith(("hf-hub:", "local-dir:", "https://", "http://")):
        return first
    from ...sources.resolve import WEIGHT_SUFFIXES

    if first.endswith(WEIGHT_SUFFIXES):  # there or not: the spec's reader says which
        return first
    # a YAML or another file: -c's hint; a path that is not there: a run's folder misspelt; a bare word: a timm
    # name, spelt right or not (its reader names the nearest)
    return None if path.is_file() or "/" in first else first


def _score_model(args, spec: str) -> int:
    """`attnxfer eval SPEC [key=value ...]`: the model's top-1 and k-NN top-1 on data's val split, said."""
    from ...apps.run.evaluation import evaluate_model
    from ...config import ConfigError, config_changes, load_config
    from ...errors import InputError
    from ...sources.resolve import parse_teacher_spec

    given = [o.split("=", 1)[0] for o in args.overrides[1:]]
    if "teacher.spec" in given:  # it would replace the model named first, which the scores are said of
        raise ConfigError(f"{spec} is the model eval scores: drop teacher.spec")
    try:
        parse_teacher_spec(spec)
    except InputError as e:
        raise InputError(f"{args.overrides[0]} is no run's folder, and as a model: {e}") from None
    args.overrides = [f"teacher.spec={spec}", *args.overrides[1:]]
    cfg = load(args)
    unread = [
        k
        for k in config_changes(load_config(None, checked=False), cfg)
        if not k.startswith(_READ_FOR_A_MODEL) or k in ("teacher.dtype", "teacher.compile")
    ]
    if unread:
        them = "it" if len(unread) == 1 else "them"
        raise ConfigError(
            f"{', '.join(unread)}: eval of a model reads only teacher.spec, arch, revision and cache_dir, data.*, "
            f"eval.* and where it runs (device, precision, deterministic, seed, dist.*); remove {them}"
        )
    _say_scores(evaluate_model(cfg))
    say(f"{spec}: scored on data.dataset={cfg.data.dataset}'s val split")
    return 0
