"""`attnxfer inspect`: does a student attend like its teacher, where, and with which heads?

Loads a teacher and one or more students from any spec the project knows (timm names, ``hf-hub:``,
``local-dir:``, weight files, `attnxfer export` folders, RUN_DIRs — a copy-mode run attends with its
teacher's q/k, so it is inspected together with that teacher), prepares images (files, or a registered
dataset) the teacher's way, measures with `attnxfer.analysis.compare_attention` and writes
``metrics.json``, ``report.md`` and pictures. `inspect_models` is the same on models you already hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform

from ..analysis import (
    Inspection,
    LayerGeometry,
    LayerSignals,
    Subject,
    compare_attention,
    has_rollout,
    input_size,
    layer_qk,
    rollout_class_maps,
    stage_of,
    token_layout,
    token_maps,
)
from ..analysis.pictures import (
    agreement_figure,
    class_token_figure,
    curves_figure,
    display_image,
    head_matching_figure,
    rollout_figure,
    save_figure,
)
from ..analysis.positions import RowPositions, query_maps, query_points, row_positions
from ..checkpoints.run_dir import RunDir
from ..checkpoints.store import atomic_write_json, atomic_write_text
from ..config import load_config
from ..data import build_dataset
from ..errors import InputError, MissingPathError, PathExistsError
from ..models import make_transfer_aware
from ..sources import TeacherLoadError, load_student, load_teacher
from ..transfer.plan import MODES, build_plan

__all__ = [
    "LoadedModel",
    "demo_agreement",
    "inspect_attention",
    "inspect_models",
    "load_images",
    "load_model",
    "write_report",
]


@dataclass
class LoadedModel:
    """A model to inspect and where it came from; ``borrow`` lists the layers that attend with the teacher's
    q/k (attention copy): {student layer: (teacher layer, chunks)}."""

    spec: str
    model: nn.Module
    source: str
    mode: str | None = None
    borrow: dict[int, tuple[int, str]] = field(default_factory=dict)
    sha256: str | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


# ------------------------------------------------------------------------------------------- models
def _is_run_dir(spec: str) -> bool:
    return RunDir(spec).is_run()


def _load_run(spec: str, teacher: LoadedModel | None) -> LoadedModel:
    """A training run's student (its best checkpoint, EMA weights where kept: `RunDir.load_student`); a
    copy-mode run gets the plan's borrowed layers and must come with the teacher it was trained with."""
    run_dir = RunDir(spec)
    loaded = run_dir.load_student("best")
    run, mode = loaded.record, loaded.record.get("mode")
    student = make_transfer_aware(loaded.model).eval().requires_grad_(False)
    weights = loaded.weights_file
    model = LoadedModel(
        spec, student, f"run {loaded.why}, {weights.stem} weights", mode, mean=tuple(run.get("mean") or ())
    )
    model.std = tuple(run.get("std") or ())
    if mode in MODES and MODES[mode].is_copy:
        model.borrow = _copy_layers(run_dir.path, run, student, teacher)
    return model


def _copy_layers(
    run_dir: Path, run: dict, student: nn.Module, teacher: LoadedModel | None
) -> dict[int, tuple[int, str]]:
    mode = MODES[run["mode"]]
    trained_with = run.get("teacher") or {}
    if teacher is None:
        raise InputError(
            f"{run_dir} is a {mode.name}-mode student: it attends with its teacher's {mode.borrow!r} "
            f"({trained_with.get('spec', 'the run’s teacher')}), so it can only be inspected with that teacher; "
            "pass it as TEACHER"
        )
    want, have = trained_with.get("sha256"), teacher.sha256
    if want and want != have:
        raise InputError(
            f"{run_dir} is a {mode.name}-mode student trained with teacher {trained_with.get('spec')!r} "
            f"(weights sha256 {want[:12]}…), but TEACHER {teacher.spec!r} "
            f"{'has random weights' if have is None else f'has sha256 {have[:12]}…'}: a copy student attends "
            "with its own teacher's q/k, so pass that teacher"
        )
    cfg = load_config(str(RunDir(run_dir).config_file))
    plan = build_plan(
        teacher.model, student, mode.name, end_layer=cfg.transfer.end_layer, layers=cfg.transfer.layers
    )
    return {s: (t, mode.borrow) for s, t in plan.pairs}


def load_model(
    spec: str,
    *,
    teacher: LoadedModel | None = None,
    pretrained: bool = True,
    arch: str | None = None,
) -> LoadedModel:
    """Any spec as a model to inspect: a RUN_DIR (run.json + checkpoints), an `attnxfer export` folder
    (efficient attention included), a timm name, ``hf-hub:``, ``local-dir:`` or a weight file (with
    ``arch``). ``teacher`` is needed for copy-mode runs; ``pretrained=False`` builds random weights."""
    spec = str(spec)
    if _is_run_dir(spec):
        return _load_run(spec, teacher)
    try:
        model, record = load_teacher(spec, arch=arch, pretrained=pretrained)
    except TeacherLoadError as err:
        if "efficient-attention student" not in str(err):
            raise InputError(str(err)) from None
        model = load_student(spec)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return LoadedModel(
            spec, model, "attnxfer export", mean=tuple(cfg.get("mean", ())), std=tuple(cfg.get("std", ()))
        )
    return LoadedModel(spec, model, record.source, sha256=record.sha256, mean=record.mean, std=record.std)


# ------------------------------------------------------------------------------------------- images
def _input_settings(teacher: LoadedModel) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    (size, _), chans = input_size(teacher.model)
    mean = teacher.mean or (0.5,) * chans
    std = teacher.std or (0.5,) * chans
    return size, chans, tuple(mean), tuple(std)


def load_images(
    teacher: LoadedModel,
    *,
    files: Sequence[str | Path] = (),
    data: str | None = None,
    data_root: str | None = None,
    split: str = "val",
    num_images: int = 64,
) -> torch.Tensor:
    """(B, C, H, W) images prepared for ``teacher`` (its input size, channels, mean and std): image
    ``files`` (resized and centre-cropped as timm's eval transform does), or the first ``num_images`` of
    a registered dataset's ``split``."""
    size, chans, mean, std = _input_settings(teacher)
    if files and data:
        raise InputError("give either image files (--images) or a dataset (--data), not both")
    if files:
        transform = create_transform(input_size=(chans, size, size), mean=mean, std=std, crop_pct=1.0)
        out = []
        for f in files:
            path = Path(f).expanduser()
            if not path.is_file():
                raise MissingPathError(f"image {path} does not exist")
            with Image.open(path) as img:
                out.append(transform(img.convert("L" if chans == 1 else "RGB")))
        return torch.stack(out)
    if data:
        if num_images < 1:
            raise InputError(f"--num-images must be at least 1, got {num_images}")
        ds = build_dataset(data, split, root=data_root, img_size=size, in_chans=chans, mean=mean, std=std)
        n = min(num_images, len(ds))
        if n == 0:
            raise InputError(f"dataset {data!r} split {split!r} has no images")
        return torch.stack([ds[i][0] for i in range(n)])
    raise InputError(
        "no images to inspect: give image files (--images A.png B.jpg) or a dataset (--data NAME)"
    )


# ------------------------------------------------------------------------------------------- measuring
def inspect_models(
    teacher: nn.Module,
    students: Mapping[str, nn.Module | Subject],
    images: torch.Tensor,
    *,
    batch_size: int = 16,
    **settings: Any,
) -> Inspection:
    """`compare_attention` on images already prepared: batches of ``batch_size``; ``settings`` are its
    keywords (topk, noise, floor_images, probe_rows, chunk, progress)."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise InputError(
            f"no images to inspect: expected a (B, C, H, W) batch with B >= 1, got {tuple(images.shape)}"
        )
    batches = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    return compare_attention(teacher, students, batches, **settings)  # its refusals are InputErrors


def _json(value: Any) -> Any:
    """NaN/inf -> None (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def _f(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def render_report(insp: Inspection, teacher: str, students: Mapping[str, str]) -> str:
    """The markdown view of an inspection."""
    s = insp.settings
    lines = [
        "# Attention inspection",
        "",
        f"- teacher: `{teacher}`",
        *[f"- student `{name}`: `{spec}`" for name, spec in students.items()],
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
        "",
        "## Teacher",
        "",
        "| layer | attention | rows | heads | entropy | attention distance (px) | floor KL | floor JS | "
        "floor top-k | floor Spearman |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in insp.teacher:
        m = t.mean
        lines.append(
            f"| {t.layer} | `{t.name}` | {t.partition} | {t.heads} | {_f(m.get('entropy'))} | "
            f"{_f(m.get('distance'), 1)} | "
            f"{_f(m.get('floor_kl'), 4)} | {_f(m.get('floor_js'), 4)} | {_f(m.get('floor_topk'), 2)} | "
            f"{_f(m.get('floor_spearman'), 2)} |"
        )
    for name, rows in insp.students.items():
        lines += [
            "",
            f"## Student `{name}` against the teacher (means over heads)",
            "",
            "| layer | teacher layer | attention | KL | JS | top-k | Spearman | cls JS | cls Pearson | entropy | "
            "distance (px) | heads: matched / identity JS |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        notes = []
        for r in rows:
            m = r.mean
            a = r.assignment
            heads = (
                f"{_f(a['matched_cost'], 4)} / {_f(a['identity_cost'], 4)}"
                + ("" if a.get("is_identity") else " (reordered)")
                if a
                else "—"
            )
            attn = r.attention + (f" (borrows {r.borrowed})" if r.borrowed else "")
            lines.append(
                f"| {r.layer} | {r.teacher_layer} | {attn} | {_f(m.get('kl'), 4)} | {_f(m.get('js'), 4)} | "
                f"{_f(m.get('topk'), 2)} | {_f(m.get('spearman'), 2)} | {_f(m.get('cls_js'), 4)} | "
                f"{_f(m.get('cls_pearson'), 2)} | {_f(m.get('entropy'))} | {_f(m.get('distance'), 1)} | {heads} |"
            )
            if r.note:
                notes.append(f"- layer {r.layer}: {r.note}")
        lines += ["", "### Head correspondence (optimal assignment by JS; teacher head → student head)", ""]
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
        lines += notes
    return "\n".join(lines) + "\n"


def write_report(
    out: str | Path,
    insp: Inspection,
    teacher: LoadedModel,
    students: Mapping[str, LoadedModel],
    images: torch.Tensor,
    *,
    picture_images: int = 1,
) -> list[Path]:
    """metrics.json, report.md and the pictures under ``out``; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {n: s.spec for n, s in students.items()}
    payload = {"specs": {"teacher": teacher.spec, "students": names}, **dataclasses.asdict(insp)}
    atomic_write_json(out / "metrics.json", _json(payload))
    atomic_write_text(out / "report.md", render_report(insp, teacher.spec, names))
    written = [out / "metrics.json", out / "report.md"]
    _, _, mean, std = _input_settings(teacher)
    x = images[: max(1, picture_images)]
    t_qk = layer_qk(teacher.model, x)
    t_maps, t_geo = token_maps(teacher.model, x, qk=t_qk)
    rollouts = (
        {"teacher": rollout_class_maps(teacher.model, x, qk=t_qk)}
        if has_rollout(teacher.model, x, t_qk)
        else {}
    )
    groups = _stages([sig.name for sig in t_qk])
    t_pos = row_positions(teacher.model, x)
    for name, s in students.items():
        s_qk = layer_qk(s.model, x, _borrowed_signals(s.borrow, t_qk))
        s_maps, _ = token_maps(s.model, x, qk=s_qk)
        if rollouts and has_rollout(s.model, x, s_qk):
            rollouts[name] = rollout_class_maps(s.model, x, qk=s_qk)
        if any(p is not None for p in t_pos):
            pairs = {r.teacher_layer: r.layer for r in insp.students[name]}
            sides = _QuerySides(t_qk, t_pos, s_qk, row_positions(s.model, x), pairs)
            written += _query_pictures(out, x, name, sides, mean, std)
        for stage, layers in groups.items():
            suffix = f"_{_slug(stage)}" if len(groups) > 1 else ""
            if len(groups) == 1:  # one group: every layer of either model (depths may differ)
                layers = list(range(max(len(t_maps), len(s_maps))))
            # no layer of this group has a whole-image map (windows, reduced keys): the query pictures show it
            drawn = any(m is not None for maps in (t_maps, s_maps) for j, m in enumerate(maps) if j in layers)
            for b in range(x.shape[0] if drawn else 0):
                pick = lambda maps, b=b, layers=layers: [
                    maps[j][b] if j < len(maps) and maps[j] is not None else None for j in layers
                ]
                fig = class_token_figure(
                    display_image(x[b], mean, std),
                    pick(t_maps),
                    pick(s_maps),
                    names=("teacher", name),
                    title=_maps_title(b, name, stage),
                    layer_labels=[f"L{j}" for j in layers],
                    notes=[_why_no_map(t_geo[j]) if j < len(t_geo) else "" for j in layers],
                )
                path = out / f"cls_maps_{_slug(name)}{suffix}_img{b}.png"
                save_figure(fig, path)
                written.append(path)
            rows = [r for r in insp.students[name] if r.teacher_layer in layers]
            if any(r.js_cost for r in rows):
                path = out / f"heads_{_slug(name)}{suffix}.png"
                title = f"head matching, {name}" + (f", {stage}" if len(groups) > 1 else "")
                save_figure(head_matching_figure(rows, title=title), path)
                written.append(path)
    for b in range(x.shape[0] if rollouts else 0):
        path = out / f"rollout_img{b}.png"
        save_figure(
            rollout_figure(display_image(x[b], mean, std), {k: v[b] for k, v in rollouts.items()}), path
        )
        written.append(path)
    save_figure(curves_figure(insp), out / "curves.png")
    written.append(out / "curves.png")
    return written


@dataclass
class _QuerySides:
    """Teacher and student of the query pictures: each model's signals and row positions on the picture
    images, and which student layer is paired with each teacher layer."""

    t_qk: Sequence[LayerSignals]
    t_pos: Sequence[RowPositions | None]
    s_qk: Sequence[LayerSignals]
    s_pos: Sequence[RowPositions | None]
    pairs: Mapping[int, int]

    def stages(self) -> list[list[int]]:
        """Teacher layers with positions, in runs over one query grid (a stage of a hierarchical model)."""
        runs: list[list[int]] = []
        last = None
        for j, pos in enumerate(self.t_pos):
            if pos is None:
                continue
            if pos.grid != last:
                runs.append([])
            runs[-1].append(j)
            last = pos.grid
        return runs

    def maps(self, j: int, images: int) -> tuple[dict, dict]:
        """Teacher layer ``j``'s query maps and its student layer's (empty where they cannot be drawn)."""
        pos = self.t_pos[j]
        points = query_points(pos.grid)
        t_sig = self.t_qk[j]
        teacher = query_maps(t_sig, pos, images, points) if pos.matches(t_sig, images) else {}
        i = self.pairs.get(j)
        s_pos = self.s_pos[i] if i is not None and i < len(self.s_pos) else None
        student = {}
        if s_pos is not None and s_pos.matches(self.s_qk[i], images) and s_pos.grid == pos.grid:
            student = query_maps(self.s_qk[i], s_pos, images, points)
        return teacher, student


def _query_pictures(out: Path, x: torch.Tensor, name: str, sides: _QuerySides, mean, std) -> list[Path]:
    """Per stage and image: where the centre and corner query of each layer look, teacher heads beside the
    student's, drawn over the image at the layer's key grid (windows stitched back: 0 outside the query's
    window; reduced keys at the reduced grid). The query is ringed."""
    written = []
    images = x.shape[0]
    for k, layers in enumerate(sides.stages()):
        rows = []  # (label, mark, teacher maps, student maps) per (layer, query point)
        for j in layers:
            teacher, student = sides.maps(j, images)
            pos = sides.t_pos[j]
            for point, cell in query_points(pos.grid).items():
                r, c = divmod(cell, pos.grid[1])
                mark = ((r + 0.5) / pos.grid[0], (c + 0.5) / pos.grid[1])
                rows.append((f"L{j} {point[:3]}", mark, teacher.get(point), student.get(point)))
        grid = "x".join(map(str, sides.t_pos[layers[0]].grid))
        for b in range(images):
            fig = class_token_figure(
                display_image(x[b], mean, std),
                [t[b] if t is not None else None for _, _, t, _ in rows],
                [s[b] if s is not None else None for _, _, _, s in rows],
                names=("teacher", name),
                title=f"where a query looks (ringed), stage {k} ({grid} grid), image {b}: teacher heads (t) | "
                f"{name} heads (s)",
                layer_labels=[label for label, _, _, _ in rows],
                marks=[mark for _, mark, _, _ in rows],
            )
            path = out / f"queries_{_slug(name)}_stage{k}_img{b}.png"
            save_figure(fig, path)
            written.append(path)
    return written


def _stages(names: Sequence[str]) -> dict[str, list[int]]:
    """Layer indices grouped by stage (`stage_of` their names), in forward order."""
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        groups.setdefault(stage_of(name), []).append(j)
    return groups


def _borrowed_signals(
    borrow: Mapping[int, tuple[int, str]], t_qk: Sequence[LayerSignals]
) -> dict[int, dict[str, torch.Tensor]]:
    """What a copy student's layers attend with: the teacher's q and k (with its logit bias)."""
    out = {}
    for i, (t, chunks) in borrow.items():
        out[i] = {c: t_qk[t][c] for c in chunks if c in "qk"}
        if len(out[i]) == 2:
            out[i]["bias"] = t_qk[t].bias
    return out


def _why_no_map(geometry: LayerGeometry) -> str:
    """The word on a layer's row of the class-token picture: why it shows something else, or nothing."""
    if not geometry.whole:
        return geometry.label  # "4 windows", "reduced keys": no whole-image map
    return "" if geometry.has_class_row else "received"  # no class token: attention each patch receives


def _maps_title(b: int, name: str, stage: str) -> str:
    where = f"{stage}, " if stage and stage != "blocks" else ""
    return f"class-token attention, {where}image {b}: teacher heads (t) | {name} heads (s)"


#: what `inspect_attention` wrote into its --out folder: an --overwrite deletes those files, and no others
MANIFEST = "inspect-manifest.json"
# the files of a report written before manifests existed (metrics.json, report.md and these pictures)
_OWN_PICTURES = ("curves.png", "rollout_img*.png", "cls_maps_*_img*.png", "heads_*.png", "queries_*_img*.png")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to write the report into, removed whatever happens (Ctrl-C
    included): an interrupted inspection leaves ``out`` as it was. Siblings left by a killed run go too."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _previous_report(out: Path) -> list[str]:
    """The files an earlier inspection wrote into ``out``: its manifest's list (plain names only), or for a
    report from before manifests, its own names (metrics.json, report.md, the pictures it draws)."""
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            names = json.loads(manifest.read_text()).get("files", [])
        except (OSError, ValueError, AttributeError):
            names = []
        return [n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")]
    if not (out / "metrics.json").exists():
        return []
    own = {"metrics.json", "report.md"}
    for pattern in _OWN_PICTURES:
        own.update(p.name for p in out.glob(pattern))
    return sorted(own)


def _publish(tmp: Path, out: Path, names: Sequence[str]) -> None:
    """Move the report from ``tmp`` into ``out``: one rename when ``out`` does not exist; else file by file
    (each replace atomic), deleting what the previous inspection wrote and nothing of the user's own,
    metrics.json last (its presence is what marks a finished report)."""
    atomic_write_json(tmp / MANIFEST, {"files": [*names, MANIFEST]})
    if not out.exists():
        os.replace(tmp, out)
        return
    new = [n for n in names if n != "metrics.json"] + [MANIFEST, "metrics.json"]
    stale = [n for n in _previous_report(out) if n not in new]
    for name in new[:-1]:
        os.replace(tmp / name, out / name)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    os.replace(tmp / "metrics.json", out / "metrics.json")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _student_names(specs: Sequence[str]) -> list[str]:
    names = []
    for spec in specs:
        base = Path(spec.split(":", 1)[-1].rstrip("/")).name or spec
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def inspect_attention(
    teacher: str,
    students: Sequence[str],
    *,
    images: Sequence[str | Path] = (),
    data: str | None = None,
    data_root: str | None = None,
    split: str = "val",
    num_images: int = 64,
    out: str | Path | None = None,
    overwrite: bool = False,
    pretrained: bool = True,
    teacher_arch: str | None = None,
    student_arch: str | None = None,
    batch_size: int = 16,
    picture_images: int = 1,
    seed: int = 0,
    **settings: Any,
) -> dict[str, Any]:
    """Load ``teacher`` and ``students`` (specs), measure on ``images`` (files) or ``data`` (a dataset), write
    the report under ``out`` (if given) and return the measurements as plain data (the metrics.json dict).

    ``pretrained=False`` builds timm names with random weights (``seed`` for the teacher, seed+1, +2, ...
    for the students). ``settings``: `compare_attention`'s keywords (topk, noise, floor_images, probe_rows).
    """
    if not students:
        raise InputError("name at least one student to inspect against the teacher")
    if out is not None and (Path(out) / "metrics.json").exists() and not overwrite:
        raise PathExistsError(
            f"{out} already holds an inspection (metrics.json); choose another --out or pass --overwrite"
        )
    torch.manual_seed(seed)
    t = load_model(teacher, pretrained=pretrained, arch=teacher_arch)
    token_layout(t.model)  # a family with no adapter, or a refused one (DiffAttention): one message, here
    loaded: dict[str, LoadedModel] = {}
    for k, (name, spec) in enumerate(zip(_student_names(students), students), start=1):
        torch.manual_seed(seed + k)
        loaded[name] = load_model(spec, teacher=t, pretrained=pretrained, arch=student_arch)
        token_layout(loaded[name].model)
    x = load_images(t, files=images, data=data, data_root=data_root, split=split, num_images=num_images)
    subjects = {n: Subject(s.model, s.borrow) for n, s in loaded.items()}
    insp = inspect_models(t.model, subjects, x, batch_size=batch_size, **settings)
    if out is not None:
        with _staging(Path(out)) as tmp:
            written = write_report(tmp, insp, t, loaded, x, picture_images=picture_images)
            _publish(tmp, Path(out), [p.name for p in written])
    return _json(
        {"teacher": t.spec, "students": {n: s.spec for n, s in loaded.items()}, **dataclasses.asdict(insp)}
    )


# ------------------------------------------------------------------------------------------- the demo
def demo_agreement(
    out: str | Path, teacher_dir: str | Path, runs: Mapping[str, str | Path], *, num_images: int = 64
) -> Path:
    """For `attnxfer demo`: per-layer map agreement (JS) and attention distance of each student run against
    the demo's teacher, on the first ``num_images`` validation images, as ``out/agreement.png``, with a
    sentence of what it shows in ``out/agreement.md`` (also printed)."""
    out = Path(out)
    teacher = load_model(f"local-dir:{teacher_dir}")
    students = {label: load_model(str(run_dir), teacher=teacher) for label, run_dir in runs.items()}
    x = load_images(teacher, data="animal_mnist", num_images=num_images)
    insp = inspect_models(teacher.model, {n: Subject(s.model, s.borrow) for n, s in students.items()}, x)
    sentence = agreement_sentence(insp)
    path = out / "agreement.png"
    save_figure(
        agreement_figure(insp, title="students against the teacher, per layer (animal-mnist val)"), path
    )
    atomic_write_text(out / "agreement.md", f"# Attention agreement with the teacher\n\n{sentence}\n")
    atomic_write_json(out / "agreement.json", _json(dataclasses.asdict(insp)))
    print(f"[demo] attention: {sentence}", flush=True)
    return path


def agreement_sentence(insp: Inspection) -> str:
    """One sentence per student of what the per-layer curves show: mean JS against the noise floor, the
    closest and furthest layers, and attention distance against the teacher's."""
    floor = _mean_of([t.mean.get("floor_js", math.nan) for t in insp.teacher])
    t_dist = _mean_of([t.mean.get("distance", math.nan) for t in insp.teacher])
    parts = [
        f"Teacher vs itself on noisy inputs gives JS {floor:.3f} (the floor); mean attention distance {t_dist:.1f} px."
    ]
    for name, rows in insp.students.items():
        js = [(r.mean["js"], r.layer) for r in rows if math.isfinite(r.mean.get("js", math.nan))]
        if not js:
            continue
        mean_js = sum(v for v, _ in js) / len(js)
        best, worst = min(js), max(js)
        dist = _mean_of([r.mean.get("distance", math.nan) for r in rows])
        copied = sum(1 for r in rows if r.borrowed)
        if copied == len(rows):
            parts.append(
                f"{name}: every layer attends with the teacher's own maps (JS 0); distance {dist:.1f} px."
            )
            continue
        lead = f"{name}: {copied} layers attend with the teacher's maps (JS 0); " if copied else f"{name}: "
        ratio = f" ({_times(mean_js / floor)} the floor)" if floor > 0 else ""
        parts.append(
            f"{lead}mean JS {mean_js:.3f}{ratio}, closest in layer {best[1]} ({best[0]:.3f}), furthest in "
            f"layer {worst[1]} ({worst[0]:.3f}); attention distance {dist:.1f} px."
        )
    return " ".join(parts)


def _times(ratio: float) -> str:
    """``12x``, ``3.4x``, ``0.52x``: two significant digits below 10, so a ratio under 1 never reads 0x."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def _mean_of(values: Sequence[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else math.nan
