"""The Pareto figures of docs/choosing-attention.md: top-1 against measured speed-up on the recall task, for
every student of the given convert studies: single-attention conversions (the zoo), the selector's hybrids
(`convert.attention=auto`, students named ``auto*``) and the fixed placements of softmax blocks (uniform
interleavings).

    python scripts/recall_pareto.py runs/recall/convert_zoo runs/recall/convert_budgets \
        --out docs/figures/recall_pareto.png
    python scripts/recall_pareto.py runs/recall/convert_budgets_deep runs/recall/convert_interleave_deep \
        --speeds runs/recall/hybrid_speed_deep.json --against auto_1.5 auto_2 \
        --title "Recall, four-block teacher" --out docs/figures/recall_pareto_deep.png

Reads each study's conversion_study.json (`attnxfer study --report` writes it again from the students'
reports); measures nothing. Speed: each study's own measurement (compare within a study only), or with
``--speeds`` every student's speed from one `benchmarks/hybrid_speed.py` run (one process, so comparable
across studies). ``--against``: McNemar's exact test of every student against the named ones, on the same
validation images (studies whose data makes other ones are refused). Intervals: 95 % Wilson on the validation
images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE),) if p not in sys.path]  # attnxfer from this checkout

from attnxfer.analysis.intervals import correct_count, top1_interval  # noqa: E402
from attnxfer.apps.run.uncertainty import format_p, mcnemar  # noqa: E402

KINDS = ("single attention", "convert.attention=auto", "uniform interleaving")
#: each kind's marker and colour in the figure
STYLES = tuple(zip(KINDS, ("o", "D", "s"), ("tab:gray", "tab:blue", "tab:orange")))


def kind_of(row: dict) -> str:
    if row["name"].startswith("auto"):
        return KINDS[1]
    return KINDS[2] if "," in row["attention"] else KINDS[0]


def points(study: Path, speeds: dict[str, float] | None) -> list[dict]:
    """name, attention, kind, speed-up (x teacher), why the study's report withheld it (None where it stands
    or ``speeds`` replaces it) and top-1 with its interval of each student with a report;
    ``speeds``: {attention, comma-separated without spaces: x teacher} in place of the study's own."""
    rows = json.loads((study / "conversion_study.json").read_text())["students"]
    out = []
    for row in rows:
        if row.get("report") is None or row.get("top1") is None:
            continue
        n = row["val_size"]
        lo, hi = top1_interval(correct_count(row["top1"], n), n)
        key = row["attention"].replace(" ", "")
        if speeds is not None and key not in speeds:
            raise SystemExit(f"--speeds has no row for {row['name']}'s attention {key}: add it to --hybrids")
        speedup = speeds[key] if speeds is not None else row["speed"]["speedup"]
        withheld = None if speeds is not None else row["speed"].get("speedup_withheld")
        out.append(
            {**row, "kind": kind_of(row), "speedup": speedup, "withheld": withheld, "low": lo, "high": hi}
        )
    return out


def val_images(study: Path) -> dict:
    """What a study's val images are made of: its data section (a student's config.yaml) but for the loader's
    and the train split's keys (``length``, a ``curriculum``), and the seed they are drawn from."""
    name = json.loads((study / "conversion_study.json").read_text())["students"][0]["name"]
    cfg = yaml.safe_load((study / name / "config.yaml").read_text())
    loader = ("batch_size", "eval_batch_size", "num_workers", "pin_memory")
    data = {k: v for k, v in cfg["data"].items() if k not in (*loader, "kwargs")}
    kwargs = {
        f"kwargs.{k}": v
        for k, v in (cfg["data"]["kwargs"] or {}).items()
        if k not in ("length", "curriculum")
    }
    return {**data, **kwargs, "seed": cfg["seed"] if data["seed"] is None else data["seed"]}


def benchmark_speeds(path: Path) -> tuple[dict[str, float], int]:
    """{model: x teacher} of a hybrid_speed.py JSON at its one token count, and that count."""
    rows = json.loads(path.read_text())["rows"]
    tokens = {r["tokens"] for r in rows}
    if len(tokens) != 1:
        raise SystemExit(f"{path}: measured at {sorted(tokens)} tokens; run the benchmark at one --tokens")
    return {r["model"]: r["x_teacher"] for r in rows}, tokens.pop()


def draw(students: list[dict], teacher_top1: float | None, speed_label: str, title: str):
    """Two panels on one speed axis: every student (left), and the top few points where the students that
    retrieve sit within the intervals of each other (right, zoomed); each panel names the points the other
    shows crowded. A student whose report withheld its speed-up is hollow, at the ratio of its median times."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    zoom = (max(p["top1"] for p in students) - 3.4, 100.3)
    for ax, limits in zip(axes, (None, zoom)):
        for (label, marker, color), withheld in itertools.product(STYLES, (False, True)):
            group = [p for p in students if p["kind"] == label and bool(p["withheld"]) == withheld]
            if not group:
                continue
            xs = [p["speedup"] for p in group]
            ys = [p["top1"] for p in group]
            err = [[p["top1"] - p["low"] for p in group], [p["high"] - p["top1"] for p in group]]
            style = (
                {"label": f"{label}, speed withheld (median drawn)", "mfc": "none"}
                if withheld
                else {"label": label}
            )
            ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, capsize=2, ms=5, **style)
            for p in group:
                if (p["top1"] < zoom[0]) == (limits is None):
                    ax.annotate(
                        p["name"] + (" (speed withheld)" if withheld else ""),
                        (p["speedup"], p["top1"]),
                        fontsize=7,
                        xytext=(3, -9 if label == KINDS[2] else 3),  # hybrid and interleaving can meet
                        textcoords="offset points",
                    )
        if teacher_top1 is not None:
            ax.axhline(
                teacher_top1, color="black", lw=0.8, ls="--", label=f"softmax teacher ({teacher_top1:.1f} %)"
            )
        ax.axvline(1.0, color="black", lw=0.5, ls=":")
        ax.set_xlabel(speed_label)
        if limits is not None:
            ax.set_ylim(*limits)
            shown = [p["speedup"] for p in students if p["top1"] >= zoom[0]]
            margin = 0.1 * (max(shown) - min(shown)) + 0.15
            ax.set_xlim(min(min(shown), 1.0) - margin, max(shown) + margin)
            ax.set_title(f"the top, zoomed (names of the points above {zoom[0]:.1f} %)", fontsize=9)
        else:
            ax.set_ylabel("val top-1 (%), 95 % Wilson interval")
            ax.set_title(f"every student (names of the points below {zoom[0]:.1f} %)", fontsize=9)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path, nargs="+", help="convert studies (their run_dir)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--speeds", type=Path, default=None, help="a benchmarks/hybrid_speed.py --json file")
    parser.add_argument("--against", nargs="*", default=[], help="students to test every other one against")
    parser.add_argument("--title", default="Recall at 1,024 tokens")
    args = parser.parse_args()
    for study in args.studies:
        if not (study / "conversion_study.json").is_file():
            parser.error(
                f"{study} holds no conversion_study.json: give the run_dir of a finished convert study "
                f"(`attnxfer study --report -c {study}/study.yaml` writes it from the students' folders)"
            )
    speeds, tokens = benchmark_speeds(args.speeds) if args.speeds else (None, None)
    students = [p for study in args.studies for p in points(study, speeds)]
    if len({p["name"] for p in students}) != len(students):
        raise SystemExit("two studies have a student of the same name; rename one")
    by_name = {p["name"]: p for p in students}
    missing = [n for n in args.against if n not in by_name]
    if missing:
        raise SystemExit(f"--against {missing}: no such student (have {sorted(by_name)})")
    made = [val_images(study) for study in args.studies] if args.against else []
    for study, data in zip(args.studies[1:], made[1:]):  # McNemar on other images would be a wrong test
        keys = sorted(k for k in {*data, *made[0]} if data.get(k) != made[0].get(k))
        if keys:
            raise SystemExit(
                f"--against pairs students on the same val images, which {args.studies[0]} and {study} make "
                f"differently: " + "; ".join(f"data.{k} {made[0].get(k)} vs {data.get(k)}" for k in keys)
            )
    first = (
        json.loads((args.studies[0] / students[0]["name"] / "report.json").read_text()) if students else {}
    )
    if speeds is None:
        label = "measured speed-up over the teacher (forward)"
        title = f"{args.title}: quality against speed (each study's speeds measured in its own run)"
    else:
        label = f"measured speed-up over the teacher (forward, {tokens - 1:,} tokens)"
        title = f"{args.title}: quality against speed, every student timed in one benchmark run"
    fig = draw(students, (first.get("top1") or {}).get("teacher"), label, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    for p in sorted(students, key=lambda p: -p["speedup"]):
        line = f"{p['name']:>16} {p['attention']:>44} {p['speedup']:5.2f}x  {p['top1']:6.2f} [{p['low']:.1f}, {p['high']:.1f}]"
        for name in args.against:
            if name != p["name"]:
                hits = [[c == "1" for c in q["val_hits"]] for q in (p, by_name[name])]
                paired = mcnemar(*hits)
                line += f"  vs {name}: {paired.only_a}/{paired.only_b} p {format_p(paired.p_value)}"
        if p["withheld"]:
            line += f"  speed withheld: {p['withheld']}"
        print(line)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
