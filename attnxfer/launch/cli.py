"""The ``attnxfer`` command: thin subcommands over library functions.

Every subcommand takes ``-c CONFIG.yaml`` plus dotted ``key=value`` overrides and
prints the resolved plan before it starts work. User errors (bad keys, missing
files, incompatible models) print one clear message and exit non-zero; set
``ATTNXFER_DEBUG=1`` for the full traceback.

Each command imports its app inside its handler: `attnxfer --help` and argument errors answer without
loading torch. This is the only place in the package that imports attnxfer code lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import InputError, UserError
from .arguments import add_array_arguments, add_slurm_arguments
from .process_exit import end_program
from .rope_help import ROPE_EPILOG, RopeHelpFormatter

__all__ = ["build_parser", "main", "register_command", "run"]

EXAMPLES = """\
examples:
  attnxfer demo                                   # the animal-mnist demo (MAE teacher, 3 students)
  attnxfer train -c cfgs/demo/copy.yaml schedule.epochs=5
  attnxfer train -c cfgs/paper/vit_large_copy.yaml data.root=/data/imagenet
  attnxfer eval  -c runs/my-run/config.yaml
  attnxfer pretrain -c demo/mae_pretrain                  # MAE pre-training, no labels -> RUN_DIR/export
  attnxfer convert -c convert/demo_hedgehog                # softmax teacher -> Hedgehog student + report
  attnxfer search -c search/demo                          # discover a formula attention for the teacher
  attnxfer inspect local-dir:runs/demo/teacher/export runs/demo/distill --data animal_mnist
  attnxfer submit -c paper/vit_large_distill data.root=/data/imagenet --nodes 8 --gpus-per-node 8
  attnxfer submit --command convert -c convert/vit_base_mae_performer data.root=/data/imagenet --gpus-per-node 8
"""

_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def register_command(name: str):
    """Subcommands register a function that adds their parser (registry, not an if-chain)."""

    def deco(fn):
        _COMMANDS[name] = fn
        return fn

    return deco


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "-c", "--config", required=required, help="YAML config (see cfgs/); defaults apply otherwise"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. transfer.mode=copy optim.lr=1e-3 transfer.layers=[0,1]",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and every value that differs from the recipe, then exit",
    )


def _changes(args, cfg) -> str:
    from ..config import describe_changes, load_config

    return describe_changes(load_config(args.config), cfg, args.config)


def _load(args):
    """The config, and (on the main process) what it changes from its recipe, printed at start-up."""
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    if os.environ.get("RANK", "0") == "0" and not getattr(args, "print_config", False):
        print(_changes(args, cfg), flush=True)
    return cfg


def _print_config(args) -> int:
    from ..config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg).rstrip())
    print("# " + _changes(args, cfg).replace("\n", "\n# "))
    return 0


@register_command("train")
def _train_parser(sub):
    p = sub.add_parser(
        "train",
        help="train a student by attention copy/distillation (or from scratch)",
        description="Train (or resume: checkpoint.resume=auto) the run described by the config.",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    cfg = _load(args)  # before the app's import (torch): a config error answers at once
    from ..apps.training import train

    print(_done_line(train(cfg)))
    return 0


def _done_line(result) -> str:
    """How a training command ends: its steps and best score, or why it had nothing to do."""
    if result.nothing_to_do:
        return result.nothing_to_do
    if result.best is None:
        best = "no evaluation recorded"
    elif result.best_top1 is not None:
        best = f"best val top1 {result.best_top1:.2f}"
    elif result.metric == "val_loss":  # MAE pre-training
        best = f"best val loss {result.best:.4f}"
    else:  # a run without a task loss: its final-feature cosine with the teacher
        best = f"best {result.metric.removeprefix('val_')} {result.best:.4g}"
    return f"done: {result.steps} steps, {best} -> {result.run_dir}"


@register_command("pretrain")
def _pretrain_parser(sub):
    p = sub.add_parser(
        "pretrain",
        help="MAE pre-training of a ViT encoder on a dataset, without labels (a teacher for train/demo)",
        description="Masked-autoencoder pre-training of the model section's ViT (the mae section: mask ratio, "
        "decoder, normalised pixel loss). Checkpoints and resume as `train`; reconstructions of validation "
        "images in RUN_DIR/pictures and TensorBoard at each evaluation; the encoder is exported in timm's "
        "layout to RUN_DIR/export (use it as teacher.spec=local-dir:RUN_DIR/export).",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    cfg = _load(args)
    from ..apps.pretrain import pretrain

    print(_done_line(pretrain(cfg)))
    return 0


@register_command("eval")
def _eval_parser(sub):
    p = sub.add_parser(
        "eval",
        help="evaluate a run's newest checkpoint on its validation set",
        description="Score the run's newest checkpoint (or checkpoint.resume=PATH). Writes nothing into the "
        "run but RUN_DIR/eval-<step>.json; a run without a checkpoint is refused.",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    cfg = _load(args)
    from ..apps.training import evaluate_run
    from ..apps.uncertainty import correct_count, format_top1

    result = evaluate_run(cfg)
    for k, v in result.metrics.items():
        print(f"{k}: {v:.4f}")
    for prefix in ("val", "ema_val"):
        top1, n = result.metrics.get(f"{prefix}_top1"), int(result.metrics.get(f"{prefix}_count", 0))
        if top1 is not None and n:
            interval = format_top1(correct_count(top1, n), n)
            print(f"{prefix}_top1 (%) [95% Wilson interval, {n} images]: {interval}")
    m, n = result.metrics, int(result.metrics.get("knn_count", 0))
    for who in ("knn_teacher", "knn"):  # k-NN top-1 of the embeddings (teacher's, then student's)
        if f"{who}_top1" in m:
            interval = format_top1(correct_count(m[f"{who}_top1"], n), n)
            rule = f"k={m['knn_k']:.0f}, T={m['knn_temperature']:g}"
            print(f"{who}_top1 (%) [95% Wilson interval, {n} images, {rule}]: {interval}")
    if "knn_share" in m:
        low, high = m["knn_share_low"], m["knn_share_high"]
        print(
            f"knn_share (student / teacher) [95% paired bootstrap]: {m['knn_share']:.4f} [{low:.4f}, {high:.4f}]"
        )
    print(f"step {result.step} ({result.checkpoint}) -> {result.path}")
    return 0


def _positive_int(text: str) -> int:
    """argparse type for step counts: 0 or less would silently mean 'the default'."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@register_command("demo")
def _demo_parser(sub):
    p = sub.add_parser(
        "demo",
        help="MAE teacher (no labels), then scratch, fine-tuned MAE, copy and distill on animal-mnist (CPU)",
    )
    p.add_argument("--out", default="runs/demo", help="where runs, table and plot go (default runs/demo)")
    p.add_argument(
        "--budget-steps", type=_positive_int, default=None, help="optimiser steps per student (equal budget)"
    )
    p.add_argument(
        "--teacher-steps", type=_positive_int, default=None, help="optimiser steps for the teacher"
    )
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke version (tiny budgets)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="students per run kind, one per seed (teacher once): mean ± std and paired McNemar tests",
    )
    p.add_argument(
        "--supervised",
        action="store_true",
        help="add a second table: copy/distillation from a teacher trained with labels (about +6 min)",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ..apps.demo import run_demo

    run_demo(
        args.out,
        budget_steps=args.budget_steps,
        teacher_steps=args.teacher_steps,
        quick=args.quick,
        seeds=args.seeds,
        supervised=args.supervised,
    )
    return 0


@register_command("convert")
def _convert_parser(sub):
    p = sub.add_parser(
        "convert",
        help="turn a softmax teacher into an efficient-attention student (stage 1 + stage 2 + report)",
        description="Copy the teacher into a student with efficient attention (convert.attention), fit each "
        "attention layer to the teacher's on the teacher's hidden inputs (stage 1), fine-tune end to end "
        "with logit distillation (stage 2: the schedule/optim/transfer sections), and write "
        "RUN_DIR/report.json and report.md.",
        epilog=ROPE_EPILOG,
        formatter_class=RopeHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--skip-stage1",
        action="store_true",
        help="no layer-parallel transfer (the ablation); same as convert.stage1_steps=0",
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    cfg = _load(args)
    from ..apps.convert import convert
    from ..train.distributed import DistributedInfo

    result = convert(cfg, skip_stage1=args.skip_stage1)
    if not DistributedInfo.from_environment().is_main_process:
        return 0
    from ..apps.reports import conversion_summary

    print(conversion_summary(result.report))
    return 0


@register_command("search")
def _search_parser(sub):
    p = sub.add_parser(
        "search",
        help="discover an efficient formula attention for a teacher (evolutionary, fit vs speed Pareto front)",
        description="Evolutionary search over formula attentions (the search section), seeded with the "
        "hand-designed zoo: each candidate is fitted to the teacher's maps by a short stage 1 and scored by its "
        "held-out map KL and its speed at search.target_tokens. Writes RUN_DIR/candidates.jsonl, pareto.md, "
        "pareto.png and the convert command of the winner; running the same command again continues. "
        "With --array-tasks K each generation is evaluated as a SLURM job array of K tasks.",
    )
    _add_config_args(p)
    add_array_arguments(p)
    p.set_defaults(func=_cmd_search)


def _cmd_search(args) -> int:
    cfg = _load(args)
    from ..apps.search import search

    evaluate = None
    if args.array_tasks:
        from .search_array import array_evaluator

        evaluate = array_evaluator(cfg, args)
    result = search(cfg, evaluate=evaluate)
    n = len(result.state.candidates)
    print(f"done: {n} candidates, {len(result.front)} on the Pareto front -> {result.run_dir}/pareto.md")
    return 0


@register_command("submit")
def _submit_parser(sub):
    p = sub.add_parser(
        "submit",
        help="run `train` (or `convert`, `pretrain`) as a (multi-node) SLURM job through submitit",
        description="Submit the same training as `attnxfer train` (or, with --command convert, the "
        "same conversion as `attnxfer convert`) to SLURM. The job checkpoints "
        "periodically, requeues itself on preemption/time limit and resumes.",
    )
    _add_config_args(p)
    p.add_argument(
        "--command",
        dest="job_command",  # not `command`: that names the subcommand in error messages
        choices=sorted(SUBMITTABLE),
        default="train",
        help="what the job runs (default train); convert resumes a finished stage 1 and stage 2's "
        "checkpoints after a requeue; pretrain is MAE pre-training (`attnxfer pretrain`)",
    )
    add_slurm_arguments(p)
    p.set_defaults(func=_cmd_submit)


#: what `attnxfer submit --command` can run: module-level functions of a config (submitit pickles them)
SUBMITTABLE = {
    "train": "attnxfer.apps.training:train",
    "convert": "attnxfer.apps.convert:convert_main",
    "pretrain": "attnxfer.apps.pretrain:pretrain",
}


def _cmd_submit(args) -> int:
    cfg = _load(args)
    import importlib

    from .slurm import JobFailedError, submit_from_args

    module, name = SUBMITTABLE[args.job_command].split(":")
    try:
        submit_from_args(getattr(importlib.import_module(module), name), cfg, args)
    except JobFailedError as e:  # the job's failure, in one line; the traceback is in the log it names
        print(f"attnxfer submit: error: {e.summary()}", file=sys.stderr)
        return 1
    return 0


@register_command("export")
def _export_parser(sub):
    p = sub.add_parser(
        "export",
        help="write a run's student in timm's Hub format or as ONNX, with a model card",
        description="Export RUN_DIR's student to OUT_DIR (config.json, model.safetensors, README.md). "
        "A softmax student then loads with timm.create_model('local-dir:OUT_DIR', "
        "pretrained=True) or transformers' AutoModelForImageClassification.from_pretrained(OUT_DIR); "
        "any student, efficient attention included (e.g. the stage2/ "
        "run of `attnxfer convert`), with attnxfer.load_student('local-dir:OUT_DIR'). "
        "--format onnx writes OUT_DIR/model.onnx instead (any student; opset 18, batch axis free), "
        "checked in ONNX Runtime on CPU against the PyTorch forward (needs attnxfer[onnx]).",
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to the Hub as REPO")
    p.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        choices=("timm", "onnx"),
        default=["timm"],
        metavar="FORMAT",
        help="timm (default: config.json + model.safetensors), onnx (model.onnx, checked in ONNX Runtime), "
        "or both: --format timm onnx",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from ..checkpoints.export import export_run
    from ..checkpoints.onnx_export import require_onnx
    from ..checkpoints.run_dir import RunDir

    if "onnx" in args.formats:
        require_onnx()  # a missing package stops before the run is read
    weights = args.weights
    if weights == "ema":  # a run without EMA has raw weights only: say so and use them
        info = RunDir(args.run_dir).latest()
        if info is not None and "ema" not in info.groups:
            print("attnxfer export: the run kept no EMA weights; exporting the raw weights", file=sys.stderr)
            weights = "raw"
    out = export_run(
        args.run_dir,
        args.out_dir,
        weights=weights,
        checkpoint=args.checkpoint,
        push_to_hub=args.push_to_hub,
        overwrite=args.overwrite,
        formats=args.formats,
    )
    lines = [f"exported to {out}"]
    if "timm" in args.formats:
        plain = json.loads((out / "config.json").read_text())["attnxfer"]["loads_in_plain_timm"]
        how = (
            f"timm.create_model('local-dir:{out}', pretrained=True)  (or attnxfer.load_student)"
            if plain
            else f"attnxfer.load_student('local-dir:{out}')  (efficient attention: timm alone cannot build it)"
        )
        lines.append(f"load with: {how}")
    if "onnx" in args.formats:
        onnx = json.loads((out / "export_report.json").read_text())["onnx"]
        lines.append(
            f"ONNX: {out / onnx['file']} (opset {onnx['opset']}); ONNX Runtime vs PyTorch max |diff| "
            f"{onnx['max_abs_diff']:.3g}: run with onnxruntime.InferenceSession('{out / onnx['file']}')"
        )
    print("\n".join(lines))
    return 0


@register_command("inspect")
def _inspect_parser(sub):
    p = sub.add_parser(
        "inspect",
        help="does a student attend like its teacher? per-layer/head agreement, head matching, pictures",
        description="Compare STUDENT's attention maps (one or more; softmax or efficient attention, through "
        "their implicit maps) with TEACHER's on images: KL, Jensen-Shannon, top-k overlap, rank correlation, "
        "entropy, attention distance and class-token agreement per layer and head, beside a floor (the "
        "teacher against itself on noisy inputs); the optimal teacher-student head assignment per layer; "
        "class-token maps, rollout and per-layer curves. Writes OUT/metrics.json, report.md and PNGs. "
        "Specs: timm names, hf-hub:ORG/NAME, local-dir:PATH, weight files (with --teacher-arch/--student-arch), "
        "`attnxfer export` folders and RUN_DIRs (a copy-mode run needs its own teacher as TEACHER).",
    )
    p.add_argument("teacher", metavar="TEACHER")
    p.add_argument("students", metavar="STUDENT", nargs="+")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--images", nargs="+", metavar="FILE", default=(), help="image files to inspect on")
    what.add_argument(
        "--data", metavar="DATASET", help="a registered dataset (animal_mnist, folder, synthetic)"
    )
    p.add_argument("--data-root", default=None, help="dataset root (folder datasets)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--num-images", type=int, default=64, help="images taken from --data (default 64)")
    p.add_argument("--out", default="runs/inspect", help="report folder (default runs/inspect)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="timm names with random weights (no download; smoke tests)",
    )
    p.add_argument("--teacher-arch", default=None, help="timm architecture of a TEACHER weight file")
    p.add_argument("--student-arch", default=None, help="timm architecture of STUDENT weight files")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--topk", type=int, default=5, help="k of the top-k overlap of rows (default 5)")
    p.add_argument("--noise", type=float, default=0.1, help="input noise std of the floor (normalised units)")
    p.add_argument(
        "--floor-images", type=int, default=16, help="images the floor is measured on (default 16)"
    )
    p.add_argument("--pictures", type=int, default=1, help="images drawn as class-token grids (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="image side every model runs at (teachers rebuilt there as their family allows; default: the "
        "size trained students were trained at, else the teacher's)",
    )
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    for flag in ("num_images", "batch_size", "topk", "floor_images", "pictures", "img_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    from ..apps.inspect import inspect_attention  # after the checks: a bad flag answers without torch

    result = inspect_attention(
        args.teacher,
        args.students,
        images=args.images,
        data=args.data,
        data_root=args.data_root,
        split=args.split,
        num_images=args.num_images,
        out=args.out,
        overwrite=args.overwrite,
        pretrained=not args.random_weights,
        teacher_arch=args.teacher_arch,
        student_arch=args.student_arch,
        batch_size=args.batch_size,
        picture_images=args.pictures,
        seed=args.seed,
        img_size=args.img_size,
        topk=args.topk,
        noise=args.noise,
        floor_images=args.floor_images,
        progress=True,
    )
    for name, layers in result["students"].items():
        js = [r["mean"].get("js") for r in layers if r["mean"].get("js") is not None]
        mean_js = sum(js) / len(js) if js else float("nan")
        print(f"{name}: mean JS to the teacher {mean_js:.4f} over {len(layers)} layers")
    print(f"report: {args.out}/report.md (metrics.json, PNGs beside it)")
    return 0


@register_command("fetch")
def _fetch_parser(sub):
    p = sub.add_parser(
        "fetch", help="download a teacher into the Hugging Face cache (on a machine with internet)"
    )
    p.add_argument("spec", help="timm name (vit_large_patch16_224.mae) or hf-hub:ORG/NAME[@rev]")
    p.add_argument("--revision", default=None)
    p.add_argument("--cache-dir", default=None, help="cache folder (default: HF_HUB_CACHE / HF_HOME)")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args) -> int:
    from ..sources.teacher import fetch_teacher

    path = fetch_teacher(args.spec, cache_dir=args.cache_dir, revision=args.revision)
    print(f"{args.spec} -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnxfer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Attention transfer for Vision Transformers: attention copy, attention distillation and "
        "conversion to efficient attention, on timm models.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"attnxfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS.values():
        add(sub)
    return parser


def _is_user_error(e: Exception) -> bool:
    """Whether ``e`` means 'change your input' (a `UserError`): printed in one line, exit code 2. Anything
    else is a bug and keeps its traceback. Recognised without importing the library (torch): a bad key or
    a missing recipe answers at once."""
    return isinstance(e, UserError)


def _where_to_resume(args) -> str:
    """What a re-run of an interrupted command continues from (checkpoints are only ever whole)."""
    if args.command == "inspect":  # it writes into a temporary sibling of --out and moves it into place
        return f"nothing was written to {args.out}: run the same command again"
    try:
        from ..checkpoints.run_dir import RunDir

        run_dir = _load(args).run_dir
        info = RunDir(run_dir).latest(verify_hash=False)
    except Exception:
        return "run the same command again to continue from the newest checkpoint, if one was saved"
    if info is None:
        return f"no checkpoint was saved yet in {run_dir}: running the same command again starts over"
    return f"running the same command again continues from step {info.step} ({info.path})"


def _stopped_by_signal(args, error: Exception) -> int | None:
    """The exit code of a run that SIGTERM stopped at a step boundary (its checkpoint saved), after saying
    so on the main process; None for any other error."""
    # not loaded: nothing trained, so no SIGTERM stop (and no torch to import for a bad argument)
    stop = sys.modules.get("attnxfer.train.stop")
    if stop is None or not isinstance(error, stop.StopRequested):
        return None
    if os.environ.get("RANK", "0") == "0":
        print(
            f"attnxfer {args.command}: {error}; re-run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may sit anywhere among the options (`-c x.yaml a=1 --nodes 2 b=2`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "print_config", False):
            return _print_config(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"attnxfer {args.command}: interrupted; {_where_to_resume(args)}", file=sys.stderr)
        return 130
    except Exception as e:
        stopped = _stopped_by_signal(args, e)
        if stopped is not None:
            return stopped
        if os.environ.get("ATTNXFER_DEBUG") or not _is_user_error(e):
            raise
        print(f"attnxfer {args.command}: error: {e}", file=sys.stderr)
        return 2


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The program's entry point (the ``attnxfer`` script, ``python -m attnxfer``, ``torchrun -m attnxfer``):
    `main`, then `end_program` with its exit code. Call `main` to get the code back instead."""
    end_program(main(argv))


if __name__ == "__main__":
    run()
