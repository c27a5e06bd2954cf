"""Pictures of attention on matplotlib's Agg canvas (no pyplot state); each figure's size in pixels is fixed
by its arguments (inches × `DPI`). matplotlib loads at the first figure, not at import: every training run
imports this module, few draw.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .compare import Inspection, LayerComparison

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Dots per inch of every figure: sizes in pixels are inches × DPI.
DPI = 100


def _figure(width: float, height: float) -> Figure:
    """A figure of ``width`` × ``height`` inches at `DPI` on its own Agg canvas (nothing global)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _whole_numbers():
    """Ticks on whole numbers alone: a layer axis of two layers otherwise reads 0, 0.2, ..., 1."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def display_image(
    x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """A normalised (C, H, W) input as an (H, W[, 3]) array in [0, 1] for display: un-normalised with
    ``mean``/``std``, or (without them) stretched from its min to its max."""
    img = x.detach().float().cpu()
    if mean is not None and std is not None:
        img = img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    img = img.clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else img[:3].transpose(1, 2, 0)


def _overlay(ax, image: np.ndarray, attention: np.ndarray | None) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, w, h, 0))
    if attention is not None:
        ax.imshow(attention, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def _cell(image: np.ndarray, attention: torch.Tensor | None, size: int) -> np.ndarray:
    """One (size, size, 3) panel: the image in grey, the attention (scaled to its max) blended over it."""
    resize = functools.partial(F.interpolate, size=(size, size), mode="bilinear", align_corners=False)
    img = torch.from_numpy(np.ascontiguousarray(image)).float()
    img = img.mean(-1) if img.dim() == 3 else img
    grey = resize(img[None, None])[0, 0]
    base = grey.clamp(0, 1).numpy()[..., None].repeat(3, -1)
    if attention is None:
        return 0.3 * base
    a = resize(attention.float()[None, None])[0, 0]
    a = (a / a.max().clamp_min(1e-12)).clamp(0, 1).numpy()
    from matplotlib import colormaps

    return 0.35 * base + 0.65 * colormaps["inferno"](a)[..., :3]


def class_token_figure(
    image: np.ndarray,
    teacher: Sequence[torch.Tensor | None],
    student: Sequence[torch.Tensor | None] | None = None,
    *,
    names: tuple[str, str] = ("teacher", "student"),
    title: str = "",
    cell: int = 48,
    layer_labels: Sequence[str] | None = None,
    notes: Sequence[str] | None = None,
    marks: Sequence[tuple[float, float] | None] | None = None,
) -> Figure:
    """A layer × head grid of class-token maps over ``image``: the teacher's heads, a gap, the student's,
    drawn one pixel per panel pixel (size: `class_token_figure_size`). ``notes``: per layer a word over its
    first panel (why a layer has no map: "4 windows", say)."""
    ht = max((m.shape[0] for m in teacher if m is not None), default=1)
    hs = max((m.shape[0] for m in (student or []) if m is not None), default=0) if student else 0
    layers = max(len(teacher), len(student or []))
    cols = ht + (hs + 1 if student else 0)
    mosaic = np.ones((layers * cell, cols * cell, 3))
    for maps, offset in ((teacher, 0), (student or [], ht + 1)):
        for layer, m in enumerate(maps):
            heads = m.shape[0] if m is not None else (ht if offset == 0 else hs)
            for h in range(heads):
                top, left = layer * cell, (offset + h) * cell
                panel = _cell(image, m[h] if m is not None else None, cell)
                mosaic[top : top + cell, left : left + cell] = panel
    width, height = class_token_figure_size(layers, cols, cell)
    fig = _figure(width / DPI, height / DPI)
    ax = fig.add_axes((_MARGIN[0] / width, _MARGIN[1] / height, cols * cell / width, layers * cell / height))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    labels = [f"{names[0][0]}{h}" for h in range(ht)] + (
        [""] + [f"{names[1][0]}{h}" for h in range(hs)] if student else []
    )
    ax.set_xticks([(c + 0.5) * cell for c in range(cols)], labels, fontsize=6)
    labels_y = list(layer_labels) if layer_labels is not None else [f"L{r}" for r in range(layers)]
    ax.set_yticks([(r + 0.5) * cell for r in range(layers)], labels_y, fontsize=6)
    ax.tick_params(length=0)
    for r, mark in enumerate(marks or []):
        if mark is not None:
            xs = [(c + mark[1]) * cell for c in range(cols) if c != ht or not student]
            ax.scatter(
                xs, [(r + mark[0]) * cell] * len(xs), s=14, facecolors="none", edgecolors="cyan", lw=0.8
            )
    ax.set_xlim(-0.5, cols * cell - 0.5)  # the marks must not widen the mosaic's axes
    ax.set_ylim(layers * cell - 0.5, -0.5)
    for r, note in enumerate(notes or []):
        if note:
            ax.text(2, (r + 0.5) * cell, note, color="white", fontsize=6, va="center")
    text = (
        title or f"class-token attention: {names[0]} | {names[1]} heads"
    ) + " (each map scaled to its max)"
    text = _wrapped(text, width)
    # a character is about 0.8 px wide per point at `DPI`; two lines fill the title margin at 5 points
    longest = max(len(line) for line in text.split("\n"))
    fig.suptitle(text, fontsize=min(8 if "\n" not in text else 5, width / (0.8 * longest)))
    return fig


def _wrapped(text: str, width_px: int) -> str:
    """``text`` on two lines where one line of 5-point type would not fit ``width_px`` (the title margin
    holds two such lines)."""
    if len(text) * 3.8 <= width_px:
        return text
    cut = text.rfind(" ", 0, len(text) // 2 + 8)
    return text if cut < 0 else text[:cut] + "\n" + text[cut + 1 :]


#: Pixels left of and below the class-token mosaic (labels), and above it (title).
_MARGIN = (30, 20, 24)


def class_token_figure_size(layers: int, columns: int, cell: int = 48) -> tuple[int, int]:
    """(width, height) in pixels of `class_token_figure` for ``layers`` rows and ``columns`` panels."""
    return columns * cell + _MARGIN[0] + 6, layers * cell + _MARGIN[1] + _MARGIN[2]


def head_matching_figure(rows: Sequence[LayerComparison], title: str = "", per_row: int = 6) -> Figure:
    """Per layer the JS cost of teacher against student heads, the optimal assignment ringed."""
    rows = [r for r in rows if r.js_cost]
    n = max(1, len(rows))
    cols = min(per_row, n)
    lines = math.ceil(n / cols)
    fig = _figure(max(2.1 * cols, 4.2), 2.1 * lines + 0.5)
    axes = fig.subplots(lines, cols, squeeze=False)
    vmax = max((max(max(c) for c in r.js_cost) for r in rows), default=math.log(2)) or math.log(2)
    for ax, r in zip(axes.flat, rows):
        cost = np.asarray(r.js_cost)
        ax.imshow(cost, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        pairs = np.asarray(r.assignment.get("pairs", []), dtype=float).reshape(-1, 2)
        ax.scatter(pairs[:, 1], pairs[:, 0], s=40, facecolors="none", edgecolors="red", linewidths=1.2)
        ax.set_title(f"L{r.layer} (teacher L{r.teacher_layer})", fontsize=7)
        ax.set_xticks(range(cost.shape[1]), [f"s{h}" for h in range(cost.shape[1])], fontsize=5)
        ax.set_yticks(range(cost.shape[0]), [f"t{h}" for h in range(cost.shape[0])], fontsize=5)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(
        f"{title or 'head matching'}: JS, teacher × student heads\n(0 to {vmax:.3f} nats; ringed: optimal match)",
        fontsize=7,
    )
    fig.tight_layout()
    return fig


def rollout_figure(image: np.ndarray, rollouts: Mapping[str, torch.Tensor]) -> Figure:
    """The image and each model's class-token attention rollout over it, side by side (one image)."""
    n = len(rollouts) + 1
    fig = _figure(2.0 * n, 2.3)
    axes = fig.subplots(1, n, squeeze=False)
    _overlay(axes[0, 0], image, None)
    axes[0, 0].set_title("image", fontsize=8)
    for ax, (name, roll) in zip(axes[0, 1:], rollouts.items()):
        _overlay(ax, image, roll.numpy())
        ax.set_title(f"{name}: rollout", fontsize=8)
    fig.tight_layout()
    return fig


def _series(insp: Inspection, name: str, key: str) -> tuple[list[int], list[float]]:
    """A student's ``key`` per layer, each at the teacher layer it is compared with (a student of another depth
    on the teacher's axis, where its values belong)."""
    rows = [r for r in insp.students[name] if key in r.mean]
    return [r.teacher_layer for r in rows], [r.mean[key] for r in rows]


def curves_figure(insp: Inspection) -> Figure:
    """Per-layer KL, JS, entropy and attention distance: teacher (and its noise floor) and every student."""
    fig = _figure(16, 3.6)
    axes = fig.subplots(1, 4)
    t_layers = [t.layer for t in insp.teacher]
    for ax, key, label in (
        (axes[0], "kl", "KL(P_t ‖ P_s) (nats)"),
        (axes[1], "js", "Jensen–Shannon (nats)"),
        (axes[2], "entropy", "row entropy (nats)"),
        (axes[3], "distance", "mean attention distance (px)"),
    ):
        if key in ("kl", "js"):
            floor = [t.mean.get(f"floor_{key}", math.nan) for t in insp.teacher]
            ax.plot(t_layers, floor, "k:", label="teacher vs noisy teacher (floor)")
        else:
            ax.plot(t_layers, [t.mean.get(key, math.nan) for t in insp.teacher], "k-o", label="teacher")
        for name in insp.students:
            ax.plot(*_series(insp, name, key), marker=".", label=name)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(_whole_numbers())
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def agreement_figure(insp: Inspection, title: str = "") -> Figure:
    """Per layer each student's JS to the teacher (with the floor), and mean attention distance."""
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    t_layers = [t.layer for t in insp.teacher]
    left.plot(t_layers, [t.mean.get("floor_js", math.nan) for t in insp.teacher], "k:", label="noise floor")
    right.plot(t_layers, [t.mean.get("distance", math.nan) for t in insp.teacher], "k-o", label="teacher")
    for name in insp.students:
        left.plot(*_series(insp, name, "js"), marker="o", label=name)
        right.plot(*_series(insp, name, "distance"), marker="o", label=name)
    left.set(xlabel="layer", ylabel="JS to the teacher (nats)", title="map agreement (lower: closer)")
    right.set(xlabel="layer", ylabel="pixels", title="mean attention distance")
    for ax in (left, right):
        ax.xaxis.set_major_locator(_whole_numbers())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array (for TensorBoard's add_image)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path) -> None:
    """Save at `DPI` with the figure's own size (so its pixels are predictable)."""
    fig.savefig(path, dpi=DPI)
