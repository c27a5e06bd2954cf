"""`attnxfer search`: discover a formula attention for the teacher (the config becomes `attnxfer.search` objects).

Writes into RUN_DIR the search's state after each generation (a checkpoint: running the same command again
continues from it, as any run resumes), ``candidates.jsonl`` (every candidate), and ``pareto.md`` +
``pareto.png`` (the Pareto front of fit vs speed, and the `attnxfer convert` command for the winner).
Candidates are evaluated here, or by the ``evaluate`` a caller passes (`attnxfer.launch.search_array`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..checkpoints.resume_point import ResumePoint, starts_over
from ..checkpoints.run_lock import run_lock
from ..checkpoints.store import CheckpointManager, atomic_write_text, set_aside
from ..config import SEARCH_RESUMABLE_KEYS, ConfigError, TrainConfig, config_changes, load_config, to_dict
from ..config.overrides import refuse_unread_sections, yaml_value
from ..errors import InputError, did_you_mean
from ..models.attention import SOFTMAX, list_attentions, transferable_attentions
from ..models.efficient.formula import HAND_DESIGNED, FormulaSyntaxError, parse_formula
from ..models.efficient.hierarchical import is_hierarchical
from ..models.image_input import image_input
from ..run_layout import SEARCH_CANDIDATES, STATE_NAME
from ..search import (
    PREFIX,
    CandidateEvaluator,
    FitSettings,
    SearchSettings,
    SearchState,
    SpeedSettings,
    cache_teacher,
    pareto_front,
    run_search,
)
from ..speak import progress_bar, say, warn
from ..train.runtime import resolve_device
from ..train.stop import StopRequested, stop_on_signals, stop_signal
from ..transfer.selection import beside
from .run.loaders import dataset_size, first_images
from .run.parts import build_run_parts
from .run.resume import check_teacher_content, judge, teacher_where_it_was

_VERSION = 1
#: keys no part of a search reads (it fits in fp32 with torch's default kernels and mixes no labels; it saves
#: after each generation, and resumes only on the data it recorded)
_UNREAD_BY_SEARCH = (
    "checkpoint.every_",
    "checkpoint.allow_new_data",
    "teacher.dtype",
    "teacher.compile",
    "model.",
    "transfer.",
    "optim.",
    "schedule.",
    "ema.",
    "aug.mixup",
    "aug.cutmix",
    "precision",
    "deterministic",
)


@dataclass
class SearchResult:
    run_dir: str
    state: SearchState
    front: list[dict[str, Any]]
    winner: dict[str, Any] | None
    command: str | None


def _seed_formulas(cfg: TrainConfig) -> dict[str, str]:
    """label -> ``formula:...`` of generation 0 (a formula, or the name of a zoo attention it writes); an
    unparsable seed stops here, naming the position."""
    if cfg.search.seeds is None:
        return dict(HAND_DESIGNED)
    by_text = {v: k for k, v in HAND_DESIGNED.items()}
    seeds: dict[str, str] = {}
    for i, text in enumerate(cfg.search.seeds):
        text = HAND_DESIGNED.get(text, text)  # a zoo attention the grammar writes, by its name (hedgehog)
        try:
            formula = parse_formula(text.removeprefix(PREFIX))
        except FormulaSyntaxError as e:
            why: object = e  # a bare name is told what it is, not a formula's syntax
            if text in list_attentions():
                why = f"{text!r} is a zoo attention that no formula writes"
            elif text.isidentifier():  # a misspelt seed
                why = f"{text!r} names no seed{did_you_mean(text, HAND_DESIGNED)}"
            raise ConfigError(
                f"search.seeds[{i}]: {why} (seeds are formulas, e.g. 'sum(relu)', or name one of: "
                f"{', '.join(HAND_DESIGNED)})"
            ) from None
        name = PREFIX + str(formula)
        seeds[by_text.get(name, f"seed{i}")] = name
    return seeds


def search_settings(cfg: TrainConfig, teacher: torch.nn.Module) -> SearchSettings:
    s = cfg.search
    # a hierarchical teacher's grid changes by stage: candidates that do not fit a stage fail at fit time
    grid = None if is_hierarchical(teacher) else image_input(teacher).grid or None
    return SearchSettings(
        population=s.population,
        offspring=s.offspring,
        generations=s.generations,
        crossover_prob=s.crossover_prob,
        seed=cfg.seed,
        head_dim=transferable_attentions(teacher)[0].head_dim,
        grid=(int(grid[0]), int(grid[1])) if grid is not None else None,
        seeds=_seed_formulas(cfg),
    )


def build_evaluator(cfg: TrainConfig) -> tuple[CandidateEvaluator, Any]:
    """The teacher, its cached signals and the fitness settings of ``cfg`` as one evaluator (and the parts)."""
    if not cfg.teacher.spec:
        raise InputError("attnxfer search needs a teacher: set teacher.spec (timm name, hf-hub:, local-dir:)")
    # The data comes with the teacher's normalisation; the "student" of the run parts is the teacher itself
    # (each candidate is a copy of it with the formula swapped in).
    parts = build_run_parts(cfg, student_fn=lambda teacher, num_classes: teacher)
    teacher = parts.teacher
    device = resolve_device(cfg.device)
    teacher.to(device=device, dtype=torch.float32).eval()
    s, depth = cfg.search, len(transferable_attentions(teacher))
    layers = list(range(depth)) if s.layers is None else sorted(set(s.layers))
    if not layers or max(layers) >= depth:
        which = "names no block (null: every block)" if not layers else "names a block the teacher lacks"
        raise ConfigError(f"search.layers={s.layers} {which}: the teacher has blocks 0..{depth - 1}")
    fit_images = [x.to(device) for x in first_images(parts.train_loader, batches=s.fit_batches)]
    held_out = [x.to(device) for x in first_images(parts.val_loader, s.held_out_images)]
    if len(fit_images) < s.fit_batches:
        raise InputError(
            f"search.fit_batches={s.fit_batches} batches of data.batch_size={cfg.data.batch_size} is more "
            f"than the training set holds ({len(fit_images)} batches); lower either"
        )
    speed = SpeedSettings(tokens=s.target_tokens, mode=s.speed, repeats=s.speed_repeats)
    try:
        speed.token_layout(teacher)
    except InputError as e:
        raise ConfigError(f"search.target_tokens: {e}") from None
    cache = cache_teacher(teacher, fit_images, held_out, layers)
    fit = FitSettings(steps=s.fit_steps, lr=s.fit_lr, train=s.fit_train, seed=cfg.seed)
    return CandidateEvaluator(teacher, cache, fit, speed), parts


def evaluate_batch(cfg: TrainConfig, names: list[str]) -> list[dict[str, Any]]:
    """Evaluate ``names`` from scratch in this process: what one task of a SLURM job array runs."""
    evaluator, _ = build_evaluator(cfg)
    return [evaluator(name) for name in names]


def _resume_point(cfg: TrainConfig, run_dir: Path) -> ResumePoint | None:
    """The search's newest saved generation, judged by the search's rule (`SEARCH_RESUMABLE_KEYS`)."""
    _adopt_older_layout(run_dir)
    point = ResumePoint.find(run_dir, cfg.checkpoint.resume)
    return judge(
        point, cfg, resumable=SEARCH_RESUMABLE_KEYS, run_dir=run_dir, what="search", command="search"
    )


def _adopt_older_layout(run_dir: Path) -> None:
    """A search saved before searches saved through the checkpoint store kept its state in RUN_DIR/state.json:
    save it as the store's checkpoint of its generation (the old file stays), so it resumes like any other."""
    old = run_dir / STATE_NAME
    manager = CheckpointManager(run_dir)
    if not old.is_file() or manager.latest(verify_hash=False) is not None:
        return
    try:
        data = json.loads(old.read_text(encoding="utf-8"))
        generation = int(data["state"]["generation"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read {old}: {e}; move it away to start a new search") from None
    manager.save(max(generation, 0), {}, data)


def _save(cfg: TrainConfig, run_dir: Path, state: SearchState, teacher: dict[str, Any] | None) -> None:
    """Checkpoint the generation (the config, the teacher's record: a resume compares its weights by hash, the
    state) and write the candidates."""
    data = {
        "version": _VERSION,
        "config": to_dict(cfg, "search"),
        "teacher": teacher,
        "state": state.to_dict(),
    }
    CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last).save(
        max(state.generation, 0), {}, data, replace=True
    )
    lines = [json.dumps(c, sort_keys=True) for c in state.candidates.values()]
    atomic_write_text(run_dir / SEARCH_CANDIDATES, "\n".join(lines) + "\n")


def _check_time_budget(cfg: TrainConfig, evaluator: CandidateEvaluator, settings: SearchSettings) -> float:
    """Seconds generation 0 takes here (fit + speed of the first seed, times its candidates: the seeds, then
    random formulas up to the population); refuses a budget that cannot fit it (a search stopped before it has
    nothing to report)."""
    first = next(iter(settings.seeds.values()))
    start = time.monotonic()
    evaluator(first)
    seconds = time.monotonic() - start
    budget, seeds = cfg.search.time_budget_min, len(settings.seeds)
    count = max(settings.population, seeds)
    if budget is not None and budget * 60.0 < seconds * count:
        raise ConfigError(
            f"search.time_budget_min={budget:g} ({budget * 60:.1f} s) cannot fit generation 0, its {count} "
            f"candidates (search.population={settings.population}, at least the {seeds} seed formulas): fitting "
            f"and timing one ({first}) took {seconds:.1f} s here (search.fit_steps={cfg.search.fit_steps}, "
            f"search.speed_repeats={cfg.search.speed_repeats}). Raise search.time_budget_min to at least "
            f"{seconds * count / 60 * 2:.2g}, or lower search.fit_steps; nothing was written"
        )
    return seconds * count


def winner_of(front: list[dict[str, Any]], min_speed: float) -> dict[str, Any] | None:
    """The best fit among front members at least ``min_speed`` times as fast as softmax (else the best fit)."""
    fast = [c for c in front if c["speed"] >= min_speed] or front
    return min(fast, key=lambda c: c["kl"]) if fast else None


def _zoo_label(c: dict[str, Any]) -> str:
    return c["origin"][4:] if c["origin"].startswith("zoo:") else ""


def _fastest_of(front: list[dict[str, Any]], min_speed: float) -> str:
    """``the fastest is 1.429x``: the front's fastest member, short of ``min_speed``, with the digits that keep
    it short as printed (the table's two decimals, or a fixed four, may round 1.42996 up to a bar of 1.43)."""
    return f"the fastest is {beside(max(c['speed'] for c in front), min_speed)}"


def render_pareto_md(cfg: TrainConfig, state: SearchState, front, winner, command, held_out: int) -> str:
    """pareto.md; ``held_out``: the images the KL was measured on (search.held_out_images, or the whole
    validation split where it has fewer)."""
    s = cfg.search
    unit = "x softmax (FLOPs)"
    if s.speed != "flops":  # a time is of a device: this process's (a resumed search's earlier ones, its own)
        device = resolve_device(cfg.device)
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        unit = f"x softmax (time: batch 1 on {device.type}{threads}, median of {s.speed_repeats} interleaved repeats)"
    cands = list(state.candidates.values())
    ok = state.evaluated
    before = [c for c in cands if c["status"] == "rejected" and c["reason"].startswith("before training")]
    at_fit = [c for c in cands if c["status"] == "rejected" and not c["reason"].startswith("before training")]
    head = ["| formula | KL | speed | origin |", "|---|---:|---:|---|"]
    lines = [
        f"# Formula search: {cfg.teacher.spec}",
        "",
        f"{len(cands)} candidates after generation {state.generation}: {len(ok)} fitted, {len(before)} rejected "
        f"before training, {len(at_fit)} rejected at fit time; {state.duplicates} duplicates not re-evaluated; "
        + (f"{state.seconds / 60:.1f} min." if state.seconds >= 60 else f"{state.seconds:.0f} s."),
        f"Fit: held-out map KL(teacher ‖ candidate) (nats per row, mean over "
        f"{f'layers {sorted(set(s.layers))}' if s.layers is not None else 'every layer'}) after {s.fit_steps} stage-1 steps (trains "
        f"{s.fit_train}, lr {s.fit_lr:g}) on {held_out} held-out images. Speed: one attention layer at "
        f"{s.target_tokens} tokens, {unit}, > 1 is faster: one layer's ratio, not a whole model's (a "
        "conversion's convert.speedup is the whole model's, its MLPs and embedding included).",
        "",
        "## Pareto front (fit vs speed)",
        "",
        *head,
    ]
    row = "| `{formula}` | {kl:.4f} | {speed:.2f} | {origin} |"
    lines += [row.format(**c) for c in front]
    best = sorted(ok, key=lambda c: c["kl"])[:10]
    lines += ["", f"## Top {len(best)} formulas by fit", "", *head]
    lines += [row.format(**c) for c in best]
    lines += [
        "",
        "## The hand-designed zoo as formulas",
        "",
        "| member | formula | KL | speed |",
        "|---|---|---:|---:|",
    ]
    for c in filter(_zoo_label, cands):
        kl, sp = (f"{c['kl']:.4f}", f"{c['speed']:.2f}") if c["status"] == "ok" else ("rejected", c["reason"])
        lines.append(f"| {_zoo_label(c)} | `{c['formula']}` | {kl} | {sp} |")
    if winner is not None:
        lines += [
            "",
            "## Winner",
            "",
            f"`{winner['formula']}`: KL {winner['kl']:.4f}, speed {winner['speed']:.2f} (the best fit on the front "
            + (
                f"among members at least {s.min_speed:g}x as fast as softmax"
                if winner["speed"] >= s.min_speed
                else f"of all: none of its members is {s.min_speed:g}x as fast as softmax (search.min_speed; "
                f"{_fastest_of(front, s.min_speed)})"
            )
            + "). Convert the teacher with it:",
            "",
            "```bash",
            command,
            "```",
        ]
    return "\n".join(lines) + "\n"


def draw_pareto(state: SearchState, front: list[dict[str, Any]], speed_mode: str) -> Figure:
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = state.evaluated
    ax.scatter([c["speed"] for c in ok], [c["kl"] for c in ok], s=14, c="0.7", label="candidates")
    ax.plot(
        [c["speed"] for c in front], [c["kl"] for c in front], "o-", c="tab:red", ms=5, label="Pareto front"
    )
    for c in filter(_zoo_label, ok):
        ax.scatter([c["speed"]], [c["kl"]], marker="*", s=120, c="tab:blue", zorder=3)
        ax.annotate(
            _zoo_label(c), (c["speed"], c["kl"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.scatter([], [], marker="*", s=120, c="tab:blue", label="hand-designed zoo")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"speed vs softmax, one layer ({speed_mode}; right is faster)")
    ax.set_ylabel("held-out map KL after stage 1 (lower fits better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


#: what the winner's conversion takes from the search instead of its recipe: the teacher, and the data searched on
_CARRIED = (
    "teacher.",
    "data.dataset",
    "data.root",
    "data.img_size",
    "data.in_chans",
    "data.mean",
    "data.std",
    "data.kwargs",
    "data.labels",
    "data.seed",
)


def winner_command(cfg: TrainConfig, formula: str, depth: int, train_images: int | None = None) -> str:
    """The `attnxfer convert` that turns the search's teacher into ``formula`` on the data it was searched on:
    ``search.convert_recipe`` with the search's teacher and data keys where they differ from the recipe's, the
    formula (whose name holds all its options: the recipe's attention_kwargs are dropped) in the layers searched
    (``depth``: the teacher's attention layers; the others keep softmax), the stage-1 training its candidates
    were fitted with, and a run folder of the formula's own. A recipe's batch over the searched training set
    (``train_images``) would give its stages no batch: the search's own data.batch_size, which fitted, replaces it."""
    recipe, layers = cfg.search.convert_recipe, cfg.search.layers
    attention = (
        formula if layers is None else yaml_value([formula if i in layers else SOFTMAX for i in range(depth)])
    )
    recipe_cfg = load_config(recipe)
    carried = [
        f"{key}={yaml_value(value)}"
        for key, (_, value) in config_changes(recipe_cfg, cfg).items()
        if key.startswith(_CARRIED)
    ]
    batches = {
        "data.batch_size": recipe_cfg.data.batch_size,
        "convert.stage1_batch_size": recipe_cfg.convert.stage1_batch_size,
    }
    carried += [
        f"{key}={cfg.data.batch_size}"
        for key, batch in batches.items()
        if train_images is not None and batch is not None and batch > train_images
    ]
    parts = [
        *("attnxfer", "convert", "-c", recipe, *carried),
        f"convert.attention={attention}",
        "convert.attention_kwargs={}",
        f"convert.stage1_train={cfg.search.fit_train}",
        # a folder per formula: a later search's other winner is not refused as a change of an earlier one
        f"run_dir={Path(cfg.run_dir) / ('winner-' + hashlib.sha256(formula.encode()).hexdigest()[:8])}",
    ]
    return " ".join(shlex.quote(p) for p in parts)


def write_reports(
    cfg: TrainConfig, run_dir: Path, state: SearchState, held_out: int, depth: int, train_images: int | None
) -> tuple[list, Any, str | None]:
    front = pareto_front(state)
    winner = winner_of(front, cfg.search.min_speed)
    command = None if winner is None else winner_command(cfg, winner["formula"], depth, train_images)
    atomic_write_text(run_dir / "pareto.md", render_pareto_md(cfg, state, front, winner, command, held_out))
    if front:
        draw_pareto(state, front, cfg.search.speed).savefig(run_dir / "pareto.png")
    return front, winner, command


def search(
    cfg: TrainConfig,
    *,
    evaluate: Callable[[list[str]], list[dict[str, Any]]] | None = None,
) -> SearchResult:
    """Run (or continue) the search ``cfg`` describes, holding the run dir's lock; ``evaluate`` replaces
    evaluation in this process."""
    try:  # the winner's recipe: refused here if missing or not a conversion's, not after the search
        refuse_unread_sections(load_config(cfg.search.convert_recipe), "convert")
    except ConfigError as e:
        raise ConfigError(f"search.convert_recipe={cfg.search.convert_recipe}: {e}") from None
    unread = [k for k in config_changes(TrainConfig(), cfg) if k.startswith(_UNREAD_BY_SEARCH)]
    if unread:  # silently dropped otherwise (schedule.max_steps=2 would not shorten the search)
        saving = [k for k in unread if k.startswith("checkpoint.")]
        why = [
            (
                "each candidate is the teacher with the formula swapped in, fitted as the search section says: "
                "search.fit_steps, search.fit_lr",
                len(saving) < len(unread),
            ),
            (
                "it saves after each generation, keeping the newest checkpoint.keep_last, and resumes only on the "
                "data it recorded",
                bool(saving),
            ),
        ]
        raise ConfigError(
            f"attnxfer search does not read {', '.join(unread)} ({'; '.join(w for w, on in why if on)}): "
            f"remove {'it' if len(unread) == 1 else 'them'}"
        )
    with run_lock(cfg.run_dir, "search"):
        torch.manual_seed(cfg.seed)
        run_dir = Path(cfg.run_dir)
        point = _resume_point(cfg, run_dir)
        state = SearchState() if point is None else SearchState.from_dict(point.record("state"))
        if point is not None:
            say(
                f"search: resuming {point.path} after generation {state.generation} ({len(state.candidates)} candidates)"
            )
        with teacher_where_it_was(run_dir, point is not None):
            evaluator, parts = build_evaluator(cfg)
        # the same teacher under another spelling or path resumes; other weights are refused before any write
        check_teacher_content(point, parts.teacher_record, cfg.teacher.spec, run=run_dir)
        settings = search_settings(cfg, parts.teacher)
        depth = len(transferable_attentions(parts.teacher))
        train_images = dataset_size(parts.train_loader)
        say(
            f"search: {settings.population} kept per generation, {settings.offspring} children per generation, "
            f"{settings.generations} generation{'s' if settings.generations != 1 else ''} after the {len(settings.seeds)} seeds; candidates fitted "
            f"{cfg.search.fit_steps} stage-1 steps on layers {evaluator.cache.layers}, scored on "
            f"{evaluator.cache.held_out_images} held-out images; speed at {cfg.search.target_tokens} tokens "
            f"({cfg.search.speed})"
        )
        if point is not None and state.generation >= settings.generations:  # fewer asked than were run
            say(
                f"search: generation {state.generation} was reached already (search.generations="
                f"{settings.generations}): no candidate is added; the reports are written from all "
                f"{len(state.candidates)}"
            )
        first_generation = (
            _check_time_budget(cfg, evaluator, settings)
            if state.generation < 0 and cfg.search.time_budget_min is not None
            else None
        )
        # starting over keeps the earlier search aside, as convert does: the next auto must not resume it
        if starts_over(cfg.checkpoint.resume):
            reports = [run_dir / SEARCH_CANDIDATES, run_dir / "pareto.md", run_dir / "pareto.png"]
            for old in [p for p in [*CheckpointManager(run_dir).step_dirs(), *reports] if p.exists()]:
                warn(f"checkpoint.resume=none: kept the earlier {old.name} as {set_aside(old, 'replaced')}")
        run_dir.mkdir(parents=True, exist_ok=True)
        before, ends = state.seconds, []  # seconds of earlier processes; of this one at each generation's end

        def evaluated_here(names: list[str]) -> list[dict[str, Any]]:
            out = []
            for name in names:
                out.append(evaluator(name))
                bar.update(1)
            return out

        def saved(s: SearchState) -> None:
            ends.append(time.monotonic() - started)
            s.seconds, s.last_seconds = before + ends[-1], ends[-1] - (ends[-2] if len(ends) > 1 else 0.0)
            _save(cfg, run_dir, s, parts.teacher_record)
            write_reports(cfg, run_dir, s, evaluator.cache.held_out_images, depth, train_images)
            bar.update(max(0, len(s.candidates) - bar.n))

        def should_stop(s: SearchState) -> str | None:
            """Stop before a generation that would end after the time budget (the last one's length as guess);
            after SIGTERM (a job's time limit or preemption), stop with the generation just saved."""
            signum = stop_signal()
            if signum is not None and s.generation >= 0:
                saved_at = CheckpointManager(run_dir).path_for(s.generation)
                raise StopRequested(signum, s.generation, str(saved_at), settings.generations, "generation")
            budget = cfg.search.time_budget_min
            if budget is None:
                return None
            spent = before + time.monotonic() - started
            # a resumed search's guess is the generation its checkpoint recorded, as the stopped process's was
            last = s.last_seconds if s.generation >= 0 else first_generation or 0.0
            if spent + last > budget * 60:
                return f"the next generation would end after search.time_budget_min={budget:g} ({spent / 60:.1f} min spent)"
            return None

        with _progress_bar(cfg, settings, state) as bar, stop_on_signals():
            started = time.monotonic()
            state = run_search(
                state, settings, evaluate or evaluated_here, on_generation=saved, should_stop=should_stop
            )
        if state.generation < 0:
            raise InputError("the search stopped before generation 0: nothing to report")
        front, winner, command = write_reports(
            cfg, run_dir, state, evaluator.cache.held_out_images, depth, train_images
        )
        _save(cfg, run_dir, state, parts.teacher_record)
        if winner is not None:
            slow = winner["speed"] < cfg.search.min_speed  # the best fit of all: say it misses the bar
            short = (
                f"; no member of the front is {cfg.search.min_speed:g}x as fast (search.min_speed; "
                f"{_fastest_of(front, cfg.search.min_speed)})"
            ) * slow
            say(
                f"winner: {winner['formula']} (KL {winner['kl']:.4f}, speed {winner['speed']:.2f}x{short})\n"
                f"  {command}"
            )
        say(f"report: {run_dir / 'pareto.md'} (pareto.png, candidates.jsonl beside it)")
        return SearchResult(str(run_dir), state, front, winner, command)


def _progress_bar(cfg: TrainConfig, settings: SearchSettings, state: SearchState) -> Any:
    """Candidates evaluated out of the search's whole plan (seeds, the first population, every child)."""
    expected = len(settings.seeds) + max(0, settings.population - len(settings.seeds))
    expected += settings.offspring * settings.generations
    return progress_bar(
        expected, initial=len(state.candidates), desc="search", unit="candidate", disable=not cfg.log.progress
    )
