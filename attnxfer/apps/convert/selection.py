"""``convert.attention=auto``: each block softmax or a candidate attention, chosen under a speed budget.

1. **Time** first, so an infeasible budget stops before any training: the teacher, its floor and a student
   with every block of each candidate, interleaved; each block of candidate c saves (teacher - that
   student) / depth, and a hybrid's time is the teacher's minus what its swapped blocks save.
2. **Sensitivity**: each candidate fitted in every block by stage 1, then the teacher with *only one block*
   swapped is compared with the teacher (KL of class probabilities; headless: final features' relative
   error). Not "an all-candidate student with one block given softmax back": the knapsack adds
   sensitivities, true to first order around the model measured, and the teacher is the one model every
   assignment is near; it also charges each block only its own error, not its neighbours' compounding ones.
3. **Choice**: the exact multiple-choice knapsack (`attnxfer.transfer.selection.select`).

A resumed run reads the recorded ``selection.json`` and measures nothing (timings on a loaded machine would
differ). Until then ``selection.partial.json`` keeps the timings and each candidate's sensitivities as they
are measured; SIGTERM or Ctrl-C stops at the next step of a fit (that candidate lost) or between candidates,
and a re-run measures only what it lacks. The fits are measurement only: reusing them would hand stage 2
weights that no stage-1 checkpoint, history or resume accounts for.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoints.atomic_io import atomic_write_json
from ...checkpoints.resume_point import KeyChange, starts_over
from ...config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_changes as changed_from,  # resume's config_changes judges a checkpoint
    to_dict,
)
from ...errors import InputError
from ...models.attention.registry import get_attention_class
from ...models.efficient import GridFitError, build_efficient_student
from ...models.efficient.floor import floor_model
from ...models.efficient.hierarchical import flat_blocks
from ...models.efficient.swap import check_options, refuses_an_option, teacher_token_layout
from ...models.image_input import ImageSizeError, check_image_size, image_input
from ...run_layout import read_record
from ...speak import quiet, say, warn
from ...train.devices import resolve_precision
from ...train.distributed import gather_objects, rank_and_world
from ...train.speed import forward_speed
from ...train.stage1 import stage1_transfer
from ...train.stop import StopRequested, stop_on_signals, stop_signal
from ...train.terms import NonFiniteLossError
from ...train.timing import interleaved_timings
from ...transfer.conversion import ConversionPlan
from ...transfer.selection import (
    SOFTMAX,
    InfeasibleBudget,
    beside,
    fastest,
    reasons,
    select,
    short_of_budget,
)
from ..run.parts import RunParts
from ..run.resume import CHOICE_KEYS, config_changes
from .speed import rebuilt_teacher, speedup_withheld
from .stage1 import STAGE1_KEYS, refuse_another_world, stage1_batches

SELECTION_FILE = "selection.json"
PARTIAL_FILE = "selection.partial.json"  # the measurements so far, until selection.json
AUTO = "auto"
#: the config keys the choice reads: a resume that changes one (unless the key is resumable) is refused
SELECTION_KEYS = (*STAGE1_KEYS, *CHOICE_KEYS)
#: the keys the measurements read (not the budget)
_MEASURED_KEYS = tuple(k for k in SELECTION_KEYS if k != "convert.speedup")

PlanFor = Callable[[TrainConfig, nn.Module], ConversionPlan]


def check_auto(cfg: TrainConfig) -> None:
    """``convert.attention=auto`` needs a budget above 1 and candidates the zoo knows: refused before any work."""
    c = cfg.convert
    if c.attention != AUTO:
        return
    if c.speedup is None:
        raise InputError(
            "convert.attention=auto chooses each block's attention to meet a speed budget, and none was given: "
            "set convert.speedup=S (the student S times faster than the teacher, S > 1)"
        )
    if not c.candidates:
        raise InputError(
            "convert.candidates is empty: list the zoo attentions a block may get, e.g. [relu_linear]"
        )
    for i, name in enumerate(c.candidates):
        # softmax is every block's own; an attention listed again would be fitted and timed again
        if name in (SOFTMAX, AUTO) or name in c.candidates[:i]:
            raise InputError(
                f"convert.candidates lists {name!r}{' twice' if name in c.candidates[:i] else ''}: list zoo "
                "attentions only, each once (softmax is always one)"
            )
        try:
            get_attention_class(name)
        except (KeyError, ValueError) as e:
            raise InputError(f"convert.candidates: {e.args[0]}") from None
    try:
        check_options(list(c.candidates), c.attention_kwargs)
    except TypeError as e:
        raise InputError(f"convert.attention_kwargs: {e}") from None


def _accepts(name: str, option: str) -> bool:
    return get_attention_class(name).accepts_option(option)


def _options(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The ``convert.attention_kwargs`` candidate ``name`` accepts."""
    return {k: v for k, v in cfg.convert.attention_kwargs.items() if _accepts(name, k)}


def _for_tokens(options: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Attention ``options`` for a model timed at ``tokens``: a fixed sequence length (linformer's seq_len) is
    the run's, which a teacher rebuilt at convert.speed_tokens does not have."""
    return {k: tokens if k == "seq_len" else v for k, v in options.items()}


def _candidate(teacher: nn.Module, name: str, options: dict[str, Any]) -> nn.Module:
    """A student of ``teacher`` with every block ``name`` built with ``options``: an option's own refusal (a
    linformer's seq_len other than the model's token count) said under the key the options sit in."""
    try:
        return build_efficient_student(teacher, name, **options)
    except GridFitError as e:  # its option, its default too, larger than the grid
        raise InputError(
            f"convert.candidates: {name}: {e}; set the option in convert.attention_kwargs, or drop {name} from "
            "convert.candidates"
        ) from None
    except InputError as e:  # an option's own refusal names its key, as a plain convert's does
        if not refuses_an_option(e, options):
            raise
        raise InputError(f"convert.attention_kwargs: {e}") from None


def check_candidates(cfg: TrainConfig, teacher: nn.Module, run_side: int) -> None:
    """Each candidate built once at the run's token count, as its fit will build it: a refusal there (a
    linformer's seq_len for another size, a default larger than the grid) stops the run before the candidates
    are timed, not after; so does one of a fixed sequence length where the budget is timed at other tokens
    (its student could not run there). Drawn from no random stream: the choice's students start from the seed
    alone."""
    if cfg.convert.attention != AUTO:
        return
    with torch.random.fork_rng(devices=[]):
        for name in cfg.convert.candidates:
            _candidate(teacher, name, _options(cfg, name))
    tokens, side = speed_geometry(cfg, teacher, run_side)
    for name in cfg.convert.candidates:
        if side != run_side and _accepts(name, "seq_len"):
            prefix, _ = teacher_token_layout(teacher)
            run_tokens = prefix + (run_side // image_input(teacher).patch_size[-1]) ** 2
            raise InputError(
                f"convert.candidates: {name} attends over a fixed sequence of the run's {run_tokens} tokens "
                f"(seq_len), so its student cannot run at the {tokens} tokens the budget is timed at "
                f"(convert.speed_tokens={tokens}); drop {name} from convert.candidates, or time the budget at the "
                "run's tokens (convert.speed_tokens=null)"
            )


def choose_attentions(
    cfg: TrainConfig,
    parts: RunParts,
    device: torch.device,
    *,
    main: bool,
    plan_for: PlanFor,
    others_choose: bool = False,
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``cfg`` with ``convert.attention=auto`` resolved to one name per block, and the selection's record
    (recorded earlier, else measured now; every rank takes rank 0's); other configs as they are.
    ``others_choose``: a study's student beside auto ones, whose choice keys the study set for them."""
    path = Path(cfg.run_dir) / SELECTION_FILE
    if cfg.convert.attention != AUTO:  # the run's own config.yaml (the chosen list) keeps the choice's report
        record = read_record(path)  # a damaged record only decorates the report: none
        own = record if record and record.get("attention") == cfg.convert.attention else None
        if own is not None and isinstance(own.get("config"), dict):
            # the run's own config.yaml given another budget (or candidates, ...): the list was chosen under the
            # recorded values, which config.yaml would stop saying; refused as the auto command with them is
            _recorded(cfg, path, CHOICE_KEYS)
        # keys only a choice reads; an auto run's own config.yaml (its choice recorded) keeps them quietly
        changed = changed_from(TrainConfig(), cfg)
        unread = [f"{k}={changed[k][1]}" for k in CHOICE_KEYS if k in changed]
        if own is None and unread and not others_choose:
            warn(
                f"warning: {', '.join(unread)} unused (read only to choose attentions for convert.attention=auto): "
                f"convert.attention={cfg.convert.attention} is converted as named, whatever its speed"
            )
        return cfg, own
    record = _recorded(cfg, path)
    if record is not None:
        say(f"convert.attention=auto: the choice recorded in {path} is used (nothing measured again)")
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), stop_on_signals():
            record = measure_selection(cfg, parts, device, plan_for, main=main)
        record = gather_objects(record)[0]
        if main:
            atomic_write_json(path, record)
            path.with_name(PARTIAL_FILE).unlink(missing_ok=True)
    names = ", ".join(f"{i}:{n}" for i, n in enumerate(record["attention"]))
    say(
        f"convert.attention=auto: blocks {names}; predicted "
        f"{beside(record['predicted_speedup'], record['speedup'])} the teacher at {record['tokens']:,} tokens "
        f"(budget {record['speedup']:g}x), summed {record['metric']} {record['total_sensitivity']:.3g}"
    )
    # the options of attentions that were not chosen (hedgehog's feature_dim where no block got hedgehog) go
    chosen = set(record["attention"])
    kwargs = {k: v for k, v in cfg.convert.attention_kwargs.items() if any(_accepts(n, k) for n in chosen)}
    return apply_overrides(
        cfg, {"convert.attention": record["attention"], "convert.attention_kwargs": kwargs}
    ), record


def _recorded(
    cfg: TrainConfig, path: Path, compared: tuple[str, ...] = SELECTION_KEYS, world: int | None = None
) -> dict[str, Any] | None:
    """The choice (or measurements) an earlier attempt of this run recorded, judged against ``cfg`` (and
    measurements' fits on ``world`` processes, None: this run's); None: choose (measure) now."""
    if starts_over(cfg.checkpoint.resume) or not path.is_file():
        return None
    record = read_record(path)
    if not isinstance(record.get("config"), dict):
        raise ConfigError(
            f"{path} is not a choice of attentions attnxfer can read (empty, damaged or edited): set "
            "checkpoint.resume=none to choose again (it is kept aside), or choose another run_dir"
        )
    refused = [
        c
        for c in config_changes(record["config"], cfg, compared=compared, command="convert")
        if not c.allowed
    ]
    if refused:  # selection.partial.json holds the measurements a stopped choice had made, not a choice
        held = (
            "measurements for a choice of attentions"
            if path.name == PARTIAL_FILE
            else "a choice of attentions"
        )
        # a finished choice's report shows what its measurements choose at other budgets, before a new run pays
        shown = path.name == SELECTION_FILE and (path.parent / "report.md").is_file()
        budgets = (
            f" ({path.parent / 'report.md'} lists what these measurements choose at other budgets)"
            if shown and any(c.key == "convert.speedup" for c in refused)
            else ""
        )
        raise ConfigError(
            f"{path.parent} already holds {held} ({path.name}) made with different values for: "
            f"{'; '.join(map(str, refused))}. These cannot change when a run resumes; nothing was written. To "
            f"choose again, start a new run elsewhere (run_dir=...) or set checkpoint.resume=none{budgets}; to "
            f"continue this one, give them the values it recorded: {KeyChange.restoring(refused)}"
        )
    # fits are stage 1's, on its global batch: those left would be compared with fits of another; the timings
    # (rank 0's, of one process's batch) are the same on any number of processes
    if record.get("fits"):
        what = f"{path} holds the fits of {', '.join(record['fits'])} (to choose attentions), made"
        world = rank_and_world()[1] if world is None else world
        refuse_another_world(what, record.get("world_size"), world, cfg, "choose again")
    return record


def judge_recorded(cfg: TrainConfig, world: int) -> None:
    """An auto conversion's recorded choice, else the measurements a stopped one made, judged against ``cfg``
    on ``world`` processes as the job judges them (`attnxfer submit` asks before submitting)."""
    if _recorded(cfg, Path(cfg.run_dir) / SELECTION_FILE) is None:
        _recorded(cfg, Path(cfg.run_dir) / PARTIAL_FILE, _MEASURED_KEYS, world)


#: measurements already taken in this process, per teacher and per what they read (a convert study's students
#: differing only in convert.speedup are measured once and choose from the same numbers)
_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _memo(teacher: nn.Module, what: str, cfg: TrainConfig, measure: Callable[[], Any]) -> Any:
    d = to_dict(cfg)
    reads = {k: d[k] for k in ("seed", "precision", "device", "teacher", "data")}
    reads["convert"] = {k: v for k, v in d["convert"].items() if k != "speedup"}
    key = what + json.dumps(reads, sort_keys=True, default=str)
    done = _MEASURED.setdefault(teacher, {})
    if key not in done:
        done[key] = measure()
    return done[key]


def measure_selection(
    cfg: TrainConfig, parts: RunParts, device: torch.device, plan_for: PlanFor, *, main: bool
) -> dict[str, Any]:
    """The module's steps 1-3: the record `selection.json` holds. The measurements go to `PARTIAL_FILE` (rank
    0) as they are taken, and the ones there are used (every rank takes rank 0's)."""
    c, teacher, kept = cfg.convert, parts.teacher, Path(cfg.run_dir) / PARTIAL_FILE
    progress = gather_objects(_recorded(cfg, kept, _MEASURED_KEYS) or {})[0]
    if flat_blocks(teacher) is None:
        raise InputError(
            "convert.attention=auto chooses per block of a flat ViT, and this teacher's attention layers sit in "
            "stages: list convert.attention per stage or per layer instead"
        )
    teacher.to(device=device, dtype=torch.float32).eval()
    start = time.monotonic()
    recorded = progress.get("timing")
    # a version before `block_ms` clamped saved a model timed under its floor as a negative block time
    if recorded:
        recorded = {**recorded, "ms": {n: max(0.0, t) for n, t in recorded["ms"].items()}}
    # every rank judges the budget on rank 0's times (one verdict), as recorded ones memoised: a study shares them
    timing = gather_objects(
        _memo(teacher, "time", cfg, lambda: recorded or time_candidates(cfg, parts, device))
    )[0]
    seconds = progress.get("timing_seconds", time.monotonic() - start)
    depth = len(flat_blocks(teacher))
    ms = {n: timing["ms"][n] for n in c.candidates}
    soft, whole = timing["ms"][SOFTMAX], timing["ms"]["teacher"]
    top = fastest([dict.fromkeys(ms, 0.0)] * depth, ms, soft, whole)
    if top.speedup < c.speedup:
        which = (
            f"all layers {top.names[0]}"
            if top.names[0] != SOFTMAX
            else "the teacher itself: no candidate is faster than softmax there"
        )
        # with no candidate faster than softmax, no budget > 1 can be met: lowering it is no way out
        lower = "lower convert.speedup, " if top.names[0] != SOFTMAX else ""
        raise InputError(
            f"convert.speedup={c.speedup:g} cannot be met: the fastest student of these candidates at "
            f"{timing['tokens']:,} tokens is {beside(top.speedup, c.speedup)} ({which}); {lower}"
            "add faster convert.candidates, or measure at more tokens (convert.speed_tokens)"
        )
    say(
        f"convert.attention=auto: at {timing['tokens']:,} tokens the teacher takes {whole:.3g} ms, a softmax "
        f"block's attention {_block_ms_text(timing, SOFTMAX)}; "
        + ", ".join(f"{n} {_block_ms_text(timing, n)}" for n in ms)
    )
    steps = c.selection_steps or c.stage1_steps
    fits = {n: _memo(teacher, f"fit {n}", cfg, lambda f=f: f) for n, f in progress.get("fits", {}).items()}
    saved = {"timing": timing, "timing_seconds": seconds, "fits": fits, "config": to_dict(cfg, "convert")}
    saved["world_size"] = rank_and_world()[1]  # the processes the fits were made on
    rest = [n for n in c.candidates if n not in fits]
    if progress:
        also = f" and the fits of {', '.join(fits)}" if fits else ""
        say(
            f"convert.attention=auto: the timings{also} recorded in {kept} are used; "
            f"{', '.join(rest) or 'nothing'} left to fit"
        )
    batches = [x.to(device) for x, *_ in itertools.islice(parts.val_loader, c.selection_batches)]
    if len(batches) < c.selection_batches:
        warn(
            f"warning: convert.selection_batches={c.selection_batches}, but the validation split holds "
            f"{len(batches)} batch{'es' if len(batches) != 1 else ''}: the sensitivities are measured on those"
        )
    try:  # None: the timings alone are saved first
        for name in [None, *rest]:
            if name:
                fit = partial(_fitted_sensitivity, cfg, parts, name, steps, device, plan_for, batches)
                fits[name] = _memo(teacher, f"fit {name}", cfg, fit)
            if main:
                atomic_write_json(kept, saved)
            signum = stop_signal()
            if signum:
                raise StopRequested(signum, len(fits), None)
    except StopRequested as e:
        e.args = (
            f"stopped by {e.signal_name} choosing attentions, {len(fits)} of {len(c.candidates)} candidates "
            f"fitted; the timings{' and those fits' if fits else ''} are saved ({kept})",
        )
        raise
    # each block's sensitivity per candidate (a diverged fit's or a non-finite one: infinite)
    columns = {n: [math.inf if v is None else v for v in fits[n]["sensitivity"]] for n in c.candidates}
    sensitivity = [{n: column[i] for n, column in columns.items()} for i in range(depth)]
    failed = {n: fits[n]["failed"] for n in c.candidates if "failed" in fits[n]}
    metric = sensitivities(teacher, {}, [])[0]  # its name only
    try:
        chosen = select(sensitivity, ms, soft, whole, c.speedup)
    except InfeasibleBudget as e:
        # met before the fits: candidates whose fit diverged (at its last step: no error, a non-finite sensitivity)
        lost = [n for n in ms if not all(math.isfinite(row[n]) for row in sensitivity)]
        # with no candidate left faster than softmax (every fit diverged), no budget > 1 can be met: lowering
        # it is no way out, and there is no "other candidate" to name. The fastest student may keep a lost
        # candidate in the blocks where its fit converged
        left = any(n != SOFTMAX for n in e.fastest.names)
        kept = [n for n in lost if n in e.fastest.names]
        where = f", and of {', '.join(kept)} in the blocks where its fit converged," if kept else ""
        others = (
            f"the fastest student of the other candidates{where} is {beside(e.fastest.speedup, c.speedup)}"
            if left
            else "no candidate left is faster than softmax"
        )
        raise InputError(
            f"convert.speedup={c.speedup:g} cannot be met without {', '.join(lost)}, whose fit diverged: "
            f"{others}; lower convert.stage1_lr or set convert.stage1_clip_grad"
            + (", or lower convert.speedup" if left else "")
        ) from None
    # the fastest student the choice could have made: a candidate whose fit diverged in a block is never chosen
    # there, and may be in the others (as `select` and the report's table of other budgets take it)
    reachable = fastest(sensitivity, ms, soft, whole)
    return {
        "version": 2,  # 2: block times read from whole models (`whole_ms`); 1: one block timed alone
        "attention": chosen.names,
        "candidates": list(c.candidates),
        "speedup": c.speedup,
        "metric": metric,
        "sensitivity": [
            {n: (v if math.isfinite(v) else None) for n, v in row.items()} for row in sensitivity
        ],
        "failed": failed,
        "total_sensitivity": chosen.sensitivity,
        "reasons": reasons(chosen, sensitivity, ms, soft, metric),
        "predicted_ms": chosen.predicted_ms,
        "predicted_speedup": chosen.speedup,
        "budget_ms": whole / c.speedup,
        "fastest": {"attention": reachable.names[0], "speedup": reachable.speedup},
        **timing,
        "fit_steps": steps,
        "unfitted": [n for n in c.candidates if fits[n].get("fitted") is False],  # nothing to fit in them
        "seconds": {"timing": seconds, "fits_and_sensitivity": sum(f["seconds"] for f in fits.values())},
        "config": to_dict(cfg, "convert"),
    }


def _fitted_sensitivity(
    cfg: TrainConfig,
    parts: RunParts,
    name: str,
    steps: int,
    device: torch.device,
    plan_for: PlanFor,
    batches: list[torch.Tensor],
) -> dict[str, Any]:
    """Candidate ``name`` fitted in every block by ``steps`` of stage 1, as the run's stage 1 would fit it, then
    its `sensitivities` per block (None: not finite) and the seconds both took; a fit that diverges is left out
    (``failed``: infinite sensitivity). A stop signal ends the fit at a step boundary (`StopRequested`)."""
    start, c, depth = time.monotonic(), cfg.convert, len(flat_blocks(parts.teacher))
    torch.manual_seed(cfg.seed)
    fit_cfg = apply_overrides(cfg, {"convert.attention": name, "convert.stage1_steps": steps})
    student = _candidate(parts.teacher, name, _options(cfg, name)).to(device)
    # what stage 1 would train in it (a plan of steps with nothing to train is refused: the run's own)
    plan = plan_for(apply_overrides(fit_cfg, {"convert.stage1_steps": 0}), student)
    if plan.active:
        plan = plan_for(fit_cfg, student)
    else:
        say(
            f"convert.attention=auto: {name} has nothing to fit under convert.stage1_train={c.stage1_train} (its "
            "sensitivity is measured as swapped in, as stage 1 would leave it); new+qk fits every candidate"
        )
    try:
        with quiet():  # one line per candidate fitted, not the fit's own
            stage1_transfer(
                parts.teacher,
                student,
                plan,
                stage1_batches(cfg, parts, plan.stage1_batch_size, device),
                warmup_steps=c.stage1_warmup_steps,
                weight_decay=c.stage1_weight_decay,
                clip_grad=c.stage1_clip_grad,
                log_every=steps,
                on_save=lambda *_: None,  # nothing to save: a stop signal only ends the fit
            )
    except NonFiniteLossError as e:
        say(f"convert.attention=auto: {name} left out (its fit diverged: {e})")
        return {"failed": str(e), "sensitivity": [None] * depth, "seconds": time.monotonic() - start}
    if plan.active and steps:
        say(
            f"convert.attention=auto: {name} fitted in every block ({steps} steps, {time.monotonic() - start:.0f} s)"
        )
    elif plan.active:  # convert.stage1_steps=0 (and no selection_steps): judged as swapped in
        say(
            f"convert.attention=auto: {name} judged unfitted (0 stage-1 steps: convert.selection_steps=N fits it)"
        )
    _, rows = sensitivities(parts.teacher, {name: student.eval()}, batches)
    return {
        "sensitivity": [row[name] if math.isfinite(row[name]) else None for row in rows],
        "seconds": time.monotonic() - start,
        "fitted": bool(plan.active),
    }


def speed_geometry(cfg: TrainConfig, teacher: nn.Module, run_side: int) -> tuple[int, int]:
    """(tokens, image side) the speed is measured at: the run's, or ``convert.speed_tokens`` (a prefix and a
    square grid the teacher's family runs at)."""
    prefix, _ = teacher_token_layout(teacher)
    patch = image_input(teacher).patch_size[-1]
    tokens = cfg.convert.speed_tokens
    if tokens is None:
        return prefix + (run_side // patch) ** 2, run_side
    grid = math.isqrt(max(tokens - prefix, 0))
    if grid * grid != tokens - prefix or grid == 0:
        near = sorted({prefix + g * g for g in (max(grid, 1), grid + 1)})
        raise InputError(
            f"convert.speed_tokens={tokens}: this teacher's sequence is {prefix} prefix token(s) + a square grid "
            f"of {patch} px patches; choose e.g. {' or '.join(map(str, near))}"
        )
    try:
        check_image_size(teacher, grid * patch)
    except ImageSizeError as e:
        raise e.restated("convert.speed_tokens") from None
    if not cfg.teacher.spec and grid * patch != run_side:
        raise InputError(
            "convert.speed_tokens other than the run's needs teacher.spec (the teacher is rebuilt at that size)"
        )
    return tokens, grid * patch


@torch.no_grad()
def time_candidates(cfg: TrainConfig, parts: RunParts, device: torch.device) -> dict[str, Any]:
    """Milliseconds of whole models, interleaved in one call: the teacher, its floor (no token mixing) and a
    student with every block of each candidate; then one block's attention in place, softmax's and each
    candidate's, as (that model - floor) / depth. Whole models, not one block timed alone: a block's share
    read from the model it runs in cannot exceed the model (a block timed alone under load or on a tiny
    teacher could, predicting a negative time), and the fastest student predicted is one that was timed."""
    c = cfg.convert
    tokens, side = speed_geometry(cfg, parts.teacher, parts.img_size)
    teacher = parts.teacher if side == parts.img_size else rebuilt_teacher(cfg, side, device)
    images = torch.randn(
        c.speed_batch_size, parts.in_chans, side, side, generator=torch.Generator().manual_seed(0)
    ).to(device)
    models = {"teacher": teacher, "floor": floor_model(teacher)}
    for name in c.candidates:
        # at the tokens the budget is timed at: another grid than the run's, where `check_candidates` built them
        models[name] = _candidate(teacher, name, _for_tokens(_options(cfg, name), tokens))
    for model in models.values():
        model.to(device).eval()
    precision = resolve_precision(cfg.precision, device)
    with precision.autocast(device):
        calls = {name: partial(model, images) for name, model in models.items()}
        times = interleaved_timings(calls, device=device, warmup=1, repeats=c.speed_repeats)
    whole = {name: 1000.0 * t.median for name, t in times.items()}
    return {
        "tokens": tokens,
        "side": side,
        "batch": c.speed_batch_size,
        "device": device.type,
        "precision": f"{precision.value} autocast" if precision.autocasts else "fp32",
        "ms": {"teacher": whole["teacher"], **block_ms(whole, len(flat_blocks(teacher)))},
        "whole_ms": whole,
    }


def block_ms(whole: dict[str, float], depth: int) -> dict[str, float]:
    """One block's attention in place, softmax's (from the teacher's time) and each candidate's: (that model -
    floor) / depth, from ``whole`` (ms of the teacher, its floor and each candidate's all-blocks student). Never
    below 0: a model contains its floor, so one timed under it (a loaded machine) is at the floor within timing
    noise, where its difference would print, and save, a negative time."""
    return {
        SOFTMAX if name == "teacher" else name: max(0.0, (t - whole["floor"]) / depth)
        for name, t in whole.items()
        if name != "floor"
    }


def _block_ms_text(timing: dict[str, Any], name: str) -> str:
    """``name``'s `block_ms` as the selection says it, ``0 ms (within timing noise ...)`` where clamped."""
    whole = timing.get("whole_ms") or {}  # absent from choices made when one block was timed alone
    model = "teacher" if name == SOFTMAX else name
    under = model in whole and whole[model] < whole["floor"]
    return f"{timing['ms'][name]:.3g} ms" + (
        " (its model timed under the floor: 0 within timing noise)" if under else ""
    )


@torch.no_grad()
def sensitivities(
    teacher: nn.Module, fitted: dict[str, nn.Module], batches: list[torch.Tensor]
) -> tuple[str, list[dict[str, float]]]:
    """Per block, per fitted candidate: how far the teacher moves with only that block swapped to the
    candidate's fitted attention, mean over images: KL(teacher ‖ swapped) of class probabilities; headless:
    ||swapped - teacher||² / ||teacher||² of the final features. And the metric's name."""
    headless = not getattr(teacher, "num_classes", 0)

    def output(x: torch.Tensor) -> torch.Tensor:
        return (teacher.forward_features(x) if headless else teacher(x)).float()

    def distance(ref: torch.Tensor, out: torch.Tensor) -> float:
        if headless:
            ref, out = ref.flatten(1), out.flatten(1)
            return float(((out - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-12)).mean())
        kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
        return float(kl.clamp_min(0))  # rounding's < 0 would rank a swap above softmax (a nan stays a nan)

    reference = [output(x) for x in batches]
    blocks = flat_blocks(teacher)
    rows: list[dict[str, float]] = [{} for _ in blocks]
    for name, student in fitted.items():
        for i, (block, swapped) in enumerate(zip(blocks, flat_blocks(student), strict=True)):
            own = block.attn
            block.attn = swapped.attn
            try:
                total = sum(
                    x.shape[0] * distance(ref, output(x)) for ref, x in zip(reference, batches, strict=True)
                )
            finally:
                block.attn = own
            rows[i][name] = total / sum(x.shape[0] for x in batches)
    return ("feature_error" if headless else "kl"), rows


def measured_section(run: Any, speed: dict[str, Any]) -> dict[str, Any]:
    """The report's ``selection`` of a `Conversion` ``run``: its record (less the config) and the student's
    measured speedup at the selection's token count (the report's own where that is the run's)."""
    cfg, record, parts = run.cfg, run.selection, run.parts
    section = {k: v for k, v in record.items() if k != "config"}
    row = speed
    if record["side"] != speed["input"][-1] or record["batch"] != speed["batch"]:
        teacher = rebuilt_teacher(cfg, record["side"], run.device)
        options = _for_tokens(cfg.convert.attention_kwargs, record["tokens"])
        student = build_efficient_student(teacher, record["attention"], **options)
        x = torch.randn(record["batch"], parts.in_chans, record["side"], record["side"]).to(run.device)
        precision = resolve_precision(cfg.precision, run.device)
        row = forward_speed(
            {"teacher": teacher, "student": student.to(run.device)},
            x,
            repeats=cfg.convert.speed_repeats,
            autocast=precision.dtype if precision.autocasts else None,
        )
    section["measured_speedup"] = row["student_over_teacher"]
    section["measured_speedup_range"] = row.get("student_over_teacher_range")
    section["measured_speedup_cpu"] = row.get("student_over_teacher_cpu")
    # as the report's own speed-up: not claimed where its rounds contradict it (a loaded machine)
    section["measured_speedup_withheld"] = withheld = speedup_withheld(row)
    cpu = section["measured_speedup_cpu"]
    measured = (
        f"measured: withheld ({withheld})"
        if withheld
        else f"measured {beside(section['measured_speedup'], record['speedup'])}"
        + (f" ({beside(cpu, record['speedup'])} in CPU time)" if cpu else "")
    )
    if not withheld and section["measured_speedup"] < record["speedup"]:  # said, not left to the digits
        measured += f": short of the budget ({short_of_budget(record['attention'])})"
    run.say(
        f"convert.attention=auto: predicted {beside(record['predicted_speedup'], record['speedup'])} the "
        f"teacher at {record['tokens']:,} tokens (budget {record['speedup']:g}x), {measured}"
    )
    return section
