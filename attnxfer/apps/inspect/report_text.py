"""The text views of an inspection: ``report.md``, metrics.json's JSON and the demo's one sentence."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...analysis import Inspection, LayerComparison, TeacherLayer
from ...analysis.metrics import finite_mean


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def render_report(insp: Inspection, teacher: str, students: Mapping[str, str]) -> str:
    """The markdown view of an inspection: what was measured and how, the teacher's layers against the
    floor, then per student its layers against the teacher's and which heads correspond. ``teacher`` and
    ``students`` (name -> model) as the report names the models, markdown included."""
    s = insp.settings
    lines = [
        "# Attention inspection",
        "",
        f"- teacher: {teacher}",
        *[f"- student `{name}`: {model}" for name, model in students.items()],
        f"- {insp.images} images; tokens: {insp.tokens['prefix']} prefix + {'x'.join(map(str, insp.tokens['grid']))}"
        f" patches of {'x'.join(map(str, insp.tokens['patch']))} px",
        f"- floor: the teacher against itself on inputs with Gaussian noise (std {s['noise']}, normalised units) "
        f"on {insp.floor_images} images: divergences below it are as close as the teacher is to itself",
        f"- top-k overlap with k={s['topk']}; Spearman and head costs on up to {s['probe_rows']} query rows per "
        "image or window (the first and evenly spaced others)",
        "- rows: `global` layers see the whole image (attention distance and class-token maps there), "
        "windowed ones a batch of windows, class attention one row per prefix token; in the class-token "
        "pictures a layer marked `received` has no class token (the attention each patch receives), one "
        "marked with its windows has no whole-image map",
        "- hierarchical layers (windows, reduced keys, pooled queries): metrics over each layer's own keys, "
        "attention distance from where each row and key sits on the image (padding left out); "
        "`queries_*` pictures show where the centre and corner query of each layer look, stage by stage",
        *_teacher_table(insp.teacher),
    ]
    # one kind of note (a signed map's): one line for all the layers it is of
    if noted := [t for t in insp.teacher if t.note]:
        layers = ", ".join(str(t.layer) for t in noted)
        lines.append(f"- teacher layer{'s' * (len(noted) > 1)} {layers}: {noted[0].note}")
    for name, rows in insp.students.items():
        lines += [*_student_table(name, rows), *_head_correspondence(rows)]
        lines += [f"- layer {r.layer}: {r.note}" for r in rows if r.note]
    return "\n".join(lines) + "\n"


def number_text(v: float | None, digits: int = 3, kind: str = "f") -> str:
    """A table cell: fixed digits (``kind="g"``: significant ones), an em dash where there is no finite value
    (the inspect and study reports)."""
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}{kind}}"


#: the per-layer mean columns of each table, with their digits: divergences in significant ones (a good
#: student's JS and the floor are far below a thousandth), the rest fixed
_TEACHER_CELLS = (
    ("entropy", 3, "f"),
    ("distance", 1, "f"),
    ("floor_kl", 3, "g"),
    ("floor_js", 3, "g"),
    ("floor_topk", 2, "f"),
    ("floor_spearman", 2, "f"),
)
_STUDENT_CELLS = (
    ("kl", 3, "g"),
    ("js", 3, "g"),
    ("topk", 2, "f"),
    ("spearman", 2, "f"),
    ("cls_js", 3, "g"),
    ("cls_pearson", 2, "f"),
    ("entropy", 3, "f"),
    ("distance", 1, "f"),
)


def _teacher_table(layers: Sequence[TeacherLayer]) -> list[str]:
    lines = [
        "",
        "## Teacher",
        "",
        "| layer | attention | rows | heads | entropy | attention distance (px) | floor KL | floor JS | "
        "floor top-k | floor Spearman |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in layers:
        m = t.mean
        cells = [
            t.layer,
            f"`{t.name}`",
            t.partition,
            t.heads,
            *(number_text(m.get(k), d, kind) for k, d, kind in _TEACHER_CELLS),
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def _student_table(name: str, rows: Sequence[LayerComparison]) -> list[str]:
    lines = [
        "",
        f"## Student `{name}` against the teacher (means over heads)",
        "",
        "| layer | teacher layer | attention | KL | JS | top-k | Spearman | cls JS | cls Pearson | entropy | "
        "distance (px) | heads: matched / identity JS |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        m, a = r.mean, r.assignment
        heads = (
            f"{number_text(a['matched_cost'], 3, 'g')} / {number_text(a['identity_cost'], 3, 'g')}"
            + ("" if a.get("is_identity") else " (reordered)")
            if a
            else "—"
        )
        attn = r.attention + (f" (borrows {r.borrowed})" if r.borrowed else "")
        cells = [
            r.layer,
            r.teacher_layer,
            attn,
            *(number_text(m.get(k), d, kind) for k, d, kind in _STUDENT_CELLS),
            heads,
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def _head_correspondence(rows: Sequence[LayerComparison]) -> list[str]:
    lines = ["", "### Head correspondence (optimal assignment by JS; teacher head → student head)", ""]
    for r in rows:
        a = r.assignment
        if not a:
            continue
        pairs = ", ".join(f"{t}→{s_}" for t, s_ in a["pairs"])
        tracks = "; ".join(f"s{b}: t{', t'.join(map(str, ts))}" for b, ts in a["tracks"].items() if ts)
        extra = (
            f"; each student head tracks (nearest teacher heads) {tracks}"
            if r.heads != len(r.js_cost)
            else ""
        )
        lines.append(f"- layer {r.layer}: {'identity' if a['is_identity'] else pairs}{extra}")
    return lines


def agreement_sentence(insp: Inspection) -> str:
    """One sentence per student of what the per-layer curves show: mean JS against the noise floor, the
    closest and furthest layers, and attention distance against the teacher's. JS in three significant
    digits: a good student's and the floor itself are often below 0.0005."""
    floor = finite_mean([t.mean.get("floor_js", math.nan) for t in insp.teacher])
    t_dist = finite_mean([t.mean.get("distance", math.nan) for t in insp.teacher])
    parts = [
        f"Teacher vs itself on noisy inputs gives JS {floor:.3g} (the floor); mean attention distance {t_dist:.1f} px."
    ]
    for name, rows in insp.students.items():
        js = [(r.mean["js"], r.layer) for r in rows if math.isfinite(r.mean.get("js", math.nan))]
        if not js:
            continue
        mean_js = sum(v for v, _ in js) / len(js)
        best, worst = min(js), max(js)
        dist = finite_mean([r.mean.get("distance", math.nan) for r in rows])
        copied = sum(1 for r in rows if r.borrowed)
        if copied == len(rows):
            parts.append(
                f"{name}: every layer attends with the teacher's own maps (JS 0); distance {dist:.1f} px."
            )
            continue
        lead = f"{name}: {copied} layers attend with the teacher's maps (JS 0); " if copied else f"{name}: "
        ratio = ""
        if floor > 0:  # 12x, 3.4x, 0.52x: two significant digits below 10, so a ratio under 1 never reads 0x
            times = mean_js / floor
            ratio = f" ({times:.0f}x the floor)" if times >= 10 else f" ({times:.2g}x the floor)"
        parts.append(
            f"{lead}mean JS {mean_js:.3g}{ratio}, closest in layer {best[1]} ({best[0]:.3g}), furthest in "
            f"layer {worst[1]} ({worst[0]:.3g}); attention distance {dist:.1f} px."
        )
    return " ".join(parts)
