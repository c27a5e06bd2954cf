"""The text of a study's report (``study.md``) and the same as data (``study_report.json``), rendered from the
`StudentScore` rows `report.py` fills in."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...analysis import Inspection
from ...config import TrainConfig
from ...config.study_spec import Student
from ..inspect.report_text import agreement_sentence, number_text
from ..run.uncertainty import format_p, format_top1, mcnemar, top1_interval
from ..run.val_curves import Series


@dataclass
class StudentScore:
    """One student as the report shows it (``score`` names what was scored; None with ``unscored`` saying why)."""

    name: str
    overrides: dict[str, Any]
    folder: Path
    step: int | None
    stopped: str | None
    seconds: float | None
    config: TrainConfig | None = None
    checkpoint: str = ""  # which checkpoint and weights were scored
    checkpoint_step: int | None = None
    score: str | None = None
    correct: np.ndarray | None = None
    unscored: str = ""
    metric: str = "val_top1"  # the run's own validation metric (its curve)
    curve: Series = field(default_factory=lambda: ([], []))


def render_study(
    students: Sequence[StudentScore], insp: Inspection | None, shared: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(``study.md``'s text, ``study_report.json``'s data); the first student is what the others are
    compared with."""
    first = students[0]
    rows = [_row(s, first, insp) for s in students]
    lines = [
        f"# Study `{shared.get('study', '')}`: {len(students)} students from one teacher",
        "",
        _shared_line(shared),
        "",
        _scoring_line(first.name, shared, insp),
        "",
        "| student | changes | scored | top-1 (%) [95 % CI] | b / c vs first | McNemar p | "
        "attention JS to the teacher, per layer | s / step |",
        "|---|---|---|---:|---:|---:|---|---:|",
        *(_markdown_row(r) for r in rows),
        "",
        f"Validation curves: `study.png`.{' Attention per layer: `study_agreement.png`.' if insp else ''}",
    ]
    if insp is not None:
        lines += ["", *_layer_table(insp), "", agreement_sentence(insp)]
    data = {
        "shared": dict(shared),
        "first": first.name,
        "agreement": None if insp is None else {"images": insp.images, "topk": insp.settings.get("topk")},
        "students": rows,
    }
    return "\n".join(lines) + "\n", data


def _shared_line(shared: Mapping[str, Any]) -> str:
    teacher = f"teacher `{shared['teacher']}`" if shared.get("teacher") else "no teacher"
    steps, total = shared.get("steps"), shared.get("total_steps")
    if steps is None:
        taken = "n/a steps"
    elif total and steps != total:  # unfinished, or stopped: of how many
        taken = f"{steps} of {total} steps"
    else:
        taken = f"{steps} step{'s' * (steps != 1)}"
    per_step = _per_step(shared.get("shared_seconds"), shared.get("steps"))
    return (
        f"Shared by every student: {teacher}, data `{shared['dataset']}` (batch {shared.get('batch_size')}), "
        f"{taken}; one batch per step for all, so every student saw the same images in the same order. "
        f"Shared time per step (data loading and the teacher's pass): {per_step}{'' if per_step == 'n/a' else ' s'}."
    )


def _scoring_line(first: str, shared: Mapping[str, Any], insp: Inspection | None) -> str:
    if not shared["images"]:
        return "No student could be scored: each stopped early or has no checkpoint yet."
    knn = shared.get("knn") or {}
    agreement = (
        f" Attention: Jensen–Shannon divergence (nats; lower is closer) of each student's maps from the "
        f"teacher's, per layer, on the first {insp.images} validation images; `copied` marks a layer that "
        "attends with the teacher's own maps (attention copy), where the divergence is 0 by construction."
        if insp is not None
        else ""
    )
    return (
        f"Scored on the same {shared['images']} validation images: each student's best checkpoint by its own "
        "validation metric (EMA weights where its run kept them, `ema`; else its trained weights, `model`): "
        "top-1 with its 95 % Wilson interval; a student that trained no head (transfer.task_weight=0) gets "
        f"k-NN top-1 instead (k={knn.get('k')}, T={knn.get('temperature')}, memory bank: the training split). "
        f"Paired against the first student (`{first}`): b = images it gets right and this student wrong, c = the "
        "reverse; p = McNemar's exact two-sided test (under equal accuracy each of the b + c images is a fair "
        "coin). Students scored differently (top-1 against k-NN) are not paired. Time per step: the student's "
        "own share of the study's wall time (its forward, backward and optimiser step, its evaluations and "
        f"saves), the data and the teacher's pass it shares counted apart.{agreement}"
    )


def _row(s: StudentScore, first: StudentScore, insp: Inspection | None) -> dict[str, Any]:
    """What the report shows of one student, as data (the markdown row is rendered from it)."""
    layers = insp.students.get(s.name, []) if insp is not None else []
    row: dict[str, Any] = {
        "name": s.name,
        "changes": Student(s.name, s.overrides).describe(),
        "overrides": s.overrides,
        "folder": s.folder.name,  # in the study's folder
        "step": s.step,
        "stopped": s.stopped,
        "seconds": s.seconds,
        "seconds_per_step": _seconds_per_step(s.seconds, s.step),
        "checkpoint": s.checkpoint or None,
        "checkpoint_step": s.checkpoint_step,
        "score": s.score,
        "unscored": s.unscored or None,
        "curve": {"metric": s.metric, "steps": s.curve[0], "values": s.curve[1]},
        "layers": [
            {
                "layer": r.layer,
                "teacher_layer": r.teacher_layer,
                "copied": bool(r.borrowed),
                "js": r.mean.get("js"),
                "kl": r.mean.get("kl"),
                "topk": r.mean.get("topk"),
            }
            for r in layers
        ],
    }
    if s.correct is not None:
        n, right = len(s.correct), int(s.correct.sum())
        low, high = top1_interval(right, n)
        row |= {"correct": right, "images": n, "top1": 100.0 * right / n, "low": low, "high": high}
        row["top1_text"] = format_top1(right, n)
    row["vs_first"] = _paired(s, first)
    return row


def _paired(s: StudentScore, first: StudentScore) -> dict[str, Any] | str | None:
    """The McNemar counts and p against the first student, or why there are none (None: s is the first)."""
    if s is first:
        return None
    if s.correct is None:
        return "not scored"
    if first.correct is None:
        return "the first student was not scored"
    if s.score != first.score:
        return f"{s.score} vs {first.score}: not paired"
    t = mcnemar(first.correct, s.correct)
    return {"b": t.only_a, "c": t.only_b, "p": t.p_value}


def _markdown_row(r: Mapping[str, Any]) -> str:
    name, changes = _cell(r["name"]), _cell(r["changes"])
    if r["stopped"]:
        return f"| {name} | {changes} | stopped: {_cell(r['stopped'])} | — | — | — | — | — |"
    scored = _cell(r["checkpoint"] or r["unscored"] or "—")
    top1 = "—"
    if "top1_text" in r:
        top1 = ("k-NN " if r["score"] != "top-1" else "") + r["top1_text"]
    elif r["unscored"] and r["checkpoint"]:
        top1 = f"n/a ({_cell(r['unscored'])})"
    paired = r["vs_first"]
    if paired is None:
        bc, p = "—", "—"
    elif isinstance(paired, str):
        bc, p = f"n/a ({paired})", "—"
    else:
        bc, p = f"{paired['b']} / {paired['c']}", format_p(paired["p"])
    per_step = _per_step(r["seconds"], r["step"])
    return f"| {name} | {changes} | {scored} | {top1} | {bc} | {p} | {_agreement_cell(r['layers'])} | {per_step} |"


def _agreement_cell(layers: Sequence[Mapping[str, Any]]) -> str:
    if not layers:
        return "—"
    if all(layer["copied"] for layer in layers):
        return "copied: the teacher's own maps in every layer"
    return ", ".join("copied" if layer["copied"] else number_text(layer["js"], 3, "g") for layer in layers)


def _layer_table(insp: Inspection) -> list[str]:
    """Layers down, students across, beside the teacher's noise floor (itself on noisy inputs: what "close"
    means)."""
    names = list(insp.students)
    k = insp.settings.get("topk")
    by_layer = {n: {r.layer: r for r in rows} for n, rows in insp.students.items()}
    floors = {t.layer: t.mean.get("floor_js", math.nan) for t in insp.teacher}
    depth = max((max(rows, default=-1) for rows in by_layer.values()), default=-1) + 1
    lines = [
        "## Attention against the teacher, per layer",
        "",
        f"JS (nats; lower is closer) / top-{k} overlap (higher is closer) of each student layer with its teacher "
        "layer; floor: the teacher against itself on noisy inputs.",
        "",
        "| layer | floor JS | " + " | ".join(_cell(n) for n in names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for layer in range(depth):
        cells = []
        for n in names:
            r = by_layer[n].get(layer)
            if r is None:
                cells.append("—")
            elif r.borrowed:
                cells.append("copied")
            else:
                other = f" (t{r.teacher_layer})" if r.teacher_layer != r.layer else ""
                cells.append(
                    f"{number_text(r.mean.get('js'), 3, 'g')} / {number_text(r.mean.get('topk'), 2)}{other}"
                )
        lines.append(f"| {layer} | {number_text(floors.get(layer), 3, 'g')} | " + " | ".join(cells) + " |")
    return lines


def _seconds_per_step(seconds: Any, step: Any) -> float | None:
    if not isinstance(seconds, (int, float)) or not isinstance(step, int) or step <= 0:
        return None
    return float(seconds) / step


def _per_step(seconds: Any, step: Any) -> str:
    v = _seconds_per_step(seconds, step)
    return "n/a" if v is None else f"{v:.3g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
