"""``attnxfer demo``: the paper's effect on a real dataset, on a laptop CPU, in about ten minutes.

1. Train a small ViT teacher on animal-mnist (reused when already trained), export it
   in timm's Hub format.
2. With one equal step budget each, train the same student architecture from scratch,
   by attention copy, and by attention distillation from that teacher.
3. Print and save a table (val top-1 and time per run), the validation curves and a
   picture of attention maps.

Every run is an ordinary attnxfer run directory (resumable, exportable); the recipes
are the built-in ``demo/*`` configs.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..checkpoints.export import export_run
from ..checkpoints.store import CheckpointManager, atomic_write_json
from ..config import TrainConfig, dump_config, load_config
from ..data import build_dataset
from ..models import attention_maps, make_transfer_aware
from ..sources.teacher import load_teacher
from ..train.metrics import read_metrics
from ..transfer.plan import MODES
from .inspect import demo_agreement
from .run_parts import build_student
from .seed_stats import paired_table, per_image_correct, results_table
from .training import train

__all__ = ["STUDENTS", "run_demo"]

STUDENTS = ("scratch", "copy", "distill")
_LABELS = {"scratch": "scratch", "copy": "attention copy", "distill": "attention distillation"}
#: paired comparisons the demo reports (McNemar on the same validation images)
PAIRS = (
    ("attention copy", "attention distillation"),
    ("attention copy", "scratch"),
    ("attention distillation", "scratch"),
)
_QUICK_TEACHER_STEPS = 60
_QUICK_STUDENT_STEPS = 30


def _digest(cfg: TrainConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


def _run(cfg: TrainConfig, label: str) -> dict[str, float]:
    """Train (or resume/reuse) one run; the result is cached beside it as result.json."""
    result_path = Path(cfg.run_dir) / "result.json"
    digest = _digest(cfg)
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        if cached.get("config_digest") == digest:
            print(f"[demo] {label}: reusing {cfg.run_dir} (val top1 {cached['val_top1']:.2f})", flush=True)
            return cached
    print(f"[demo] {label}: training -> {cfg.run_dir}", flush=True)
    start = time.monotonic()
    res = train(cfg)
    seconds = time.monotonic() - start
    out = {
        "label": label,
        "val_top1": res.final.get("val_top1", float("nan")),
        "best_top1": res.best_top1,
        "steps": res.steps,
        "seconds": round(seconds, 1),
        "config_digest": digest,
        "run_dir": cfg.run_dir,
    }
    atomic_write_json(result_path, out)
    return out


def _plot_curves(out: Path, runs: dict[str, str], teacher_top1: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run_dir in runs.items():
        recs = read_metrics(run_dir, "val")
        if recs:
            ax.plot([r["step"] for r in recs], [r["val_top1"] for r in recs], marker="o", label=label)
    ax.axhline(teacher_top1, color="gray", linestyle="--", label=f"teacher ({teacher_top1:.1f}%)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("animal-mnist: students with an equal step budget")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_attention(out: Path, teacher_dir: str, student_runs: dict[str, str]) -> Path | None:
    """Class-token attention of the last block: teacher vs each student, on a few val images."""
    import torch

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    teacher, _ = load_teacher(f"local-dir:{teacher_dir}")
    val = build_dataset("animal_mnist", "val")
    x = torch.stack([val[i][0] for i in (0, 150, 420, 777)])
    models = {"teacher": teacher}
    for label, run_dir in student_runs.items():
        info = CheckpointManager(run_dir).latest()
        if info is None:
            continue
        mode = json.loads((Path(run_dir) / "run.json").read_text()).get("mode")
        if mode in MODES and MODES[mode].teacher_at_eval:
            models[f"{label}\n(= teacher's maps)"] = teacher  # a copy student attends with the teacher's q, k
            continue
        cfg = load_config(str(Path(run_dir) / "config.yaml"))
        student = build_student(cfg, teacher, 10, 1, 28)
        tensors, _ = CheckpointManager(run_dir).load(info)
        student.load_state_dict(tensors["model"])
        models[label] = make_transfer_aware(student).eval()
    last = len(teacher.blocks) - 1
    fig, axes = plt.subplots(len(x), len(models) + 1, figsize=(1.6 * (len(models) + 1), 1.6 * len(x)))
    maps = {name: attention_maps(m, x, [last])[last] for name, m in models.items()}
    grid = teacher.patch_embed.grid_size
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


def run_demo(
    out: str = "runs/demo",
    budget_steps: int | None = None,
    teacher_steps: int | None = None,
    quick: bool = False,
    seeds: int = 1,
) -> dict[str, dict[str, float]]:
    """Run the whole demo; returns the table rows (first seed). Reuses finished runs with the same recipe.

    ``seeds`` > 1 trains every student once per seed (the teacher once) and reports mean ± std and
    paired McNemar tests per seed."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_steps = teacher_steps or (_QUICK_TEACHER_STEPS if quick else None)
    budget_steps = budget_steps or (_QUICK_STUDENT_STEPS if quick else None)
    progress = ["log.progress=false"] if quick else []

    t_over = [f"run_dir={out_dir / 'teacher'}", *progress]
    if teacher_steps:
        t_over.append(f"schedule.max_steps={teacher_steps}")
    tcfg = load_config("demo/teacher", t_over)
    teacher = _run(tcfg, "teacher")
    export_dir = out_dir / "teacher" / "export"
    stamp = export_dir / "attnxfer_source.json"
    if not (
        stamp.exists() and json.loads(stamp.read_text()).get("config_digest") == teacher["config_digest"]
    ):
        export_run(tcfg.run_dir, export_dir, weights="raw", checkpoint="best", overwrite=True)
        atomic_write_json(stamp, {"config_digest": teacher["config_digest"]})

    # Students: one per seed (the recipe's seed, +1, ...); the teacher is trained once. The first seed
    # keeps the single-seed layout (OUT/NAME), so a later --seeds N reuses those runs.
    rows: dict[str, list[dict]] = {}
    correct: dict[str, list] = {"teacher": [per_image_correct(tcfg, teacher["config_digest"])]}
    runs = {}
    for k in range(seeds):
        for name in STUDENTS:
            base = load_config(f"demo/{name}")
            seed = base.seed + k
            over = [
                f"run_dir={out_dir / (name if k == 0 else f'{name}_seed{seed}')}",
                f"seed={seed}",
                *progress,
            ]
            if name != "scratch":
                over.append(f"teacher.spec=local-dir:{export_dir}")
            if budget_steps:
                over.append(f"schedule.max_steps={budget_steps}")
            cfg = load_config(f"demo/{name}", over)
            label = _LABELS[name]
            res = _run(cfg, label if seeds == 1 else f"{label} (seed {seed})")
            rows.setdefault(label, []).append(res)
            correct.setdefault(label, []).append(per_image_correct(cfg, res["config_digest"]))
            if k == 0:
                runs[label] = cfg.run_dir

    teacher_label = "teacher (trained from scratch, supervised)"
    table = results_table({teacher_label: [teacher], **rows}, {teacher_label: correct["teacher"], **correct})
    paired = paired_table(correct, PAIRS, [load_config("demo/copy").seed + k for k in range(seeds)])
    n_val = len(correct["teacher"][0])
    note = (
        f"95 % intervals: Wilson, on the {n_val} validation images. Paired: McNemar's exact test on the "
        "images exactly one of the two runs gets right (same seed, same images)."
    )
    print("\n" + table + "\n\n" + paired + "\n\n" + note + "\n", flush=True)
    (out_dir / "results.md").write_text(
        "# attnxfer demo: animal-mnist (10 classes, 28x28), equal step budget per student\n\n"
        + table
        + "\n\n## Paired comparisons\n\n"
        + paired
        + "\n\n"
        + note
        + "\n"
    )
    (out_dir / "results.json").write_text(
        json.dumps({"teacher": teacher, "students": rows, "seeds": seeds}, indent=2)
    )
    curves = _plot_curves(out_dir, runs, teacher["val_top1"])
    pictures = [p for p in (curves, _plot_attention(out_dir, str(export_dir), runs)) if p]
    pictures.append(demo_agreement(out_dir, export_dir, runs))  # per-layer agreement + distance vs teacher
    print(f"[demo] table: {out_dir / 'results.md'}; pictures: {', '.join(map(str, pictures))}", flush=True)
    return {"teacher": teacher, **{label: results[0] for label, results in rows.items()}}
