"""``attnxfer eval``: score a run's newest checkpoint, with Wilson intervals for its top-1 and k-NN top-1."""

from __future__ import annotations

import dataclasses

from ...speak import say
from .base import add_config_args, load, register_command


@register_command(
    "eval",
    help="evaluate a run's newest checkpoint on its validation set",
    description="Score the run's newest checkpoint (or checkpoint.resume=PATH): attnxfer eval RUN_DIR "
    "[key=value ...], or -c RUN_DIR/config.yaml; a conversion's folder scores its final student (stage 2). Writes "
    "nothing into the run but RUN_DIR/eval-<step>.json; a run without a checkpoint is refused.",
    arguments=add_config_args,
)
def run(args) -> int:
    cfg = load(args)
    from ...apps.run.evaluation import evaluate_run
    from ...apps.run.pretrain import MODE, build_pretrain_engine
    from ...apps.run.uncertainty import correct_count, format_top1
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
    for k, v in result.metrics.items():  # counts and k as the whole numbers they are
        say(f"{k}: {v:.0f}" if k.endswith(("_count", "_k")) else f"{k}: {v:.4f}")
    m = result.metrics
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
    say(f"step {result.step} ({result.checkpoint}) -> {result.path}")
    return 0
