"""``attnxfer demo``: the paper's effect on a real dataset (animal-mnist), on a laptop CPU.

An MAE pre-trained without labels teaches students trained with one equal step budget each (`ROWS`: from
scratch, MAE fine-tuned, attention copy, attention distillation; ``supervised`` adds a teacher trained with
labels). Every run is an ordinary run folder keyed by its config's hash (``OUT/<row>-<hash>``), reused while
its config is unchanged. Each teacher's export is also published at a stable path (`DEMO_EXPORTS`) that the
demo recipes and the docs name; the students read the hashed one, so that a new teacher makes new students.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints.atomic_io import current_umask, give_normal_mode, replace_dir
from ..checkpoints.export import export_run
from ..checkpoints.run_dir import RunDir
from ..checkpoints.run_lock import refuse_file_in_the_way
from ..checkpoints.store import CheckpointManager, atomic_write_json
from ..config import TrainConfig, config_changes, dump_config, load_config
from ..config.study_spec import Student, StudySpec
from ..data import build_dataset
from ..errors import InputError, PathExistsError
from ..models import attention_maps, make_transfer_aware
from ..models.image_input import image_input
from ..run_layout import DEMO_EXPORTS, DEMO_OUT, STUDY_RECORD
from ..sources.resolve import sha256_file
from ..sources.teacher import load_teacher
from ..speak import say
from ..train.engine import TrainResult
from ..transfer.modes import MODES
from .inspect.inspect import demo_agreement
from .run.parts import build_student
from .run.pretrain import pretrain
from .run.training import train
from .run.val_curves import draw_val_curves, val_series
from .study.seed_stats import paired_table, per_image_correct, results_table
from .study.study import study

#: the paired comparisons (McNemar) each table reports, by the rows' ``kind``
PAIRS = (("copy", "distill"), ("copy", "scratch"), ("distill", "scratch"), ("copy", "finetune"))
_QUICK_TEACHER_STEPS = 60
_QUICK_STUDENT_STEPS = 30


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher the demo builds: its recipe, the command that trains it, and its table label."""

    label: str
    recipe: str
    trainer: Callable[[TrainConfig], TrainResult]
    metric: str  # what its row shows: val top-1, or (MAE) the val reconstruction loss


@dataclass(frozen=True)
class RowSpec:
    """One student run of the demo: recipe, teacher (by key) used as attention source or as init, table."""

    key: str
    label: str
    recipe: str
    table: str | None  # which table (a key of TABLES); None: every table (the baseline)
    kind: str  # what the row is within its table, the words of `PAIRS`: scratch, finetune, copy, distill
    teacher: str | None = None  # its q/k are copied / distilled (teacher.spec)
    init: str | None = None  # its weights start the student (model.init: fine-tuning)


TEACHERS = {
    "mae": TeacherSpec("MAE pre-training (no labels)", "demo/mae_pretrain", pretrain, "val_loss"),
    "supervised": TeacherSpec("teacher (trained with labels)", "demo/teacher", train, "val_top1"),
}
TABLES = {
    "mae": "MAE teacher pre-trained on animal-mnist without labels (the paper's setting)",
    "supervised": "teacher trained with labels on animal-mnist",
}
ROWS = (
    RowSpec("scratch", "student from scratch", "demo/scratch", table=None, kind="scratch"),
    RowSpec(
        "mae_finetune",
        "MAE teacher, fine-tuned",
        "demo/mae_finetune",
        table="mae",
        kind="finetune",
        init="mae",
    ),
    RowSpec("copy", "attention copy (from MAE)", "demo/copy", table="mae", kind="copy", teacher="mae"),
    RowSpec(
        "distill",
        "attention distillation (from MAE)",
        "demo/distill",
        table="mae",
        kind="distill",
        teacher="mae",
    ),
    RowSpec(
        "sup_copy",
        "attention copy (supervised teacher)",
        "demo/copy",
        table="supervised",
        kind="copy",
        teacher="supervised",
    ),
    RowSpec(
        "sup_distill",
        "attention distillation (supervised teacher)",
        "demo/distill",
        table="supervised",
        kind="distill",
        teacher="supervised",
    ),
)
LABELS = {row.key: row.label for row in ROWS}


def table_pairs(table: str, keys: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """The (row key, row key) pairs `PAIRS` names within ``table``, among ``keys`` (default: every row)."""
    by_kind = {r.kind: r.key for r in ROWS if r.table in (None, table) and (keys is None or r.key in keys)}
    return [(by_kind[a], by_kind[b]) for a, b in PAIRS if a in by_kind and b in by_kind]


def _digest(cfg: TrainConfig) -> str:
    """The config's hash, leaving out where it runs and how it shows progress."""
    same = dataclasses.replace(cfg, run_dir="", log=dataclasses.replace(cfg.log, progress=True))
    return hashlib.sha256(dump_config(same).encode()).hexdigest()[:16]


def _keyed(out_dir: Path, key: str, recipe: str, overrides: list[str]) -> TrainConfig:
    """The recipe with overrides, its run folder keyed by the config's hash: OUT/<key>-<hash8>."""
    cfg = load_config(recipe, overrides)
    return dataclasses.replace(cfg, run_dir=str(out_dir / f"{key}-{_digest(cfg)[:8]}"))


def _run(cfg: TrainConfig, label: str, trainer=train, metric: str = "val_top1") -> dict[str, float]:
    """Train (or resume/reuse) one run; the result is cached beside it as result.json."""
    result_path = Path(cfg.run_dir) / "result.json"
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        if cached.get("config_digest") == _digest(cfg):
            say(f"[demo] {label}: reusing {cfg.run_dir} (same config hash; delete it to rebuild)")
            return {**cached, "label": label, "run_dir": cfg.run_dir}  # where it is now (a demo moved)
    say(f"[demo] {label}: training -> {cfg.run_dir}")
    start = time.monotonic()
    out = _result_of(trainer(cfg), cfg, label, time.monotonic() - start, metric)
    atomic_write_json(result_path, out)
    return out


def _result_of(
    res: TrainResult, cfg: TrainConfig, label: str, seconds: float, metric: str = "val_top1"
) -> dict:
    """What the demo keeps of one run (result.json): its score, steps, time and config digest."""
    return {
        "label": label,
        "metric": metric,
        "val": res.final.get(metric),
        "best": res.best,
        "val_top1": res.final.get("val_top1"),
        "best_top1": res.best_top1,
        "steps": res.steps,
        "seconds": round(seconds, 1),
        "config_digest": _digest(cfg),
        "run_dir": cfg.run_dir,
    }


def _pyplot():
    """pyplot drawing into files (the Agg backend): the demo opens no window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(out: Path, runs: dict[str, str], teacher_top1: float | None, name: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_val_curves(ax, {label: val_series(run_dir, "val_top1") for label, run_dir in runs.items()})
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="gray", linestyle="--", label=f"teacher ({teacher_top1:.1f}%)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("animal-mnist: students with an equal step budget")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_attention(out: Path, teacher_dir: str, student_runs: dict[str, str]) -> Path:
    """Class-token attention of the last block: teacher vs each student, on a few val images."""
    import torch

    plt = _pyplot()
    teacher, _ = load_teacher(f"local-dir:{teacher_dir}")
    val = build_dataset("animal_mnist", "val")
    x = torch.stack([val[i][0] for i in (0, 150, 420, 777)])
    models = {"MAE teacher": teacher}
    for label, run_dir in student_runs.items():
        run = RunDir(run_dir)
        if (info := run.latest()) is None:
            continue
        mode = run.record().get("mode")
        if mode in MODES and MODES[mode].teacher_at_eval:
            models[f"{label}\n(= teacher's maps)"] = teacher  # a copy student attends with the teacher's q, k
            continue
        cfg = load_config(str(run.config_file))
        student = build_student(cfg, teacher, 10, 1, 28)
        tensors, _ = CheckpointManager(run_dir).load(info)
        student.load_state_dict(tensors["model"])
        models[label] = make_transfer_aware(student).eval()
    last = len(teacher.blocks) - 1
    fig, axes = plt.subplots(len(x), len(models) + 1, figsize=(1.6 * (len(models) + 1), 1.6 * len(x)))
    maps = {name: attention_maps(m, x, [last])[last] for name, m in models.items()}
    grid = image_input(teacher).grid
    for r in range(len(x)):
        axes[r, 0].imshow(x[r, 0].numpy(), cmap="gray")
        axes[r, 0].set_title("image" if r == 0 else "", fontsize=8)
        for c, (name, m) in enumerate(maps.items(), start=1):
            cls_row = m[r].mean(0)[0, teacher.num_prefix_tokens :].reshape(grid).numpy()
            axes[r, c].imshow(cls_row, cmap="viridis")
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    for a in axes.flat:
        a.axis("off")
    fig.suptitle(f"class-token attention, block {last} (mean over heads)", fontsize=9)
    fig.tight_layout()
    path = out / "attention.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _build_teacher(out_dir: Path, key: str, steps: int | None, progress: list[str]) -> tuple[dict, Path]:
    """Train (or reuse) a demo teacher and export it in timm's layout: (its row, the export folder)."""
    spec = TEACHERS[key]
    over = [*progress] + ([f"schedule.max_steps={steps}"] if steps else [])
    cfg = _keyed(out_dir, key, spec.recipe, over)
    row = _run(cfg, spec.label, trainer=spec.trainer, metric=spec.metric)
    export_dir = Path(cfg.run_dir) / "export"
    stamp = export_dir / "attnxfer_source.json"
    if not (stamp.exists() and json.loads(stamp.read_text()).get("config_digest") == row["config_digest"]):
        # the run's own checkpoint, as `attnxfer export` takes it: the MAE's latest, a supervised teacher's best
        export_run(cfg.run_dir, export_dir, weights="raw", overwrite=True)
        atomic_write_json(stamp, {"config_digest": row["config_digest"]})
    return row, export_dir


def publish_export(export_dir: Path, stable: Path, row: dict) -> Path:
    """Copy a teacher's export to its stable path ``stable`` (real files, the folder replaced whole: a reader
    sees the old teacher or the new one), unless it already holds this teacher; a different teacher there
    (other settings, an `attnxfer pretrain` of the recipe) is replaced, and the demo says so (one that no demo
    folder holds is kept beside it)."""
    stamp = stable / "attnxfer_source.json"
    held = json.loads(stamp.read_text()) if stamp.is_file() else {}
    ours = held.get("config_digest") == row["config_digest"]
    # the weights are compared too: `attnxfer pretrain -c demo/mae_pretrain` exports to this path as well,
    # leaving the demo's stamp beside its own files
    wa, wb = export_dir / "model.safetensors", stable / "model.safetensors"
    whole = wa.is_file() and wb.is_file() and (stable / "config.json").is_file()
    if ours and whole and sha256_file(wa) == sha256_file(wb):
        return stable
    stable.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stable.name}.", dir=stable.parent))
    try:
        for f in export_dir.iterdir():
            if f.is_file() and f.name != stamp.name:
                shutil.copy2(f, staging / f.name)
                give_normal_mode(staging / f.name)  # an export made by an older attnxfer kept weights 0600
        atomic_write_json(
            staging / stamp.name, {"config_digest": row["config_digest"], "run_dir": row["run_dir"]}
        )
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's folder is private; the export is not
        if stable.exists():
            was = (
                f"the export of {held['run_dir']}"
                if held.get("run_dir") and not ours
                else "a teacher made otherwise"
            )
            say(f"[demo] {stable}: replacing {was} with the export of {row['run_dir']}")
            cached = Path(held["run_dir"]) / "export" / "model.safetensors" if held.get("run_dir") else None
            if not (cached and cached.is_file() and wb.is_file() and sha256_file(cached) == sha256_file(wb)):
                # no demo folder holds it (`attnxfer pretrain -c demo/mae_pretrain`'s export): the teacher of
                # runs that check it by hash, kept as pretrain keeps an export it replaces
                now = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
                kept = shutil.copytree(stable, stable.with_name(f"{stable.name}.replaced-{now}"))
                say(f"[demo] kept the teacher it replaces as {kept}")
        replace_dir(staging, stable)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stable


def run_demo(
    out: str = DEMO_OUT,
    budget_steps: int | None = None,
    teacher_steps: int | None = None,
    quick: bool = False,
    supervised: bool = False,
    seeds: int = 1,
) -> dict[str, dict[str, float]]:
    """Run the whole demo (reusing finished runs of the same config); returns the table rows by label (first
    seed). ``seeds`` > 1 trains every student row once per seed (teachers once)."""
    if seeds < 1:
        raise InputError(f"seeds must be >= 1, got {seeds}")
    out_dir = Path(out)
    refuse_file_in_the_way(out_dir, "--out")
    # runs/demo is the demo's own folder, where the demo recipes put their runs too (`attnxfer pretrain -c
    # demo/mae_pretrain` -> runs/demo/mae): only another folder is checked for other work
    own = out_dir.resolve() == Path(DEMO_OUT).resolve()
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() and not own else []
    if held and not any(re.fullmatch(r"[a-z_]+-[0-9a-f]{8}", name) for name in held):  # no run of a demo's
        raise PathExistsError(
            f"--out={out_dir} holds other work ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) and no "
            "demo's runs: the demo writes its tables, pictures and teachers' exports there; give a new or "
            "empty folder, or an earlier demo's"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_steps = teacher_steps or (_QUICK_TEACHER_STEPS if quick else None)
    budget_steps = budget_steps or (_QUICK_STUDENT_STEPS if quick else None)
    progress = ["log.progress=false"] if quick else []
    smoke = (  # the demo sets schedule.max_steps: each run's "raise schedule.max_steps" warning means this
        f"--quick: a smoke test of {teacher_steps} teacher and {budget_steps} student steps, too few for "
        "students that learn (each run warns so); leave out --quick for the demo's figures"
        if quick
        else None
    )
    if smoke:
        say(f"[demo] {smoke}")
    tables = ["mae", "supervised"] if supervised else ["mae"]

    teachers, exports, stable = {}, {}, {}
    for key in tables:
        teachers[key], exports[key] = _build_teacher(out_dir, key, teacher_steps, progress)
        stable[key] = publish_export(exports[key], out_dir / DEMO_EXPORTS[key], teachers[key])
    students = _train_students(out_dir, tables, exports, seeds, budget_steps, progress)
    _write_tables(out_dir, tables, teachers, students, seeds, smoke)
    pictures = _draw_pictures(out_dir, tables, teachers, exports, students)
    say(f"[demo] table: {out_dir / 'results.md'}; pictures: {', '.join(map(str, pictures))}")
    say(
        f"[demo] the MAE teacher is cached in {teachers['mae']['run_dir']} (keyed by its config hash): "
        "later demos reuse it; delete that folder to pre-train again"
    )
    for key, path in stable.items():
        which = "MAE" if key == "mae" else key
        named = Path(DEMO_OUT) / DEMO_EXPORTS[key]
        use = "the path" if Path(path) == named else f"given in place of {named}, the path"
        say(
            f"[demo] the {which} teacher's export: {path} (teacher.spec=local-dir:{path}, {use} the demo "
            "recipes and the documentation's examples use)"
        )
    first_seed = {LABELS[k]: v[0] for k, v in students.results.items()}
    return {**{v["label"]: v for v in teachers.values()}, **first_seed}


@dataclass
class _Students:
    """Each row's results and per-image correctness per seed; the first seed's run folders (the pictures')."""

    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    correct: dict[str, list] = field(default_factory=dict)
    runs_by_table: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, row: RowSpec, cfg: TrainConfig, res: dict, k: int) -> None:
        """A row's result, its per-image correctness and (first seed) its run folder in each of its tables."""
        self.results.setdefault(row.key, []).append({**res, "label": row.label, "run_dir": cfg.run_dir})
        self.correct.setdefault(row.key, []).append(per_image_correct(cfg, res["config_digest"]))
        for t, runs in self.runs_by_table.items():
            if k == 0 and row.table in (None, t):
                runs[row.label] = cfg.run_dir


def _train_students(
    out_dir: Path,
    tables: list[str],
    exports: dict[str, Path],
    seeds: int,
    budget_steps: int | None,
    progress: list[str],
) -> _Students:
    """Every `ROWS` run the tables need, once per seed; the rows of one teacher run as one study, which pays
    for the teacher's forward once a batch and ends each student where it ends trained alone."""
    students = _Students(runs_by_table={t: {} for t in tables})
    for k in range(seeds):
        studies: dict[str, list[tuple[RowSpec, TrainConfig]]] = {}
        for row in ROWS:
            if row.table not in (None, *tables):
                continue
            cfg = _keyed(
                out_dir, row.key, row.recipe, _row_overrides(row, k, exports, budget_steps, progress)
            )
            if row.teacher:
                studies.setdefault(row.teacher, []).append((row, cfg))
                continue
            res = _run(cfg, row.label if seeds == 1 else f"{row.label} (seed {k + 1})")
            students.add(row, cfg, res, k)
        for teacher, rows in studies.items():
            for (row, _), (cfg, res) in zip(rows, _run_study(out_dir, teacher, rows, k, seeds), strict=True):
                students.add(row, cfg, res, k)
    return students


def _row_overrides(
    row: RowSpec, k: int, exports: dict[str, Path], budget_steps: int | None, progress: list[str]
) -> list[str]:
    """The keys the demo sets on a row's recipe: its seed, its teacher or initial weights, the budget."""
    over = [*progress, f"seed={load_config(row.recipe).seed + k}"]
    if row.teacher:
        over.append(f"teacher.spec=local-dir:{exports[row.teacher]}")
    if row.init:
        over.append(f"model.init=local-dir:{exports[row.init]}")
    if budget_steps:
        over.append(f"schedule.max_steps={budget_steps}")
    return over


def _run_study(
    out_dir: Path, teacher: str, rows: list[tuple[RowSpec, TrainConfig]], k: int, seeds: int
) -> list[tuple[TrainConfig, dict]]:
    """The rows of one teacher as one study, each row a student of what its recipe changes from the first's.
    A student's time is its own plus an equal share of what the study paid once for all."""
    base = rows[0][1]
    students = tuple(
        Student(row.key, {key: v for key, (_, v) in config_changes(base, cfg).items() if key != "run_dir"})
        for row, cfg in rows
    )
    digest = hashlib.sha256(
        str(StudySpec(dataclasses.replace(base, run_dir=""), students)).encode()
    ).hexdigest()
    spec = StudySpec(
        dataclasses.replace(base, run_dir=str(out_dir / f"{teacher}_study-{digest[:8]}")), students
    )
    configs = [cfg for _, cfg in spec.configs()]
    labels = ", ".join(row.label for row, _ in rows) + ("" if seeds == 1 else f" (seed {k + 1})")
    cached = Path(spec.run_dir) / "result.json"
    if cached.exists() and json.loads(cached.read_text()).get("config_digest") == digest:
        say(f"[demo] {labels}: reusing {spec.run_dir} (same config hash; delete it to rebuild)")
        return list(zip(configs, json.loads(cached.read_text())["students"], strict=True))
    say(f"[demo] {labels}: one study from the {teacher} teacher -> {spec.run_dir}")
    outcome = study(spec)
    record = json.loads((Path(spec.run_dir) / STUDY_RECORD).read_text())
    shared = (record.get("shared_seconds") or 0.0) / len(configs)
    results = [
        _result_of(o.result, cfg, row.label, entry["seconds"] + shared)
        for o, cfg, (row, _), entry in zip(outcome.students, configs, rows, record["students"], strict=True)
    ]
    atomic_write_json(cached, {"config_digest": digest, "students": results})
    return list(zip(configs, results, strict=True))


def _write_tables(
    out_dir: Path,
    tables: list[str],
    teachers: dict[str, dict],
    students: _Students,
    seeds: int,
    smoke: str | None = None,
) -> None:
    """Print each table with its paired comparisons; save them (results.md) and the rows (results.json).
    ``smoke``: what a --quick demo's tables are, said under the title (its figures read like the demo's)."""
    results, correct = students.results, students.correct
    text = ["# attnxfer demo: animal-mnist (10 classes, 28x28), equal step budget per student\n"]
    text += [f"**{smoke}.**\n"] if smoke else []
    n_val = len(next(iter(correct.values()))[0])
    note = (
        f"95 % intervals: Wilson, on the {n_val} validation images. Paired: McNemar's exact test on the "
        "images exactly one of the two runs gets right (same seed, same images)."
    )
    for t in tables:
        keys = [r.key for r in ROWS if r.key in results and r.table in (None, t)]
        rows = {LABELS[k]: results[k] for k in keys}
        scores = {LABELS[k]: correct[k] for k in keys}
        teacher = teachers[t]
        if teacher.get("metric", "val_top1") == "val_top1":  # the teacher is a row of the table
            table = results_table({teacher["label"]: [teacher], **rows}, {teacher["label"]: [], **scores})
        else:  # an MAE teacher has no top-1: a line of its own under the students' table
            table = results_table(rows, scores) + (
                f"\n\nTeacher: {teacher['label']}, val masked-patch loss {teacher['val']:.3f}, "
                f"{teacher['steps']} steps, {teacher['seconds']:.0f} s."
            )
        pairs = [(LABELS[a], LABELS[b]) for a, b in table_pairs(t, keys)]
        paired = paired_table(scores, pairs, list(range(1, seeds + 1)))
        say(f"\n{TABLES[t]}:\n{table}\n\n{paired}\n")
        text.append(f"## {TABLES[t]}\n\n{table}\n\nPaired comparisons:\n\n{paired}\n")
    say(note)
    text.append(note + "\n")
    (out_dir / "results.md").write_text("\n".join(text))
    (out_dir / "results.json").write_text(
        json.dumps(
            {"teachers": teachers, "rows": {LABELS[k]: v for k, v in results.items()}, "seeds": seeds},
            indent=2,
        )
    )


def _draw_pictures(
    out_dir: Path,
    tables: list[str],
    teachers: dict[str, dict],
    exports: dict[str, Path],
    students: _Students,
) -> list[Path]:
    """Curves per table, the MAE table's class-token maps and per-layer agreement."""
    runs = students.runs_by_table
    pictures = [
        _plot_curves(out_dir, runs[t], teachers[t].get("val_top1"), "curves" if t == "mae" else f"curves_{t}")
        for t in tables
    ]
    pictures.append(_plot_attention(out_dir, str(exports["mae"]), runs["mae"]))
    against = {
        LABELS[k]: runs["mae"][LABELS[k]] for k in ("scratch", "copy", "distill") if k in students.results
    }
    pictures.append(demo_agreement(out_dir, exports["mae"], against))  # per-layer agreement vs the teacher
    return pictures
