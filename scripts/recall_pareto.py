"""The Pareto figure of docs/choosing-attention.md: top-1 against measured speed-up on the recall task, for
every single-attention conversion of the zoo study and every student of the budgets study (the selector's
hybrids at each `convert.speedup`, and the uniform interleavings).

    python scripts/recall_pareto.py runs/recall/convert_zoo runs/recall/convert_budgets \
        --out docs/figures/recall_pareto.png

Reads each study's conversion_study.json (`attnxfer study --report` writes it again from the students'
reports); measures nothing. Intervals: 95 % Wilson on the validation images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE),) if p not in sys.path]  # attnxfer from this checkout

from attnxfer.analysis.intervals import correct_count, top1_interval  # noqa: E402


def points(study: Path) -> list[dict]:
    """name, attention, speed-up (x teacher) and top-1 with its interval of each student with a report."""
    rows = json.loads((study / "conversion_study.json").read_text())["students"]
    out = []
    for row in rows:
        if row.get("report") is None or row.get("top1") is None:
            continue
        n = row["val_size"]
        lo, hi = top1_interval(correct_count(row["top1"], n), n)
        out.append({**row, "speedup": row["speed"]["speedup"], "low": lo, "high": hi})
    return out


def draw(zoo: list[dict], budgets: list[dict], teacher_top1: float | None):
    """Two panels on one speed axis: every student (left), and the top few points where the students that
    retrieve sit within the intervals of each other (right, zoomed)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    styles = [
        ("single attention (zoo study)", zoo, "o", "tab:gray"),
        ("convert.attention=auto", [p for p in budgets if p["name"].startswith("auto")], "D", "tab:blue"),
        ("uniform interleaving", [p for p in budgets if not p["name"].startswith("auto")], "s", "tab:orange"),
    ]
    zoom = (96.5, 100.3)
    for ax, limits in zip(axes, (None, zoom)):
        for label, group, marker, color in styles:
            if not group:
                continue
            xs = [p["speedup"] for p in group]
            ys = [p["top1"] for p in group]
            err = [[p["top1"] - p["low"] for p in group], [p["high"] - p["top1"] for p in group]]
            ax.errorbar(xs, ys, yerr=err, fmt=marker, color=color, label=label, capsize=2, ms=5)
            for p in group:
                shown = p["top1"] < 95 if limits is None else p["top1"] >= limits[0]
                if shown:
                    ax.annotate(
                        p["name"],
                        (p["speedup"], p["top1"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        if teacher_top1 is not None:
            ax.axhline(
                teacher_top1, color="black", lw=0.8, ls="--", label=f"softmax teacher ({teacher_top1:.1f} %)"
            )
        ax.axvline(1.0, color="black", lw=0.5, ls=":")
        ax.set_xlabel("measured speed-up over the teacher (forward, batch 8, 1,024 tokens)")
        if limits is not None:
            ax.set_ylim(*limits)
            ax.set_title("the top, zoomed (names of the points above 96.5 %)", fontsize=9)
        else:
            ax.set_ylabel("val top-1 (%), 95 % Wilson interval")
            ax.set_title("every student (names of the points below 95 %)", fontsize=9)
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "Recall at 1,024 tokens: quality against speed (each study's speeds measured in its own run)"
    )
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zoo", type=Path, help="the zoo's convert study (recall/convert_zoo)")
    parser.add_argument("budgets", type=Path, help="the budgets' convert study (recall/convert_budgets)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    zoo, budgets = points(args.zoo), points(args.budgets)
    first = json.loads((args.zoo / zoo[0]["name"] / "report.json").read_text()) if zoo else {}
    fig = draw(zoo, budgets, (first.get("top1") or {}).get("teacher"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    for p in sorted(zoo + budgets, key=lambda p: -p["speedup"]):
        print(
            f"{p['name']:>16} {p['attention']:>28} {p['speedup']:5.2f}x  {p['top1']:6.2f} [{p['low']:.1f}, {p['high']:.1f}]"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
