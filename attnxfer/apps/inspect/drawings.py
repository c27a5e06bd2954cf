"""The pictures of an `attnxfer inspect` report: class-token maps per layer and head, head matching, where
queries of windowed or reduced layers look, attention rollout, and the per-layer curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ...analysis import (
    InspectedStudent,
    Inspection,
    LayerComparison,
    LayerGeometry,
    LayerSignals,
    borrowed_signals,
    has_rollout,
    layer_qk,
    rollout_class_maps,
    token_maps,
)
from ...analysis.pictures import (
    class_token_figure,
    curves_figure,
    display_image,
    head_matching_figure,
    rollout_figure,
    save_figure,
)
from ...analysis.positions import RowPositions, query_maps, query_points, row_positions
from ...models.attention import attention_stages


def draw_pictures(
    out: Path,
    insp: Inspection,
    teacher: nn.Module,
    students: Mapping[str, InspectedStudent],
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[Path]:
    """Every picture of the report for ``images`` under ``out``; returns the files written, in order."""
    canvas = _Canvas(out, images, mean, std)
    t = _view(teacher, images)
    rollouts = (
        {"teacher": rollout_class_maps(teacher, images, qk=t.qk)}
        if has_rollout(teacher, images, t.qk)
        else {}
    )
    stages = attention_stages(teacher)
    t_pos = row_positions(teacher, images)
    # teacher layers with positions, in runs over one query grid (a stage of a hierarchical model whose rows
    # have positions): the query pictures' ``stageK``
    grid_runs: list[list[int]] = []
    for j, pos in enumerate(t_pos):
        if pos is None:
            continue
        if not grid_runs or t_pos[grid_runs[-1][-1]].grid != pos.grid:
            grid_runs.append([])
        grid_runs[-1].append(j)
    for name, subject in students.items():
        s = _view(subject.model, images, borrowed_signals(subject.borrow, t.qk))
        if rollouts and has_rollout(subject.model, images, s.qk):
            rollouts[name] = rollout_class_maps(subject.model, images, qk=s.qk)
        if grid_runs:
            pairs = {r.teacher_layer: r.layer for r in insp.students[name]}
            s_pos = row_positions(subject.model, images)
            _query_pictures(canvas, name, grid_runs, t.qk, t_pos, s.qk, s_pos, pairs)
        for stage, layers in stages:
            _stage_pictures(
                canvas, name, stage, layers if len(stages) > 1 else None, t, s, insp.students[name]
            )
    for b in range(canvas.count if rollouts else 0):
        canvas.save(
            rollout_figure(canvas.image(b), {k: v[b] for k, v in rollouts.items()}), f"rollout_img{b}.png"
        )
    canvas.save(curves_figure(insp), "curves.png")
    return canvas.written


def slug(name: str) -> str:
    """``name`` as a piece of a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class _Canvas:
    """Where the pictures go: the folder, the images drawn under the maps, the files written so far."""

    def __init__(self, out: Path, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
        self.out, self.images, self.mean, self.std = out, images, mean, std
        self.written: list[Path] = []

    @property
    def count(self) -> int:
        return self.images.shape[0]

    def image(self, b: int):
        return display_image(self.images[b], self.mean, self.std)

    def save(self, fig, name: str) -> None:
        path = self.out / name
        save_figure(fig, path)
        self.written.append(path)


@dataclass
class _ModelView:
    """One model on the picture images: what each layer attended with, its map over the patch grid (None
    where it has no whole-image map) and where its rows sit."""

    qk: list[LayerSignals]
    maps: list[torch.Tensor | None]
    geometries: list[LayerGeometry]


def _view(model: nn.Module, x: torch.Tensor, borrow: Mapping | None = None) -> _ModelView:
    qk = layer_qk(model, x, borrow)
    maps, geometries = token_maps(model, x, qk=qk)
    return _ModelView(qk, maps, geometries)


def _stage_pictures(
    canvas: _Canvas,
    name: str,
    stage: str,
    layers: list[int] | None,
    t: _ModelView,
    s: _ModelView,
    rows: Sequence[LayerComparison],
) -> None:
    """A stage's class-token maps per image and its head matching, for student ``name``. ``layers`` None:
    the teacher's one stage, every layer of either model (depths may differ), no stage in the file names."""
    label = stage or "blocks"  # a flat model's one stage is ""
    suffix = f"_{slug(label)}" if layers is not None else ""
    # (teacher layer, student layer, label) per column: a flat student of another depth, each of its layers
    # beside the teacher layer it is compared with; else layer j of both
    if layers is None and any(r.layer != r.teacher_layer for r in rows):
        columns = [(r.teacher_layer, r.layer, f"L{r.layer} (t{r.teacher_layer})") for r in rows]
    else:
        layers = layers if layers is not None else list(range(max(len(t.maps), len(s.maps))))
        columns = [(j, j, f"L{j}") for j in layers]
    # class-token maps where a layer of this stage has a whole-image map (the query pictures show the others:
    # windows, reduced keys)
    mapped = lambda maps, j: j < len(maps) and maps[j] is not None
    if any(mapped(t.maps, tj) or mapped(s.maps, sj) for tj, sj, _ in columns):
        where = f"{label}, " if label != "blocks" else ""
        for b in range(canvas.count):
            fig = class_token_figure(
                canvas.image(b),
                [t.maps[tj][b] if mapped(t.maps, tj) else None for tj, _, _ in columns],
                [s.maps[sj][b] if mapped(s.maps, sj) else None for _, sj, _ in columns],
                names=("teacher", name),
                title=f"class-token attention, {where}image {b}: teacher heads (t) | {name} heads (s)",
                layer_labels=[said for *_, said in columns],
                notes=[
                    t.geometries[tj].class_map_note if tj < len(t.geometries) else "" for tj, _, _ in columns
                ],
            )
            canvas.save(fig, f"cls_maps_{slug(name)}{suffix}_img{b}.png")
    rows = [r for r in rows if r.teacher_layer in {tj for tj, _, _ in columns}]
    if any(r.js_cost for r in rows):
        title = f"head matching, {name}" + (f", {label}" if suffix else "")
        canvas.save(head_matching_figure(rows, title=title), f"heads_{slug(name)}{suffix}.png")


def _query_pictures(
    canvas: _Canvas,
    name: str,
    grid_runs: list[list[int]],
    t_qk: Sequence[LayerSignals],
    t_pos: Sequence[RowPositions | None],
    s_qk: Sequence[LayerSignals],
    s_pos: Sequence[RowPositions | None],
    pairs: Mapping[int, int],
) -> None:
    """Per stage (``grid_runs``) and image: where the centre and corner query (ringed) of each layer look,
    teacher heads beside those of its student layer (``pairs``), over the image at the layer's key grid (0
    outside the query's window; empty where a model's maps cannot be drawn)."""
    n = canvas.count
    for k, layers in enumerate(grid_runs):
        rows = []  # (label, mark, teacher maps, student maps) per (layer, query point)
        for j in layers:
            pos, i = t_pos[j], pairs.get(j)
            points = query_points(pos.grid)
            teacher = query_maps(t_qk[j], pos, n, points) if pos.matches(t_qk[j], n) else {}
            at = s_pos[i] if i is not None and i < len(s_pos) else None
            student = {}
            if at is not None and at.matches(s_qk[i], n) and at.grid == pos.grid:
                student = query_maps(s_qk[i], at, n, points)
            for point, cell in points.items():
                r, c = divmod(cell, pos.grid[1])
                mark = ((r + 0.5) / pos.grid[0], (c + 0.5) / pos.grid[1])
                rows.append((f"L{j} {point[:3]}", mark, teacher.get(point), student.get(point)))
        grid = "x".join(map(str, t_pos[layers[0]].grid))
        for b in range(canvas.count):
            fig = class_token_figure(
                canvas.image(b),
                [t[b] if t is not None else None for _, _, t, _ in rows],
                [s[b] if s is not None else None for _, _, _, s in rows],
                names=("teacher", name),
                title=f"where a query looks (ringed), stage {k} ({grid} grid), image {b}: teacher heads (t) | "
                f"{name} heads (s)",
                layer_labels=[label for label, _, _, _ in rows],
                marks=[mark for _, mark, _, _ in rows],
            )
            canvas.save(fig, f"queries_{slug(name)}_stage{k}_img{b}.png")
