"""``attnxfer export``: a run's student in timm's Hub format or as ONNX, with a model card."""

from __future__ import annotations

import argparse
import json

from ...speak import is_main, say, warn
from .base import register_command


def _format(name: str) -> str:
    """A ``--format`` value; the names Hugging Face's users reach for answered with the format that is theirs."""
    if name.lower() in ("transformers", "hf", "huggingface", "safetensors"):
        raise argparse.ArgumentTypeError(
            f"{name!r} is the timm format (the default: config.json + model.safetensors), which transformers "
            "loads too: AutoModelForImageClassification.from_pretrained(OUT_DIR), or AutoModel for a headless "
            "student; use --format timm, or leave --format out"
        )
    return name


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument(
        "--checkpoint",
        choices=("best", "latest"),
        default=None,
        help="the checkpoint with the best recorded val metric, or the newest; default: the best, an MAE "
        "pre-training's newest (MAE fine-tunes its last weights)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to the Hub as REPO")
    p.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        action="extend",  # `--format timm --format onnx` is both, not the last one alone
        type=_format,
        choices=("timm", "onnx"),
        default=None,  # timm where none is named (a default list would be extended)
        metavar="FORMAT",
        help="timm (default: config.json + model.safetensors), onnx (model.onnx, checked in ONNX Runtime), "
        "or both: --format timm onnx",
    )


@register_command(
    "export",
    help="write a run's student in timm's Hub format or as ONNX, with a model card",
    description="Export RUN_DIR's student to OUT_DIR (config.json, model.safetensors, README.md). "
    "A softmax student then loads with timm.create_model('local-dir:OUT_DIR', "
    "pretrained=True) or transformers' AutoModelForImageClassification.from_pretrained(OUT_DIR) (a headless "
    "one, as an MAE pre-training's encoder: AutoModel.from_pretrained(OUT_DIR)); "
    "any student, efficient attention included (a conversion's folder "
    "exports its final student, RUN_DIR/stage2), with attnxfer.load_student('local-dir:OUT_DIR'). "
    "--format onnx writes OUT_DIR/model.onnx instead (any student; opset 18, batch axis free), "
    "checked in ONNX Runtime on CPU against the PyTorch forward (needs attnxfer[onnx]).",
    arguments=_arguments,
)
def run(args) -> int:
    from ...apps.run.resume import config_as_trained
    from ...checkpoints.export import export_run
    from ...checkpoints.onnx_export import require_onnx
    from ...checkpoints.run_dir import ExportWeights, RunDir

    if not is_main():  # under torchrun or srun, rank 0 alone writes OUT_DIR (the others' copies collided)
        return 0
    args.formats = args.formats or ["timm"]
    if "onnx" in args.formats:
        require_onnx()  # a missing package stops before the run is read
    run = RunDir(args.run_dir).final_student()  # a conversion's folder: its stage-2 run
    if run.config_file.is_file():  # the card names the data and recipe the run was trained with
        config_as_trained(run, "export")
    if run.path != RunDir(args.run_dir).path:
        say(f"attnxfer export: {args.run_dir} is a conversion; exporting its final student, {run.path}")
    weights, ckpt = args.weights, None
    if weights == "ema":  # a checkpoint without EMA has raw weights only: use them, and say so once exported
        ckpt, _ = run.student_checkpoint(args.checkpoint, quiet=True)  # the one exported (which says why)
        if not (ckpt / ExportWeights.EMA.filename).is_file():
            weights = "raw"
    out = export_run(
        run.path,
        args.out_dir,
        weights=weights,
        checkpoint=args.checkpoint,
        push_to_hub=args.push_to_hub,
        overwrite=args.overwrite,
        formats=args.formats,
    )
    if weights != args.weights and run.record().get("objective") != "mae":  # pretrain refuses ema.decay
        warn(f"attnxfer export: {ckpt.name} holds no EMA weights: its raw weights were exported")
    lines = [f"exported to {out}"]
    if "timm" in args.formats:
        meta = json.loads((out / "config.json").read_text())["attnxfer"]
        how = f"timm.create_model('local-dir:{out}', pretrained=True)  (or attnxfer.load_student)"
        if meta["attention"] != "softmax":
            how = f"attnxfer.load_student('local-dir:{out}')  (efficient attention: timm cannot build it)"
        elif not meta["loads_in_plain_timm"]:  # an architecture only attnxfer registers
            how = f"import attnxfer.models (registers {meta['student']['architecture']}), then {how}"
        lines.append(f"load with: {how}")
    if "onnx" in args.formats:
        onnx = json.loads((out / "export_report.json").read_text())["onnx"]
        lines.append(
            f"ONNX: {out / onnx['file']} (opset {onnx['opset']}); ONNX Runtime vs PyTorch max |diff| "
            f"{onnx['max_abs_diff']:.3g}: run with onnxruntime.InferenceSession('{out / onnx['file']}')"
        )
    say("\n".join(lines))
    return 0
