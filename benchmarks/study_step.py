"""A study's step against its students' solo steps: what sharing one teacher pass saves, measured in one run.

One teacher, K students distilled from it (`attnxfer study --vary seed=1..K`), each built exactly as
`attnxfer study` and `attnxfer train` build it (a random teacher saved in timm's format, the synthetic dataset
at the teacher's resolution). In interleaved rounds (every configuration once a round, order rotated, so all
share the machine's background load), the real loops take one optimiser step:

  solo_k     student k's `attnxfer train` step (`Engine.steps`): its own teacher forward, its forward,
             its distillation loss, backward and AdamW step
  study      one round of the K-student study (`Lockstep.round`): one teacher forward for all, then each
             student's own part, each under its own random streams
  teacher    the teacher's forward alone, for what the students need of it (`TeacherStudent.teacher_pass`)
  train_1    student 1's `train` step again, against
  study_1    a one-student study's round (the same student): what a study costs when there is no one to share with

The floor of a study step is one teacher forward plus each student's own part of its solo step:
``teacher + sum_k (solo_k - teacher)``. Targets (the issue's, CPU at one thread): study <= 0.50 x sum_k solo_k,
study <= 1.10 x floor, study_1 <= 1.03 x train_1. Memory: the most tensor bytes live at once during a study
round against a one-student round of the same study's first student (the teacher's signals for the batch and
one student's activations; every student's weights and optimiser state live before both start), <= 1.10.

    python benchmarks/study_step.py                       # ViT-B/16 teacher, 4 ViT-Ti/16 students, 224 px, batch 8
    python benchmarks/study_step.py --quick               # tiny models, seconds: a smoke run
    python benchmarks/study_step.py --json out.json
    python benchmarks/study_step.py --device cuda --batch 64 --precision bf16   # a lent GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE), _HERE) if p not in sys.path]

import timm  # noqa: E402
import torch  # noqa: E402
from _measure import bench_device, format_table, machine_info, mib, step_peak_growth, write_json  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from attnxfer.apps.run.training import build_engine  # noqa: E402
from attnxfer.apps.study.study import build_members  # noqa: E402
from attnxfer.config.study_spec import load_study  # noqa: E402
from attnxfer.speak import quiet  # noqa: E402
from attnxfer.train.lockstep import Lockstep  # noqa: E402
from attnxfer.train.runtime import create_runtime  # noqa: E402
from attnxfer.train.timing import interleaved_timings  # noqa: E402

FULL = {"teacher": "vit_base_patch16_224", "student": "vit_tiny_patch16_224", "img": 224, "batch": 8}
QUICK = {"teacher": "vit_tiny_patch16_224", "student": "vit_tiny_patch16_224", "img": 32, "batch": 4}
QUICK_KWARGS = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


def _teacher_dir(arch: str, img: int, kwargs: dict, folder: Path) -> Path:
    """A teacher of ``arch`` with random weights, saved as timm saves a Hub model (``local-dir:``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=10, img_size=img, **kwargs)
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def _overrides(spec: dict, teacher: Path, args, kwargs: dict) -> list[str]:
    student_kwargs = {k: v for k, v in kwargs.items() if k != "embed_dim"} | {"img_size": spec["img"]}
    return [
        f"teacher.spec=local-dir:{teacher}",
        f"model.name={spec['student']}",
        f"model.kwargs={student_kwargs}",
        "model.mirror_teacher=false",
        "transfer.mode=distill",
        f"transfer.ce_path={args.ce_path}",
        "data.dataset=synthetic",
        f"data.img_size={spec['img']}",
        f"data.batch_size={spec['batch']}",
        "data.kwargs.length=100000",  # no epoch ends (evaluations) among the measured steps
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        f"device={args.device}",
        f"precision={args.precision}",
        "log.every_steps=100000",
        "log.progress=false",
        "log.trackers=[]",
        "log.attention_images=0",
        "checkpoint.every_epoch=false",
    ]


def _study(overrides: list[str], run_dir: Path, seeds: list[str], runtime) -> Lockstep:
    spec = load_study(None, [*overrides, f"run_dir={run_dir}"], {"seed": seeds})
    members, batches, feed = build_members(spec, runtime)
    return Lockstep(members, batches, feed, on_saved=lambda *_: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", type=int, default=4)
    p.add_argument("--teacher", default=None, help="timm arch of the teacher (default ViT-B/16)")
    p.add_argument("--student", default=None, help="timm arch of the students (default ViT-Ti/16)")
    p.add_argument("--img", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument(
        "--ce-path", default="rows", help="transfer.ce_path of every student (rows: CPU's default)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke run in seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = dict(QUICK if args.quick else FULL)
    spec |= {
        k: v
        for k, v in (
            ("teacher", args.teacher),
            ("student", args.student),
            ("img", args.img),
            ("batch", args.batch),
        )
        if v
    }
    kwargs = QUICK_KWARGS if args.quick else {}
    device = bench_device(args.device)
    k = args.students
    with (
        tempfile.TemporaryDirectory(prefix="study-step-") as tmp,
        quiet(),
    ):  # the runs' own lines: not the measure
        tmp = Path(tmp)
        teacher = _teacher_dir(spec["teacher"], spec["img"], kwargs, tmp / "teacher")
        overrides = _overrides(spec, teacher, args, kwargs)
        runtime = create_runtime(args.device, args.precision, 1, False)
        seeds = [str(i + 1) for i in range(k)]
        study = _study(overrides, tmp / "study", seeds, runtime)
        one = _study(overrides, tmp / "one", seeds[:1], runtime)
        solo_spec = load_study(None, [*overrides, f"run_dir={tmp / 'solo'}"], {"seed": seeds})
        solos = [build_engine(cfg, runtime=runtime).steps() for _, cfg in solo_spec.configs()]
        pair = study.members[0].engine.objective.module
        x = torch.randn(spec["batch"], 3, spec["img"], spec["img"], device=device)

        def teacher_pass():
            with torch.no_grad():
                pair.teacher_pass(x)

        fns = {f"solo_{i + 1}": (lambda g=g: next(g)) for i, g in enumerate(solos)}
        fns |= {
            "study": study.round,
            "teacher": teacher_pass,
            "train_1": lambda: next(solos[0]),
            "study_1": one.round,
        }
        times = interleaved_timings(fns, device=device, warmup=args.warmup, repeats=args.repeats)
        peak_study = step_peak_growth(study.round, device)
        peak_one = step_peak_growth(one.round, device)

    med = {name: t.median for name, t in times.items()}
    solo_sum = sum(med[f"solo_{i + 1}"] for i in range(k))
    floor = med["teacher"] + sum(med[f"solo_{i + 1}"] - med["teacher"] for i in range(k))
    ratios = {
        "study / solo steps": med["study"] / solo_sum,
        "study / floor": med["study"] / floor,
        "study_1 / train_1": med["study_1"] / med["train_1"],
        "study peak / one-student peak": peak_study / peak_one if peak_one else float("nan"),
    }
    targets = {
        "study / solo steps": 0.50,
        "study / floor": 1.10,
        "study_1 / train_1": 1.03,
        "study peak / one-student peak": 1.10,
    }
    rows = [{"what": name, "seconds": t.median, "spread": t.spread} for name, t in times.items()]
    print(
        f"{spec['teacher']} teacher, {k} x {spec['student']} students, {spec['img']} px, batch {spec['batch']}, {device}, {torch.get_num_threads()} thread(s)"
    )
    print(
        format_table(
            rows, [("what", "step", ""), ("seconds", "median s", ".3f"), ("spread", "± (IQR/2)", ".1%")]
        )
    )
    print(
        f"floor (teacher + each student's own part) {floor:.3f} s; peak tensor memory: study {mib(peak_study):.1f} MiB, one student {mib(peak_one):.1f} MiB"
    )
    for name, value in ratios.items():
        print(
            f"{name}: {value:.3f} (target <= {targets[name]:.2f}: {'met' if value <= targets[name] else 'NOT met'})"
        )
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine_info(device),
                "setup": spec | {"students": k},
                "seconds": med,
                "spread": {n: t.spread for n, t in times.items()},
                "floor": floor,
                "peak_bytes": {"study": peak_study, "one_student": peak_one},
                "ratios": ratios,
                "targets": targets,
                "median_of": statistics.median([len(t.times) for t in times.values()]),
            },
        )


if __name__ == "__main__":
    main()
