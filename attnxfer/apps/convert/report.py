"""Markdown views of what the apps measured (conversion reports)."""

from __future__ import annotations

import math
from typing import Any

from ...transfer.selection import SOFTMAX, InfeasibleBudget, beside, fastest, select, short_of_budget
from ..run.uncertainty import correct_count, top1_interval

#: what a conversion says where a teacher accuracy would stand, for a teacher without a classifier (MAE)
HEADLESS_TEACHER = (
    "the teacher has no classifier head of the data's classes (e.g. an MAE encoder, CLIP's projection), so it "
    "has no top-1 to compare with"
)
#: ... and for data read without labels
NO_LABELS = "the data has no labels (data.labels=false), so there is no top-1"
#: what a timing its own rounds (or the floor) contradict asks for
RERUN = "rerun on an idle machine, or with more rounds (convert.speed_repeats)"

#: the measured stages of a conversion, as the report's tables name them
STAGE_ROWS = (
    ("before_stage1", "student, weights swapped in"),
    ("after_stage1", "student after stage 1"),
    ("after_stage2", "student after stage 2"),
)


def value_text(v: Any, digits: int = 4) -> str:
    """Floats to ``digits`` significant digits, a dash for none."""
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def ratio_text(v: float | None) -> str:
    """Two decimals (a ratio, a top-1 in %); a dash for none."""
    return "—" if v is None else f"{v:.2f}"


def range_text(row: dict[str, Any], key: str) -> str:
    """A ratio and, where kept, its [min, max] over the rounds: ``1.67 [1.52, 1.80]``."""
    span = row.get(f"{key}_range")
    value = ratio_text(row.get(key))
    return f"{value} [{span[0]:.2f}, {span[1]:.2f}]" if span and row.get(key) is not None else value


def top1_interval_text(top1: float | None, n: int | None) -> str:
    """``[lo, hi]``: the 95 % Wilson interval of a top-1 (%) on ``n`` images; a dash without either."""
    if top1 is None or not n:
        return "—"
    lo, hi = top1_interval(correct_count(top1, n), n)
    return f"[{lo:.1f}, {hi:.1f}]"


def teacher_near_chance(top1: float | None, classes: int) -> str | None:
    """A warning where the teacher's top-1 is under twice chance: the students learn what it shows, so such a
    teacher is one trained on other data (a generated task's other seed, other normalisation, other labels)."""
    if top1 is None or not classes or top1 >= 200.0 / classes:
        return None
    return (
        f"the teacher scores {top1:.2f} % on this run's val data, under twice chance ({100.0 / classes:.1f} % of "
        f"{classes} classes), and its students learn from what it shows: check that data.* is the data it was "
        "trained on (a generated task draws its images from its seed: recall's glyphs follow data.seed, else seed)"
    )


def final_stage(report: dict[str, Any]) -> str | None:
    """The key of the last stage measured (None in a report without per-stage features)."""
    features = report.get("features") or {}
    return next((s for s, _ in reversed(STAGE_ROWS) if features.get(s)), None)


def _label_free_summary(report: dict[str, Any]) -> str:
    stage = final_stage(report)
    if stage is None:
        return "student top-1 n/a"
    parts = []
    knn = (report.get("knn") or {}).get(stage) or {}
    if "knn_top1" in knn:
        share = (
            f", {100 * knn['knn_share']:.1f}% of the teacher's" if knn.get("knn_share") is not None else ""
        )
        parts.append(
            f"student k-NN top-1 {knn['knn_top1']:.2f} (teacher {knn['knn_teacher_top1']:.2f}{share})"
        )
    cos = report["features"][stage].get("feat_cos_patch")
    if cos is not None:
        parts.append(f"final-feature cosine with the teacher {cos:.4f} (patch tokens)")
    return ", ".join(parts) or "student top-1 n/a"


def conversion_summary(report: dict[str, Any]) -> str:
    """``attnxfer convert``'s last line: the student's top-1 against the teacher's, or its label-free quality."""
    teacher, student = report["top1"]["teacher"], report["student_top1"]
    student_text = "n/a" if student is None else f"{student:.2f}"
    if student is None and report.get("features"):
        accuracy = _label_free_summary(report)
    elif teacher is None:
        accuracy = f"student top-1 {student_text} ({HEADLESS_TEACHER})"
    elif report.get("recovered_pct") is None:
        accuracy = f"teacher top-1 {teacher:.2f}, student top-1 {student_text}"
    else:
        accuracy = (
            f"teacher top-1 {teacher:.2f}, student top-1 {student_text} "
            f"({report['recovered_pct']:.2f}% of the teacher's)"
        )
    speed = report["speed"]
    shown = "withheld (see the report)" if speed.get("speedup_withheld") else f"{speed['speedup']:.2f}x"
    return f"done: {accuracy}, speed {shown} -> {report['run_dir']}/report.md"


def render_conversion_report(report: dict[str, Any]) -> str:
    """The markdown view of a conversion's ``report.json``."""
    lines = [
        *_summary_section(report),
        *_top1_section(report),
        *_knn_section(report),
        *_features_section(report),
        *_agreement_section(report, "teacher_input", "teacher's hidden inputs (what stage 1 fits)"),
        *_agreement_section(report, "end_to_end", "end to end (each model on its own hidden states)"),
        *_speed_section(report["speed"]),
        *_selection_section(report.get("selection")),
    ]
    if report.get("operations"):
        lines += _operations_section(report["operations"])
    # what stage 2 compared, as its run printed it (the mode's layers and loss, transfer.losses' entries)
    if report["stage2"].get("plan"):
        lines += ["## Stage 2's transfer plan", "", "```text", report["stage2"]["plan"], "```", ""]
    return "\n".join(lines)


def _summary_section(report: dict[str, Any]) -> list[str]:
    names = report["student"]["attention"]
    what = names[0] if len(set(names)) == 1 else "per-layer " + ", ".join(names)
    stage1, stage2, classes = report["stage1"], report["stage2"], report["student"].get("num_classes")
    # reports written before stage 1 was judged lack its field
    worse = [w["message"] for w in (report.get("stage1_worse"), report.get("stage2_worse")) if w]
    return [
        f"# Conversion report: softmax teacher -> {what}",
        "",
        f"- teacher: `{report['teacher']['spec']}`" + _teacher_size(report["teacher"].get("record") or {}),
        f"- data: {report['data']['dataset']} (val {report['data']['val_size']} images; map agreement on "
        f"{report['data']['agreement_images']})",
        "- stage 1: "
        + (
            "skipped"
            if stage1["skipped"]
            else f"{stage1['steps']} steps, lr {stage1['lr']:g}, batch {stage1['batch_size']}, trains "
            f"{stage1['train']} ({stage1['seconds']:.0f} s)"
        ),
        f"- stage 2: {stage2['steps']} steps ({stage2.get('seconds', 0):.0f} s)"
        + (f", {stage2['objective']}" if stage2.get("objective") else "")
        + (f"; its student measured at {stage2['measured']}" if stage2.get("measured") else ""),
        *(
            []
            if classes is None
            else [
                f"- student: a {classes}-class classifier"
                if classes
                else "- student: a headless encoder (num_classes=0; its final features are the output)"
            ]
        ),
        *([f"- stopped early (in a convert study): {report['stopped']}"] if report.get("stopped") else []),
        *(line for w in worse for line in ("", f"**Warning: {w[0].upper()}{w[1:]}.**")),
        "",
    ]


def _teacher_size(record: dict[str, Any]) -> str:
    """Where the teacher runs at another size than its weights were made for: both, and how it was rebuilt."""
    native, run = record.get("source_img_size"), (record.get("input_size") or [None])[-1]
    if not native or run is None or tuple(native) == (run, run):
        return ""
    how = record.get("resized_by") or "rebuilt at that size"
    return f", made for {'x'.join(map(str, native))} px, run at {run} px ({how})"


def _top1_section(report: dict[str, Any]) -> list[str]:
    """Top-1 of the teacher and of the student at each stage, or why there is none."""
    top1, head = report["top1"], ["## Top-1 (validation)", ""]
    if report["data"].get("labels") is False:
        return [*head, f"None: {NO_LABELS}.", ""]
    if report["student"].get("num_classes") == 0:
        return [
            *head,
            "None: the student is a headless encoder (no classifier head); see k-NN top-1 and final-feature "
            "agreement.",
            "",
        ]
    teacher = top1["teacher"]
    n_val = report["data"].get("val_size")
    lines = [
        *head,
        f"95 % intervals: Wilson, on {n_val or '?'} validation images.",
        "",
        "| model | top-1 (%) | 95 % interval | of teacher's |",
        "|---|---|---|---|",
    ]
    for key, label in (("teacher", "teacher (softmax)"), *STAGE_ROWS):
        v = top1.get(key)
        share = f"{100 * v / teacher:.1f}%" if v is not None and teacher else "—"
        shown = "none (no classifier head)" if key == "teacher" and v is None else value_text(v)
        lines.append(f"| {label} | {shown} | {top1_interval_text(v, n_val)} | {share} |")
    if teacher is None:
        return [*lines, "", f"Recovered: not defined: {HEADLESS_TEACHER}.", ""]
    return [
        *lines,
        "",
        f"Recovered: **{value_text(report['recovered_pct'])}%** of the teacher's top-1.",
        "",
    ]


def _knn_section(report: dict[str, Any]) -> list[str]:
    stages = report.get("knn") or {}
    first = next((v for v in stages.values() if v), None)
    if not first or "knn_top1" not in first:
        return []
    lines = [
        "## k-NN top-1 (validation, no head needed)",
        "",
        f"Weighted k-NN on the pooled embeddings (k = {first['knn_k']}, temperature {first['knn_temperature']:g}, "
        f"cosine), memory bank {first.get('knn_bank', '?')} training images, {first['knn_count']} validation "
        "images; 95 % intervals: Wilson, and for the share a paired bootstrap.",
        "",
        "| model | k-NN top-1 (%) | 95 % interval | of teacher's | 95 % interval |",
        "|---|---|---|---|---|",
        f"| teacher (softmax) | {ratio_text(first['knn_teacher_top1'])} | "
        f"[{first['knn_teacher_top1_low']:.1f}, {first['knn_teacher_top1_high']:.1f}] | | |",
    ]
    for key, label in STAGE_ROWS:
        v = stages.get(key)
        if not v:
            lines.append(f"| {label} | — | — | — | — |")
            continue
        share, band = "—", "—"
        if v.get("knn_share") is not None:
            share = f"{100 * v['knn_share']:.1f}%"
            band = f"[{100 * v['knn_share_low']:.1f}, {100 * v['knn_share_high']:.1f}]"
        lines.append(
            f"| {label} | {ratio_text(v['knn_top1'])} | [{v['knn_top1_low']:.1f}, {v['knn_top1_high']:.1f}] | "
            f"{share} | {band} |"
        )
    return [*lines, ""]


def _features_section(report: dict[str, Any]) -> list[str]:
    stages = report.get("features")
    if not stages:
        return []
    lines = [
        "## Final-feature agreement with the teacher (validation, no labels read)",
        "",
        "The final tokens (forward_features, after the final norm): mean cosine of each student token with "
        "its teacher token, and relative error ||S - T|| / ||T|| over all of the group's tokens.",
        "",
        "| model | prefix cosine | prefix rel. error | patch cosine | patch rel. error |",
        "|---|---|---|---|---|",
    ]
    for key, label in STAGE_ROWS:
        v = stages.get(key) or {}
        lines.append(
            f"| {label} | {value_text(v.get('feat_cos_prefix'))} | {value_text(v.get('feat_rel_err_prefix'))} | "
            f"{value_text(v.get('feat_cos_patch'))} | {value_text(v.get('feat_rel_err_patch'))} |"
        )
    return [*lines, ""]


def _agreement_section(report: dict[str, Any], which: str, title: str) -> list[str]:
    lines = [
        f"## Per-layer map agreement, {title}",
        "",
        "KL(P_teacher ‖ A_student) for row-stochastic maps (nats per row), mean squared map difference "
        "for signed maps, attention-output MSE for attentions without a map.",
        "",
        "| block | attention | metric | before stage 1 | after stage 1 | after stage 2 |",
        "|---|---|---|---|---|---|",
    ]
    floors = []
    for row in report["agreement"][which]:
        lines.append(
            f"| {row['layer']} | {row['attention']} | {row['metric']} | {value_text(row['before_stage1'])} | "
            f"{value_text(row['after_stage1'])} | {value_text(row['after_stage2'])} |"
        )
        # a student map with zeros where the teacher attends (outside a window): a KL no training lowers
        stage = next((s for s, _ in reversed(STAGE_ROWS) if row.get(f"kl_floor_{s}") is not None), None)
        if stage and (floor := row[f"kl_floor_{stage}"]) > 0.01:
            floors.append(
                f"Block {row['layer']} ({row['attention']}): its map is 0 on keys the teacher attends to (outside "
                "its window, say), each counted at log(p / fp32's smallest number): with those zeros its KL cannot "
                f"fall below {floor:.4g}, and {max(0.0, row[stage] - floor):.3g} of it "
                f"{stage.replace('_stage', ' stage ')} is what fitting the rest can lower."
            )
    return [*lines, *(["", *floors] if floors else []), ""]


def _speed_section(speed: dict[str, Any]) -> list[str]:
    """Teacher, student and their floor at the run's resolution, then the break-even sweep."""
    precision = f", {speed['precision']}" if speed.get("precision") else ""
    lines = [
        "## Speed",
        "",
        f"Forward pass, batch {speed['batch']} of {speed['input']} ({speed['tokens']} tokens), {speed['device']}"
        f" ({speed['threads']} thread{'s' if speed['threads'] != 1 else ''}{precision}), median of "
        f"{speed['repeats']} interleaved repeats: "
        f"student {speed['student_ms']:.2f} ms, teacher {speed['teacher_ms']:.2f} ms: {_speedup_claim(speed)}",
        "",
    ]
    if "student_images_per_s" not in speed:  # reports written before images/s was measured lack it
        return lines
    floor, cpu = "floor_images_per_s" in speed, "student_over_teacher_cpu" in speed
    lines += [
        "| model | ms | images/s | × teacher | of the floor |" + (" × teacher (CPU time) |" if cpu else ""),
        "|---|---|---|---|---|" + ("---|" if cpu else ""),
    ]
    over_floor = speed.get("floor_over_teacher")
    # (label, key prefix, × teacher, of the floor, × teacher in CPU time)
    rows = [("teacher (softmax)", "teacher", 1.0, 1.0 / over_floor if floor else None, 1.0 if cpu else None)]
    if floor:
        rows.append(("floor (ceiling)", "floor", over_floor, 1.0, speed.get("floor_over_teacher_cpu")))
    over = range_text(speed, "student_over_teacher") if "student_over_teacher" in speed else speed["speedup"]
    rows.append(
        ("student", "student", over, speed.get("student_over_floor"), speed.get("student_over_teacher_cpu"))
    )
    for label, name, over_teacher, of_floor, cpu_ratio in rows:
        shown = over_teacher if isinstance(over_teacher, str) else f"{over_teacher:.2f}"
        cells = f"| {label} | {speed[f'{name}_ms']:.2f} | {speed[f'{name}_images_per_s']:.1f} | {shown} | "
        cells += f"{ratio_text(of_floor)} |" + (f" {ratio_text(cpu_ratio)} |" if cpu else "")
        lines.append(cells)
    lines.append("")
    if floor:
        # the teacher contains its floor: a floor timed slower is timing noise, not a ceiling below the teacher
        of_floor = speed["student_over_floor"]
        claim = (
            f"so it is the ceiling ({over_floor:.2f}x the teacher), and the student reaches **{of_floor:.2f}** of it."
            if over_floor >= 1 and round(of_floor, 2) <= 1
            else f"so it is the ceiling ({over_floor:.2f}x the teacher), but the student, timed at {of_floor:.2f} of "
            f"it, beat a model it contains: timing noise (a loaded machine); {RERUN}."
            if over_floor >= 1
            else f"but timed here at {over_floor:.2f}x the teacher, slower than the teacher it is cut from, it "
            f"gives no ceiling: timing noise (a loaded machine); {RERUN}."
        )
        lines += [
            f"The floor is the teacher whose attention computes its projections but mixes no tokens (out = "
            f"proj(v)): no attention with these projections can be faster at this resolution, {claim}",
            "",
        ]
    elif speed.get("floor_refused"):
        lines += [f"No floor measured: {speed['floor_refused']}.", ""]
    return [*lines, *_sweep_lines(speed)]


def _speedup_claim(speed: dict[str, Any]) -> str:
    if speed.get("speedup_withheld"):
        return f"no speed-up is claimed: {speed['speedup_withheld']}."
    span = speed.get("speedup_range")
    spread = f" (each round: {span[0]:.2f}x to {span[1]:.2f}x)" if span else ""
    return f"the student runs at **{speed['speedup']:.2f}x** the teacher's speed{spread}."


def _selection_section(selection: dict[str, Any] | None) -> list[str]:
    """``convert.attention=auto``'s choice: budget, predicted and measured speedup, the times it was made from,
    and per block the attention, each candidate's sensitivity and why."""
    if not selection:
        return []
    names, metric, ms = selection["candidates"], selection["metric"], selection["ms"]
    measured = f"measured **{beside(selection['measured_speedup'], selection['speedup'])}**"
    span = selection.get("measured_speedup_range")  # absent from choices made before it was recorded
    if span:
        measured += f" (each round: {span[0]:.2f}x to {span[1]:.2f}x)"
    # in process CPU time too (CPU runs), which other programs on a shared machine distort less than wall-clock
    cpu = selection.get("measured_speedup_cpu")
    if cpu:
        measured += f" ({beside(cpu, selection['speedup'])} in CPU time)"
    if selection.get("measured_speedup_withheld"):
        measured = f"no measured speed-up is claimed ({selection['measured_speedup_withheld']})"
    elif selection["measured_speedup"] < selection["speedup"]:
        measured += f", **short of the budget** ({short_of_budget(selection['attention'])})"
    whole = selection.get("whole_ms")  # absent from choices made when one block was timed alone
    floor = f", its floor {whole['floor']:.3g}" if whole else ""
    in_place = " in place ((all-blocks model - floor) / blocks):" if whole else ":"
    # a model timed under its floor (which it contains: a loaded machine) has its block time clamped to 0
    under = [n for n in ["teacher", *names] if whole and n in whole and whole[n] < whole["floor"]]
    noise = " (0: its model timed under the floor, within timing noise)"

    def block(name: str, model: str) -> str:
        return f"{name} {ms[name]:.3g}" + (noise if model in under else "")

    unfitted = selection.get("unfitted")  # absent from choices made before it was recorded
    none_for = f" ({', '.join(unfitted)}: none, nothing to fit in them)" if unfitted else ""
    lines = [
        "## Attention per block (convert.attention=auto)",
        "",
        f"Budget **{selection['speedup']:g}x** the teacher at {selection['tokens']:,} tokens: predicted "
        f"**{beside(selection['predicted_speedup'], selection['speedup'])}**, {measured} (fastest student of "
        f"these candidates: {beside(selection['fastest']['speedup'], selection['speedup'])}, "
        f"all blocks {selection['fastest']['attention']}).",
        "",
        f"Times (ms, batch {selection['batch']}, {selection['device']}, {selection['precision']}): teacher "
        f"{ms['teacher']:.3g}{floor}, one block's attention{in_place} {block('softmax', 'teacher')}, "
        + ", ".join(block(n, n) for n in names)
        + f". Sensitivity: {metric} of the teacher with only that block swapped to the candidate after "
        f"{selection['fit_steps']} stage-1 steps{none_for} (lower: the block can lose softmax)."
        + "".join(
            f" {n}: none, its fit diverged ({why})." for n, why in (selection.get("failed") or {}).items()
        ),
        "",
        "| block | attention | " + " | ".join(names) + " | why |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for i, (name, row, why) in enumerate(
        zip(selection["attention"], selection["sensitivity"], selection["reasons"])
    ):
        cells = " | ".join(value_text(row.get(n), 3) for n in names)
        lines.append(f"| {i} | **{name}** | {cells} | {why} |")
    return [*lines, "", *_other_budgets(selection)]


#: the budgets `_other_budgets` tries beside the run's own, up to the fastest student's speedup
OTHER_BUDGETS = (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)


def _other_budgets(selection: dict[str, Any]) -> list[str]:
    """What the knapsack chooses from the same timings and sensitivities at other budgets: a budget is read
    when the run starts and cannot change on resume, and a new run measures everything again, so the trade
    is shown before anyone pays for it."""
    ms, rows = selection["ms"], selection["sensitivity"]
    if SOFTMAX not in ms:  # a choice recorded before softmax's block time was
        return []
    # as the run chose: a candidate whose fit diverged in a block (None there) is never chosen in that block,
    # and may be in the others
    times = {n: ms[n] for n in selection["candidates"]}
    sensitivity = [{n: math.inf if row.get(n) is None else row[n] for n in times} for row in rows]
    soft, whole = ms[SOFTMAX], ms["teacher"]
    top = fastest(sensitivity, times, soft, whole)
    table = [
        "### The same measurements at other budgets",
        "",
        "What `convert.speedup` would choose from these timings and sensitivities (a new run measures again: "
        "the budget cannot change when a run resumes).",
        "",
        f"| budget | predicted | summed {selection['metric']} | attention per block |",
        "|---|---|---|---|",
    ]
    for budget in sorted({*(b for b in OTHER_BUDGETS if b < top.speedup), selection["speedup"]}):
        try:
            chosen = select(sensitivity, times, soft, whole, budget)
        except InfeasibleBudget:  # the run's own budget, short of the fastest student (the run was refused)
            continue
        mark = "**" if budget == selection["speedup"] else ""
        table.append(
            f"| {mark}{budget:g}x{mark} | {beside(chosen.speedup, budget)} | {chosen.sensitivity:.3g} | "
            f"{_blocks_text(chosen.names)} |"
        )
    table.append(f"| fastest | {top.speedup:.2f}x | {top.sensitivity:.3g} | {_blocks_text(top.names)} |")
    return [*table, ""]


def _blocks_text(names: list[str]) -> str:
    """``softmax 0, 5-6; relu_linear 1-4``: the blocks of each attention, as runs of consecutive blocks."""
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        blocks.setdefault(name, []).append(i)
    parts = []
    for name, indices in blocks.items():
        spans, start = [], indices[0]
        for previous, i in zip(indices, [*indices[1:], None]):
            if i != previous + 1:
                spans.append(f"{start}" if start == previous else f"{start}-{previous}")
                start = i
        parts.append(f"{name} {', '.join(spans)}")
    return "; ".join(parts)


def _sweep_lines(speed: dict[str, Any]) -> list[str]:
    """The break-even sweep: teacher, student (and floor) at batch 1 at each side, and the break-even side."""
    sweep = speed.get("sweep")
    if sweep is None:  # reports written before the sweep was measured
        return []
    if sweep.get("off"):
        return ["### Break-even resolution", "", f"Not measured: {sweep['off']}.", ""]
    rows = sweep["rows"]
    floor = any("floor_ms" in row for row in rows)
    lines = [
        "### Break-even resolution",
        "",
        "Teacher and student rebuilt at each side with random weights (speed does not depend on them), batch 1, "
        "on the run's device, median of interleaved repeats ([min, max] over the rounds in brackets).",
        "",
        "| side (px) | tokens | teacher ms | student ms | student × teacher |"
        + (" floor × teacher | student of the floor |" if floor else ""),
        "|---|---|---|---|---|" + ("---|---|" if floor else ""),
    ]
    for row in rows:
        line = (
            f"| {row['resolution']} | {row['tokens'] if row['tokens'] is not None else '—'} | "
            f"{row['teacher_ms']:.2f} | {row['student_ms']:.2f} | {range_text(row, 'student_over_teacher')} |"
        )
        if floor:
            line += f" {ratio_text(row.get('floor_over_teacher'))} | {ratio_text(row.get('student_over_floor'))} |"
        lines.append(line)
    lines.append("")
    # a student contains its floor: one timed faster is timing noise, not a figure to read
    noise = [row for row in rows if round(row.get("student_over_floor") or 0, 2) > 1]
    lines += [
        f"- {row['resolution']} px: the student timed at {row['student_over_floor']:.2f} of its floor, faster than "
        f"a model it contains: timing noise (a loaded machine); {RERUN}."
        for row in noise
    ]
    lines += [f"- {item['resolution']} px skipped: {item['reason']}" for item in sweep.get("skipped", [])]
    top = max((row["resolution"] for row in rows), default=None)
    if speed.get("break_even_withheld"):
        verdict = f"Break-even: withheld: {speed['break_even_withheld']}."
    elif speed.get("break_even") is not None:
        verdict = (
            f"Break-even: **{speed['break_even']} px**, the smallest tested side where the student is faster."
        )
    elif top is None:
        verdict = "Break-even: no side was measured."
    else:
        verdict = f"Break-even: none found; the student is not faster than the teacher up to {top} px."
    return [*lines, *([""] if sweep.get("skipped") or noise else []), verdict, ""]


def _count(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:.3f} M"


def _operations_section(ops: dict[str, Any]) -> list[str]:
    """Multiplications / additions per attention core (EcoFormer's energy measure) beside the speed."""
    lines = [
        "## Operations per attention core",
        "",
        f"One image ({ops['tokens']} tokens), counted from each attention's algorithm (qkv and output "
        "projections left out; a product with ±1 codes costs additions only). Energy: 45 nm fp32 "
        "(multiply 3.7 pJ, add 0.9 pJ).",
        "",
        "| block | attention | student #mul | student #add | teacher #mul | teacher #add |",
        "|---|---|---|---|---|---|",
    ]
    for row in ops["layers"]:
        s, t = row["student"] or {}, row["teacher"] or {}
        lines.append(
            f"| {row['layer']} | {row['attention']} | {_count(s.get('mul'))} | {_count(s.get('add'))} | "
            f"{_count(t.get('mul'))} | {_count(t.get('add'))} |"
        )
    if any(None in (row["student"], row["teacher"]) for row in ops["layers"]):
        lines += ["", "—: not counted: the attention defines no `operation_counts` (so no totals either)."]
    s, t = ops["total"]["student"], ops["total"]["teacher"]
    if s and t:
        lines += [
            f"| all | | {_count(s['mul'])} | {_count(s['add'])} | {_count(t['mul'])} | {_count(t['add'])} |",
            "",
            f"Estimated energy: student {s['energy_pj'] / 1e6:.3f} µJ, teacher {t['energy_pj'] / 1e6:.3f} µJ "
            f"({s['energy_pj'] / t['energy_pj']:.2f}x the teacher's).",
        ]
    return [*lines, ""]
