"""A convert study's students side by side, read from ``study.json`` and their ``report.json`` (nothing is
measured again: every student was measured on the same images and timed in the same calls as one teacher)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...checkpoints.atomic_io import atomic_write_json, atomic_write_text
from ...errors import InputError
from ...run_layout import COMPARISON_DATA, COMPARISON_REPORT
from ...speak import say
from ..run.uncertainty import format_p, mcnemar
from ..study.report import read_study_record
from .report import RERUN, STAGE_ROWS, final_stage, range_text, ratio_text, top1_interval_text, value_text

#: the stages as a row names them: "weights swapped in", "after stage 1", "after stage 2"
_STAGE_NAMES = {key: label.removeprefix("student").lstrip(", ") for key, label in STAGE_ROWS}


def write_conversion_comparison(study_dir: str | Path) -> Path:
    """Write ``conversion_study.md`` and ``.json`` (the same rows, as data) of the convert study in
    ``study_dir``; returns the markdown's path. A student without a report yet is a row saying so."""
    study_dir = Path(study_dir)
    students = read_study_record(study_dir)["students"]
    reports = {s["name"]: _report(study_dir / s.get("folder", s["name"]) / "report.json") for s in students}
    rows = [_row(name, report) for name, report in reports.items()]
    atomic_write_json(study_dir / COMPARISON_DATA, {"study": study_dir.resolve().name, "students": rows})
    out = atomic_write_text(study_dir / COMPARISON_REPORT, _render(study_dir.resolve().name, reports, rows))
    say(f"conversion study report -> {out}")
    return out


def _report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}): is it a conversion's report?") from None


def _row(name: str, report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {"name": name, "report": None}
    stage = final_stage(report)
    knn = ((report.get("knn") or {}).get(stage) or {}) if stage else {}
    features = ((report.get("features") or {}).get(stage) or {}) if stage else {}
    speed = report["speed"]
    names = report["student"]["attention"]
    return {
        "name": name,
        "report": str(Path(report["run_dir"]) / "report.md"),
        "attention": names[0] if len(set(names)) == 1 else ", ".join(names),
        "stage": stage,
        "stopped": report.get("stopped"),
        "top1": (report.get("top1") or {}).get(stage) if stage else None,
        "val_hits": (report.get("val_hits") or {}).get(stage) if stage else None,
        "val_size": report["data"].get("val_size"),
        "knn_top1": knn.get("knn_top1"),
        "knn_interval": [knn["knn_top1_low"], knn["knn_top1_high"]] if "knn_top1_low" in knn else None,
        "knn_count": knn.get("knn_count"),
        "feat_cos_patch": features.get("feat_cos_patch"),
        "agreement": {
            which: [(r["layer"], r["metric"], r.get(stage) if stage else None) for r in rows]
            for which, rows in report["agreement"].items()
        },
        "after_stage1": [r.get("after_stage1") for r in report["agreement"]["teacher_input"]],
        "speed": {k: speed.get(k) for k in _SPEED_KEYS},
        # the break-even sweep (batch 1): {side: (tokens, x teacher, floor x teacher)}, or why a side is missing
        "sweep": {
            **{
                str(r["resolution"]): (
                    r.get("tokens"),
                    r["student_over_teacher"],
                    r.get("floor_over_teacher"),
                )
                for r in (speed.get("sweep") or {}).get("rows", [])
            },
            **{str(r["resolution"]): r["reason"] for r in (speed.get("sweep") or {}).get("skipped", [])},
        },
    }


_SPEED_KEYS = (
    "student_ms",
    "student_images_per_s",
    "speedup",
    "student_over_floor",
    "teacher_ms",
    "teacher_images_per_s",
    "floor_ms",
    "floor_images_per_s",
    "floor_over_teacher",
    "break_even",
    "speedup_range",
    "speedup_withheld",
    "break_even_withheld",
)


# --------------------------------------------------------------------------------------------- the text
def _render(study: str, reports: dict[str, dict[str, Any] | None], rows: list[dict[str, Any]]) -> str:
    done = [r for r in reports.values() if r is not None]
    lines = [f"# Conversion study `{study}`: {len(rows)} efficient attentions from one teacher", ""]
    if not done:
        return "\n".join([*lines, "No student has a report yet.", ""])
    first = done[0]
    data, stage1, stage2 = first["data"], first["stage1"], first["stage2"]
    low, high = min(r["stage1"]["steps"] for r in done), max(r["stage1"]["steps"] for r in done)
    steps = low if low == high else f"{low} to {high}"  # each student's own stage 1
    return "\n".join(
        [
            *lines,
            f"- teacher: `{first['teacher']['spec']}`",
            f"- data: {data['dataset']} (val {data['val_size']} images; map agreement on {data['agreement_images']} "
            "images)",
            f"- stage 1: {steps} steps of batch {stage1['batch_size']}; stage 2: {stage2['steps']} steps; "
            "each batch read once and the teacher run once per batch for every student",
            f"- time: {max(r['seconds']['total'] for r in done):.0f} s for the whole study",
            "- each student's own report: `<student>/report.md` (its stages, per-layer tables, break-even sweep)",
            "",
            *_quality_section(first, rows),
            *_agreement_section(rows, "end_to_end", "end to end (each model on its own hidden states)"),
            *_stage1_section(rows),
            *_speed_section(first, rows),
            *_sweep_section(rows),
        ]
    )


def _quality_section(first: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Top-1 and k-NN top-1 with Wilson intervals, and final-feature cosine, at each student's last stage."""
    teacher_top1 = first["top1"]["teacher"]
    knn0 = next((s for s in (first.get("knn") or {}).values() if s and "knn_top1" in s), {})
    n = first["data"].get("val_size")
    paired = paired_with_best(rows)
    knn_t = knn0.get("knn_teacher_top1")
    knn_t_band = (
        f"[{knn0['knn_teacher_top1_low']:.1f}, {knn0['knn_teacher_top1_high']:.1f}]"
        if knn_t is not None
        else "—"
    )
    lines = [
        "## Quality (validation, at each student's last stage)",
        "",
        f"95 % intervals: Wilson, on {n or '?'} validation images"
        + (f" (k-NN: k = {knn0['knn_k']}, {knn0['knn_count']} images)" if knn0 else "")
        + "; feature cosine: the final patch tokens' mean cosine with the teacher's (no label read)."
        + (
            f" Against the best: McNemar's exact test against {paired['best']} (the best top-1) on the same "
            "images, `only this / only the best` right, and p."
            if paired
            else ""
        ),
        "",
        "| student | attention | stage | top-1 (%) | 95 % interval | of teacher's | against the best "
        "| k-NN top-1 (%) | 95 % interval | feature cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | softmax | | {ratio_text(teacher_top1)} | {top1_interval_text(teacher_top1, n)} | | | {ratio_text(knn_t)} | "
        f"{knn_t_band} | 1 |",
    ]
    for row in rows:
        if row["report"] is None or row["stage"] is None:
            lines.append(f"| {row['name']} | | no report yet | | | | | | | |")
            continue
        top1, band = row["top1"], row["knn_interval"]
        share = f"{100 * top1 / teacher_top1:.1f}%" if top1 is not None and teacher_top1 else "—"
        stage = _STAGE_NAMES[row["stage"]] + (" (stopped)" if row["stopped"] else "")
        lines.append(
            f"| {row['name']} | {row['attention']} | {stage} | {ratio_text(top1)} | {top1_interval_text(top1, row['val_size'])} "
            f"| {share} | {(paired or {}).get(row['name'], '—')} | {ratio_text(row['knn_top1'])} | "
            f"{f'[{band[0]:.1f}, {band[1]:.1f}]' if band else '—'} | "
            f"{value_text(row['feat_cos_patch'])} |"
        )
    stopped = [f"- {r['name']} stopped early: {r['stopped']}" for r in rows if r.get("stopped")]
    return [*lines, "", *stopped, *([""] if stopped else [])]


def paired_with_best(rows: list[dict[str, Any]]) -> dict[str, str] | None:
    """McNemar's exact test of every student against the one with the best top-1 on the same images:
    ``{"best": name, name: "only this / only the best, p"}``; None where fewer than two students recorded
    which images they got right."""
    scored = [r for r in rows if r.get("val_hits") and r.get("top1") is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda r: r["top1"])
    # of a tie, the first listed: said, else the others' "the best" reads as a ranking the images do not make
    tied = [r["name"] for r in scored if r is not best and r["top1"] == best["top1"]]
    out = {
        "best": best["name"],
        best["name"]: f"the best (tied with {', '.join(tied)})" if tied else "the best",
    }
    for row in scored:
        if row is not best and len(row["val_hits"]) == len(best["val_hits"]):
            t = mcnemar([c == "1" for c in row["val_hits"]], [c == "1" for c in best["val_hits"]])
            out[row["name"]] = f"{t.only_a} / {t.only_b}, p {format_p(t.p_value)}"
    return out


def _agreement_section(rows: list[dict[str, Any]], which: str, title: str) -> list[str]:
    measured = [r for r in rows if r["report"] is not None and r["stage"] is not None]
    if not measured:
        return []
    return [
        f"## Per-layer map agreement, {title}",
        "",
        "At each student's last stage: KL(P_teacher ‖ A_student) for row-stochastic maps (nats per row), mean "
        "squared map difference for signed maps, attention-output MSE for attentions without a map.",
        "",
        *_layer_table(measured, [r["agreement"][which] for r in measured]),
    ]


def _stage1_section(rows: list[dict[str, Any]]) -> list[str]:
    measured = [r for r in rows if r["report"] is not None and any(v is not None for v in r["after_stage1"])]
    if not measured:
        return []
    tables = [
        [
            (layer, metric, v)
            for (layer, metric, _), v in zip(r["agreement"]["teacher_input"], r["after_stage1"], strict=True)
        ]
        for r in measured
    ]
    return [
        "## Per-layer map agreement after stage 1, on the teacher's hidden inputs (what stage 1 fits)",
        "",
        *_layer_table(measured, tables),
    ]


def _layer_table(
    rows: list[dict[str, Any]], tables: Sequence[list[tuple[int, str, float | None]]]
) -> list[str]:
    header = "| block | " + " | ".join(f"{r['name']} ({r['attention']})" for r in rows) + " |"
    lines = [header, "|---|" + "---|" * len(rows)]
    for i, (layer, *_) in enumerate(tables[0]):
        cells = [f"{value_text(t[i][2])} {t[i][1]}" if t[i][2] is not None else "—" for t in tables]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    means = []
    for t in tables:
        values = [v for *_, v in t if v is not None]
        means.append(value_text(sum(values) / len(values)) if values else "—")
    lines.append("| mean | " + " | ".join(means) + " |")
    return [*lines, ""]


def _speed_section(first: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    speed = first["speed"]
    floor = speed.get("floor_ms") is not None
    # the teacher contains its floor: a floor timed slower is timing noise, not a ceiling below the teacher
    ceiling = floor and speed["floor_over_teacher"] >= 1
    lines = [
        "## Speed (one measurement: the teacher and the floor timed once, in the same calls as every student)",
        "",
        f"Forward pass, batch {speed['batch']} of {speed['input']} ({speed['tokens']} tokens), {speed['device']} "
        f"({speed['threads']} thread{'s' if speed['threads'] != 1 else ''}, {speed['precision']}), median of "
        f"{speed['repeats']} interleaved repeats. The "
        "floor is the teacher whose attention projects but mixes no tokens: "
        + (
            "no attention is faster at this resolution"
            if ceiling or not floor
            else "timed slower than the teacher it is cut from, it gives no ceiling here: timing noise (a loaded "
            f"machine); {RERUN}"
        )
        + ". Break-even: the smallest side of each student's sweep (batch 1) where it beats the teacher.",
        "",
        "| model | ms | images/s | × teacher | of the floor | break-even (px) |",
        "|---|---|---|---|---|---|",
        f"| teacher (softmax) | {speed['teacher_ms']:.2f} | {speed['teacher_images_per_s']:.1f} | 1.00 | "
        f"{ratio_text(1 / speed['floor_over_teacher']) if floor else '—'} | |",
    ]
    if floor:
        lines.append(
            f"| floor{' (ceiling)' if ceiling else ''} | {speed['floor_ms']:.2f} | {speed['floor_images_per_s']:.1f} | "
            f"{speed['floor_over_teacher']:.2f} | 1.00 | |"
        )
    elif speed.get("floor_refused"):
        lines.insert(-3, f"No floor measured: {speed['floor_refused']}.\n")
    for row in rows:
        if row["report"] is None:
            continue
        s = row["speed"]
        if s.get("break_even_withheld"):
            break_even = "withheld (measurements disagree: see its report)"
        else:
            break_even = str(s["break_even"] or "—")
        lines.append(
            f"| {row['name']} ({row['attention']}) | {s['student_ms']:.2f} | {s['student_images_per_s']:.1f} | "
            f"{'withheld (measurements disagree: see its report)' if s.get('speedup_withheld') else range_text(s, 'speedup')} | "
            f"{ratio_text(s['student_over_floor'])} | {break_even} |"
        )
    return [*lines, ""]


def _sweep_section(rows: list[dict[str, Any]]) -> list[str]:
    """Each student's speed against the teacher at every side of the sweep: how the ranking moves with the
    token count."""
    sides = sorted({side for r in rows if r["report"] is not None for side in r["sweep"]}, key=int)
    if not sides:
        return []
    # the first student measured at each side: the side's token count and the floor's ratio (shared by all)
    measured = {
        side: next(
            (r["sweep"][side] for r in rows if isinstance(r.get("sweep", {}).get(side), (tuple, list))), None
        )
        for side in sides
    }
    head = " | ".join(f"{side} px ({(measured[side] or [None])[0] or '?'} tokens)" for side in sides)
    lines = [
        "## Speed against the teacher over the sweep (batch 1, × teacher)",
        "",
        f"| model | {head} |",
        "|---|" + "---|" * len(sides),
    ]
    floors = [ratio_text(measured[side][2]) if measured[side] else "—" for side in sides]
    lines.append("| floor (ceiling) | " + " | ".join(floors) + " |")
    for row in rows:
        if row["report"] is None:
            continue
        cells = []
        for side in sides:
            got = row["sweep"].get(side)
            cells.append(f"{got[1]:.2f}" if isinstance(got, (tuple, list)) else "not run" if got else "—")
        lines.append(f"| {row['name']} ({row['attention']}) | " + " | ".join(cells) + " |")
    notes = sorted({got for r in rows for got in r.get("sweep", {}).values() if isinstance(got, str)})
    return [*lines, "", *(f"- not run: {why}" for why in notes), *([""] if notes else [])]
