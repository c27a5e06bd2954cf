"""Does the search's proxy rank the zoo as a full conversion does? Spearman's rho over a finished convert study.

For every student of a convert study (`attnxfer study -c recall/convert_zoo`: one zoo attention each, converted
from one teacher), this fits that attention the way `attnxfer search` scores a candidate (``search.fit_steps``
of stage 1 on ``search.fit_batches`` cached batches, every layer at once) and takes two scores on the same
held-out images:

- ``map_kl``: the search's proxy, the mean per-layer KL between the teacher's attention rows and the
  student's, each layer on the teacher's hidden input (lower is better);
- ``output_kl``: what the student, fitted the same way, does end to end: KL between the teacher's and the
  student's class distributions (a headless teacher: 1 - cosine of the final features), every block
  replaced at once, so that an attention whose small per-layer errors compound (or that cannot retrieve)
  shows it.

Then Spearman's rho (``scipy.stats.spearmanr``) between each score and the students' final val top-1 (after
stage 2; after stage 1 beside it). A strongly negative rho: the score ranks as the conversions do.

    OMP_NUM_THREADS=2 python benchmarks/zoo_proxy.py runs/recall/convert_zoo --out runs/recall/zoo_proxy \
        search.fit_steps=40 search.fit_batches=4 search.held_out_images=256

Writes OUT/zoo_proxy.json and OUT/zoo_proxy.md (one row per student, rho and p for each score). A student
whose map is not row-stochastic gets no ``map_kl`` (the search rejects it; the row says why) and still an
``output_kl``; one without a map (hydra), fitted on the teacher's outputs, which the search does not cache, is
left out, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE),) if p not in sys.path]  # attnxfer from this checkout

from attnxfer.apps.search import build_evaluator  # noqa: E402
from attnxfer.config import load_config  # noqa: E402
from attnxfer.search.fitness import fit_student, held_out_kl  # noqa: E402


def students_of(study: Path) -> list[dict]:
    """name, attention, options and top-1 (after stage 1 and stage 2) of each student with a report."""
    out = []
    for entry in json.loads((study / "study.json").read_text())["students"]:
        report_file = study / entry["folder"] / "report.json"
        if not report_file.is_file():
            print(f"{entry['name']}: no report.json yet, left out", flush=True)
            continue
        report = json.loads(report_file.read_text())
        names = report["student"]["attention"]
        if len(set(names)) > 1:  # before any fit: the proxy fits one attention in every block
            print(
                f"{entry['name']}: a hybrid ({', '.join(names)}), left out: the proxy fits one attention",
                flush=True,
            )
            continue
        out.append(
            {
                "name": entry["name"],
                "attention": names[0],
                "options": report["student"]["attention_kwargs"] or {},
                "top1_stage1": report["top1"].get("after_stage1"),
                "top1": report["student_top1"],
                "teacher_top1": report["top1"]["teacher"],
            }
        )
    return out


@torch.no_grad()
def output_kl(teacher: torch.nn.Module, student: torch.nn.Module, images: list[torch.Tensor]) -> float:
    """Mean KL(teacher's class distribution || student's) over ``images``; a headless teacher: 1 - cosine."""
    total = count = 0.0
    for x in images:
        t, s = teacher(x), student(x)
        if getattr(teacher, "num_classes", 0):
            value = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        else:
            value = (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1)).sum()
        total += float(value)
        count += x.shape[0]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a finished convert study's folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--only", nargs="+", help="these students alone, in this order (a second process's share)"
    )
    parser.add_argument("overrides", nargs="*", help="search.* keys of the fit, e.g. search.fit_steps=40")
    args = parser.parse_intermixed_args()
    if not (args.study / "study.json").is_file():
        parser.error(
            f"{args.study} holds no study.json: give the folder of a finished `attnxfer study` of conversions"
        )
    students = students_of(args.study)
    if args.only:
        by_name = {s["name"]: s for s in students}
        if unknown := [name for name in args.only if name not in by_name]:
            parser.error(
                f"--only {' '.join(unknown)}: no student with a report by that name (have: {', '.join(by_name)})"
            )
        students = [by_name[name] for name in args.only]
    if len(students) < 3:
        sys.exit(f"{args.study}: {len(students)} students with a report; rho needs at least 3")
    first = args.study / json.loads((args.study / "study.json").read_text())["students"][0]["folder"]
    overrides = list(args.overrides)
    if not any(o.startswith("search.target_tokens=") for o in overrides):
        # nothing here is timed, but the evaluator checks the token count against the teacher's layout: the run's
        # own (search's default, 3137, is a class token + 56x56 patches, which a teacher without one refuses)
        tokens = json.loads((first / "report.json").read_text())["speed"]["tokens"]
        overrides.insert(0, f"search.target_tokens={tokens}")
    cfg = load_config(str(first / "config.yaml"), overrides)
    evaluator, parts = build_evaluator(cfg)
    teacher, cache, fit = evaluator.teacher, evaluator.cache, evaluator.fit
    device = next(teacher.parameters()).device
    images, taken = [], 0
    for x, *_ in parts.val_loader:  # the search's held-out images: the first of the validation set
        images.append(x[: cfg.search.held_out_images - taken].to(device))
        taken += images[-1].shape[0]
        if taken >= cfg.search.held_out_images:
            break
    rows, left_out = [], []
    for s in students:
        start = time.monotonic()
        try:
            student = fit_student(teacher, s["attention"], cache, fit, **s["options"])
        except ValueError as e:  # not row-stochastic: the search's map KL is undefined; fit it anyway
            s["map_kl_refused"] = str(e)
            try:
                student = fit_student(teacher, s["attention"], cache, fit, check_map=False, **s["options"])
            except ValueError as e:  # no map at all (hydra): fitted on outputs, which the cache lacks
                left_out.append(f"{s['name']}: {e}")
                print(f"{left_out[-1]}: left out", flush=True)
                continue
        if "map_kl_refused" not in s:
            s["map_kl"] = sum(per := held_out_kl(teacher, student, cache)) / len(per)
        s["output_kl"] = output_kl(teacher, student, images)
        s["seconds"] = time.monotonic() - start
        rows.append(s)
        print(
            f"{s['name']}: map KL {s.get('map_kl', float('nan')):.4f}, output KL {s['output_kl']:.4f}, "
            f"top-1 {s['top1']:.2f} ({s['seconds']:.0f} s)",
            flush=True,
        )
    result = {"study": str(args.study), "fit": vars(fit), "held_out_images": taken, "students": rows}
    result["left_out"] = left_out
    for score in ("map_kl", "output_kl"):
        scored = [r for r in rows if score in r]
        for target in ("top1", "top1_stage1"):
            pairs = [(r[score], r[target]) for r in scored if r[target] is not None]
            rho, p = spearmanr(*zip(*pairs)) if len(pairs) >= 3 else (float("nan"), float("nan"))
            result[f"rho_{score}_{target}"] = {"rho": float(rho), "p": float(p), "n": len(pairs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_proxy.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "zoo_proxy.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    lines = [
        f"# The search's proxy against the converted zoo ({result['study']})",
        "",
        f"Fit: {result['fit']['steps']} stage-1 steps (lr {result['fit']['lr']:g}, trains "
        f"{result['fit']['train']}); scores on {result['held_out_images']} held-out images.",
        "",
        "| student | map KL (search proxy) | output KL | top-1 after stage 1 | top-1 (final) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(result["students"], key=lambda r: -r["top1"]):
        kl = f"{r['map_kl']:.4f}" if "map_kl" in r else "n/a (not row-stochastic)"
        stage1 = f"{r['top1_stage1']:.2f}" if r["top1_stage1"] is not None else "-"
        lines.append(f"| {r['name']} | {kl} | {r['output_kl']:.4f} | {stage1} | {r['top1']:.2f} |")
    lines += [f"\nLeft out: {why}." for why in result.get("left_out", [])]
    lines += ["", "| score | against | Spearman rho | p | n |", "|---|---|---:|---:|---:|"]
    for score in ("map_kl", "output_kl"):
        for target in ("top1", "top1_stage1"):
            r = result[f"rho_{score}_{target}"]
            lines.append(f"| {score} | {target} | {r['rho']:.3f} | {r['p']:.3g} | {r['n']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
