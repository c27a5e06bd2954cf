"""``attnxfer inspect``: does a student attend like its teacher? Per layer and head, beside a floor."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...errors import InputError
from ...run_layout import RUN_CONFIG, RUN_DIR_MARKERS, STUDY_RECORD, is_exported_model, no_run_folder
from ...speak import is_main, say
from .base import register_command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", metavar="TEACHER", help="the teacher; alone, a run's folder: see below")
    p.add_argument("students", metavar="STUDENT", nargs="*")
    what = p.add_mutually_exclusive_group()
    # extend: the flag given once per file reads them all (the plain store kept the last alone)
    what.add_argument(
        "--images", nargs="+", action="extend", metavar="FILE", default=[], help="image files to inspect on"
    )
    what.add_argument(
        "--data",
        metavar="DATASET",
        help="a registered dataset (animal_mnist, folder, recall, synthetic, torch/cifar10, hfds/NAME, ...); "
        "default: the data the first "
        "STUDENT given as a run folder was trained on, as its run made it",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset root (folder datasets; torch/NAME: torchvision's download folder; animal_mnist: the folder "
        "it caches its arrays in)",
    )
    p.add_argument(
        "--data-kwargs",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="options of --data's dataset, as a run's data.kwargs (recall: num_keys=32 hops=2; seed=N: its "
        "data seed)",
    )
    p.add_argument("--split", choices=("train", "val"), help="dataset split (default val)")
    p.add_argument("--num-images", type=int, help="images taken from --data (default 64)")
    p.add_argument("--out", default="runs/inspect", help="report folder (default runs/inspect)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="timm names with random weights (no download; smoke tests); refused for folders and files",
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
    for flag, what in (("--mean", "mean"), ("--std", "std")):
        p.add_argument(
            flag,
            type=float,
            nargs="+",
            metavar=what.upper(),
            help=f"the {what} the teacher's images are normalised by, one per channel (every model is given the "
            "teacher's); default: its pretrained config's. Needed where a transformers folder has no "
            "preprocessor_config.json",
        )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="image side every model runs at (teachers rebuilt there as their family allows; default: the "
        "size trained students were trained at, else the teacher's)",
    )


@register_command(
    "inspect",
    help="does a student attend like its teacher? per-layer/head agreement, head matching, pictures",
    description="Compare STUDENT's attention maps (one or more; softmax or efficient attention, through "
    "their implicit maps) with TEACHER's on images: KL, Jensen-Shannon, top-k overlap, rank correlation, "
    "entropy, attention distance and class-token agreement per layer and head, beside a floor (the "
    "teacher against itself on noisy inputs); the optimal teacher-student head assignment per layer; "
    "class-token maps, rollout and per-layer curves. Writes OUT/metrics.json, report.md and PNGs. "
    "Specs: timm names, hf-hub:ORG/NAME, local-dir:PATH, weight files (with --teacher-arch/--student-arch), "
    "`attnxfer export` folders and RUN_DIRs (a copy-mode run needs its own teacher as TEACHER). A RUN_DIR given "
    "alone (a run, a conversion's or a study's folder) is compared with the teacher it was trained from.",
    arguments=_arguments,
)
def run(args) -> int:
    if not is_main():  # under torchrun or srun, rank 0 alone writes OUT_DIR (the others' copies collided)
        return 0
    if args.students and _is_study(args.teacher):  # no teacher: a pattern that matched several studies?
        siblings = [s for s in args.students if Path(s).parent == Path(args.teacher).parent and _is_study(s)]
        also = (
            f", beside {siblings[0]}: if a pattern (DIR/*) matched several studies, name one"
            if siblings
            else ""
        )
        raise InputError(
            f"{args.teacher} is a study's folder, given as the TEACHER{also}; a study's folder alone is compared "
            f"with the teacher it was trained from: attnxfer inspect {args.teacher}"
        )
    if not args.students:  # `inspect RUN`: the run against the teacher its config.yaml names
        teacher = _trained_from(args.teacher)
        args.teacher, args.students = teacher.spec, [args.teacher]
        args.teacher_arch = args.teacher_arch or teacher.arch  # a weights file's architecture
    for flag in ("num_images", "batch_size", "topk", "floor_images", "pictures", "img_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    dataset_only = [
        f"--{k.replace('_', '-')}"
        for k in ("data_root", "data_kwargs", "split", "num_images")
        if getattr(args, k) is not None
    ]
    if args.images and dataset_only:  # else dropped without a word
        raise InputError(f"--images reads the files given, not a dataset: drop {', '.join(dataset_only)}")
    # the dataset's own line names root=, no flag of inspect's
    if args.data == "folder" and not args.data_root:
        raise InputError("--data folder reads its images from a folder: give --data-root PATH")
    if args.noise < 0:
        raise InputError(f"--noise is the floor's noise std: it must be >= 0, got {args.noise}")
    if bad := [item for item in args.data_kwargs or () if "=" not in item]:
        raise InputError(f"--data-kwargs takes KEY=VALUE items (e.g. num_keys=32), got {bad[0]!r}")
    # after the checks: a bad flag answers without torch
    from ...apps.inspect.inspect import inspect_attention
    from ...config.overrides import apply_overrides, parse_overrides
    from ...config.schema import TrainConfig

    # typed as `attnxfer train data.kwargs.KEY=VALUE` types them (YAML: 32 a number, [a, b] a list)
    given = {f"data.kwargs.{k}": v for k, v in parse_overrides(args.data_kwargs or []).items()}
    data_options = apply_overrides(TrainConfig(), given).data.kwargs if given else None

    same = "images data data_root split num_images out overwrite teacher_arch student_arch batch_size seed"
    same += " img_size topk noise floor_images mean std"  # flags named as inspect_attention's keywords
    result = inspect_attention(
        args.teacher,
        args.students,
        pretrained=not args.random_weights,
        picture_images=args.pictures,
        data_options=data_options,
        progress=True,
        **{k: getattr(args, k) for k in same.split() if getattr(args, k) is not None},  # None: its default
    )
    for name, layers in result["students"].items():
        js = [r["mean"].get("js") for r in layers if r["mean"].get("js") is not None]
        mean_js = sum(js) / len(js) if js else float("nan")
        say(f"{name}: mean JS to the teacher {mean_js:.3g} over {len(js)} layers with a map")
    say(f"report: {args.out}/report.md (metrics.json, PNGs beside it)")
    return 0


def _is_study(folder: str) -> bool:
    return (Path(folder) / STUDY_RECORD).is_file()


def _trained_from(folder: str):
    """The teacher section of a run's folder (a study's: its first student's; a conversion's: its stage 2's),
    as its config.yaml reads from here (a relative path found where the run started)."""
    from ...checkpoints.run_dir import RunDir
    from ...config import load_config

    both = f"inspect compares a STUDENT with a TEACHER: give both, attnxfer inspect TEACHER {folder}"
    if folder.startswith(("local-dir:", "hf-hub:")) or is_exported_model(Path(folder)):  # a model, no run
        raise InputError(
            f"{folder} is a model, not a run's folder: inspect compares a STUDENT with a TEACHER, so give both, "
            f"attnxfer inspect {folder} STUDENT (or the other way round; a run's folder alone is compared with "
            "the teacher it was trained from)"
        )
    if not Path(folder).exists() and ("/" in folder or Path(folder).suffix):
        raise InputError(f"{folder} does not exist; {both}")
    runs = RunDir(folder).study_runs()
    run = RunDir(runs[0]) if runs else RunDir(folder)
    if not (run.is_run() or run.is_conversion()):
        written = any((Path(folder) / name).exists() for name in (RUN_CONFIG, *RUN_DIR_MARKERS))
        not_one = f"{no_run_folder(Path(folder))}; " if Path(folder).is_dir() and not written else ""
        raise InputError(
            f"{not_one}{both} (a run's folder alone is compared with the teacher it was trained from)"
        )
    teacher = load_config(str(run.final_student().config_file)).teacher
    if not teacher.spec and run.record().get("objective") == "mae":  # no student: the teacher of others
        raise InputError(
            f"{folder} is an MAE pre-training, whose encoder teaches others: give it as the TEACHER, attnxfer "
            f"inspect {Path(folder) / 'export'} STUDENT"
        )
    if not teacher.spec:
        raise InputError(f"{folder} was trained without a teacher; {both}")
    say(f"{folder}: compared with the teacher it was trained from, {teacher.spec}")
    return teacher
