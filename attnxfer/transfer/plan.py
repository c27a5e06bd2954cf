"""The transfer plan as data: which student layer takes what from which teacher layer, and what the two are
compared on; built once and validated there, so a bad combination fails before any training step."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

import torch.nn as nn

from ..models.attention import MapKind, attention_name_of, family_of, stage_of
from ..models.handover import Signal
from .attention_comparisons import check_head_dims_match, check_heads_match
from .comparisons import Comparison, PlanModels, comparison_from_entry, drop_hint
from .modes import MODES as MODES, PlanError, TransferMode, get_mode
from .pairing import (
    block_attentions,
    check_partitions,
    check_token_layouts,
    layer_names,
    map_layers as map_layers,
    pair_within_stages,
    partitions,
    select_layers,
    token_layout,
)

#: the comparison loss a mode's distilled signal takes (at ``transfer.atd_weight``)
MODE_LOSSES: dict[Signal, str] = {Signal.MAPS: "map", Signal.Q: "mse", Signal.K: "mse", Signal.V: "mse"}


@dataclass(frozen=True)
class TransferPlan:
    """Validated, explicit description of one attention-transfer setup."""

    mode: TransferMode
    #: (student layer, teacher layer) the mode transfers: borrowed from (copy) or distilled (the mode's comparison)
    pairs: tuple[tuple[int, int], ...]
    #: what the student is compared with its teacher on, in the order their losses are summed
    comparisons: tuple[Comparison, ...] = ()
    weight: float = 1.0  # the paper's atd_weight: the mode's distillation comparison's weight (copy: unused)
    student_depth: int = 0
    teacher_depth: int = 0
    teacher_heads: int = 0
    student_heads: int = 0
    share_drop_path: bool = False
    tokens: int = 0
    #: weight of the task loss on the student's logits; 0: no task loss, and no label is read
    task_weight: float = 1.0

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.pairs)

    @property
    def mode_comparison(self) -> Comparison | None:
        """The comparison that is the mode's distillation (`build_plan` puts it first), or None."""
        return self.comparisons[0] if self.mode.is_distill and self.pairs else None

    def describe(self) -> str:
        """A short human-readable table, printed at start-up."""
        m = self.mode
        # transfer.losses can move attention where the mode moves none: the plan does not say "no attention"
        said = m.description
        if m.moves_nothing and any(c.signal.of_layer for c in self.comparisons):
            said = "the mode itself moves no attention; the comparisons below do"
        lines = [f"transfer plan: mode={m.name} ({said})"]
        if self.pairs:  # what the mode borrows or distils, tokens, heads, drop path, layers and losses
            kind = (
                f"borrow {m.borrow} from teacher"
                if m.is_copy
                else f"distill {m.distill}, weight {self.weight:g}"
            )
            lines += [
                f"  {kind}; tokens {self.tokens}; heads teacher {self.teacher_heads} / student "
                f"{self.student_heads}",
                f"  drop path: {'shared with teacher' if self.share_drop_path else 'teacher deterministic'}; "
                f"the teacher at inference: {'needed' if m.teacher_at_eval else 'not needed'}",
            ]
            span = _span(self.student_layers)
            if all(s == t for s, t in self.pairs):
                lines.append(f"  layers {span} of {self.student_depth} (same teacher layers)")
            else:
                pairs = ", ".join(f"{s}<-{t}" for s, t in self.pairs)
                lines.append(f"  student layers {span} of {self.student_depth} <- teacher layers {pairs}")
            if self.mode_comparison is not None:
                lines += _note_lines(self.mode_comparison)
        for c in self.comparisons:
            if c is not self.mode_comparison:
                lines += c.loss_fn.describe(c) + _note_lines(c)
        if self.task_weight != 1.0:
            lines.append(
                f"  task loss: weight {self.task_weight:g}"
                if self.task_weight > 0
                else "  task loss: none (transfer.task_weight=0: no label is read)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _span(layers: Sequence[int]) -> str:
    """``2-5`` for consecutive layers, else ``0,3`` (one layer: ``1``)."""
    consecutive = len(layers) > 1 and tuple(layers) == tuple(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if consecutive else ",".join(map(str, layers))


def _note_lines(c: Comparison) -> list[str]:
    """One line per run of consecutive student layers whose note (what their loss compares) is the same."""
    runs: list[tuple[list[int], str]] = []
    for (s, _), text in zip(c.pairs, c.notes):
        if text and runs and runs[-1][1] == text and runs[-1][0][-1] == s - 1:
            runs[-1][0].append(s)
        elif text:
            runs.append(([s], text))
    return [f"  loss, layer{'s' if len(idx) > 1 else ''} {_span(idx)}: {text}" for idx, text in runs]


def build_plan(
    teacher: nn.Module | None,
    student: nn.Module,
    mode: str = "distill",
    *,
    end_layer: int = 0,
    layers: Iterable[int] | None = None,
    weight: float = 1.0,
    share_drop_path: bool = False,
    logit_weight: float = 0.0,
    logit_temperature: float = 1.0,
    feature_weight: float = 0.0,
    task_weight: float = 1.0,
    losses: Sequence[Mapping[str, Any]] = (),
) -> TransferPlan:
    """Build and validate a plan for these two models; every incompatibility is a `PlanError`. Logit and
    feature distillation (``*_weight`` > 0) and each ``losses`` entry add to any mode; ``task_weight`` 0
    reads no label. Zoo-attention students take modes ``none`` and ``distill`` only."""
    weights = dict(
        weight=weight, logit_weight=logit_weight, feature_weight=feature_weight, task_weight=task_weight
    )
    for name, value in {**weights, "logit_temperature": logit_temperature}.items():
        if isinstance(value, bool) or not isinstance(value, Real):  # else a comparison with a str deep inside
            raise PlanError(f"build_plan: {name} must be a number (int or float), got {value!r}")
    if not isinstance(share_drop_path, bool):  # else bool() made "no" (any non-empty value) True
        raise PlanError(f"build_plan: share_drop_path must be True or False, got {share_drop_path!r}")
    # else one entry's keys (or a name's letters) were read as entries, each told to be the mapping it was
    if isinstance(losses, Mapping | str):
        raise PlanError(
            f"build_plan: losses is a list of entries, got one {type(losses).__name__} ({losses!r}): put it in a "
            "list, e.g. losses=[{'name': 'mse', 'signal': 'v', 'weight': 1.0}]"
        )
    spec = get_mode(mode)
    s_attn = block_attentions(student)
    if bad := {name: w for name, w in weights.items() if not 0 <= w < math.inf}:  # NaN fails both
        raise PlanError(f"loss weights must be finite and >= 0, got {bad}")
    if not logit_temperature > 0:
        raise PlanError(f"logit distillation needs a temperature > 0, got {logit_temperature}")
    # the comparisons asked for, in the order their losses are summed
    requested = []
    if spec.distill is not None:
        requested.append(
            Comparison(spec.distill, MODE_LOSSES[spec.distill], float(weight), origin=f"mode {mode!r}")
        )
    if logit_weight > 0:
        temperature = {"temperature": float(logit_temperature)}
        origin = "transfer.logit_distill"
        requested.append(
            Comparison(Signal.LOGITS, "logit_kd", float(logit_weight), temperature, origin=origin)
        )
    if feature_weight > 0:
        origin = "transfer.feature_distill"
        requested.append(Comparison(Signal.FEATURES, "feature_distill", float(feature_weight), origin=origin))
    requested += [comparison_from_entry(entry, f"transfer.losses[{i}]") for i, entry in enumerate(losses)]
    for c in requested:
        if not c.signal.of_layer:
            c.loss_fn.check(c, PlanModels(teacher, student))
    if task_weight == 0 and spec.teacher_at_eval:  # a task-free run is scored by its student alone
        raise PlanError(
            f"transfer.mode={mode} needs a task loss: its student attends with its teacher's maps, so its "
            "features alone are not the model; set transfer.task_weight > 0, or transfer.mode=distill"
        )
    if task_weight == 0 and all(c.weight == 0 for c in requested):  # a loss of 0 at every step
        compared = f"every comparison ({', '.join(c.origin for c in requested)}) has weight 0"
        raise PlanError(
            f"nothing to train: transfer.task_weight=0 and {compared if requested else 'nothing is distilled'}; "
            "set transfer.feature_distill > 0 (the final features), an attention mode (transfer.mode=distill) "
            "with transfer.atd_weight > 0, or transfer.task_weight > 0"
        )
    of_layers = [c for c in requested if c.signal.of_layer]
    common = dict(weight=float(weight), student_depth=len(s_attn), task_weight=float(task_weight))
    if spec.moves_nothing and not of_layers:
        return TransferPlan(spec, (), tuple(requested), student_heads=s_attn[0].num_heads, **common)
    if teacher is None:
        raise PlanError(
            f"mode {mode!r} needs a teacher; set teacher=... or use mode=none"
            if not spec.moves_nothing
            else f"{of_layers[0].origin} compares with a teacher; set teacher.spec"
        )
    t_attn = block_attentions(teacher, "teacher")
    s_names, t_names = layer_names(student), layer_names(teacher)
    s_parts, t_parts = partitions(student, s_names, s_attn), partitions(teacher, t_names, t_attn)
    try:
        check_token_layouts(teacher, student)
    except PlanError as e:
        # a student of one stage: with the teacher's tokens, the teacher's other stages still differ
        if len({stage_of(n) for n in t_names}) > 1 and len({stage_of(n) for n in s_names}) == 1:
            raise PlanError(
                f"{e} Even then, a student of one stage takes maps only from teacher layers on its one grid "
                "that attend over all of it (not within windows); a student of the teacher's architecture "
                "takes every layer's (model.mirror_teacher=true)"
            ) from None
        raise
    t_grid, t_prefix = token_layout(teacher)
    chosen = select_layers(len(s_attn), end_layer, layers)
    pairs = pair_within_stages(chosen, s_names, t_names, s_parts, t_parts)
    models = PlanModels(teacher, student, t_attn, s_attn, t_parts, s_parts)
    paired = [s for s, _ in pairs]
    for i, c in enumerate(requested):
        if not c.signal.of_layer:
            continue
        # an entry's layers: some of those the transfer pairs, a negative one counted from the end
        want = [j + len(s_attn) if j < 0 else j for j in c.layers or paired]
        if outside := [j for j, w in zip(c.layers or (), want) if w not in paired]:
            raise PlanError(
                f"{c.origin}.layers: {', '.join(map(str, outside))} not among the student layers the transfer "
                f"pairs with a teacher layer; name some of {', '.join(map(str, paired))} (negatives count from "
                f"the end of the student's {len(s_attn)} blocks), or widen transfer.layers / transfer.end_layer"
            )
        requested[i] = replace(c, pairs=tuple(p for p in pairs if p[0] in want))
    _check_layer_pairs(spec, pairs, requested, models, s_names, share_drop_path)
    _check_first_stage(pairs, s_names, t_names, teacher)
    compared = tuple(
        replace(c, notes=tuple(c.loss_fn.note(c, models, s, t) for s, t in c.pairs)) for c in requested
    )
    return TransferPlan(
        spec,
        pairs if not spec.moves_nothing else (),
        compared,
        teacher_depth=len(t_attn),
        teacher_heads=t_attn[0].num_heads,
        student_heads=s_attn[0].num_heads,
        share_drop_path=share_drop_path,
        tokens=(t_grid[0] * t_grid[1] if len(t_grid) == 2 else 0) + t_prefix,
        **common,
    )


def _check_first_stage(
    pairs: Sequence[tuple[int, int]], s_names: Sequence[str], t_names: Sequence[str], teacher: nn.Module
) -> None:
    """A student of one stage sees the grid of a hierarchical teacher's first stage (their token layouts
    matched), and the teacher's later stages attend over coarser grids: a pair with a later-stage layer is one
    `PlanError` naming the student layers that pair within the first stage. It used to pass the plan (a
    distilled layer pools onto PVTv2's reduced keys) and stop at the first step with a misleading "token
    counts differ ... need the same image size"."""
    family = family_of(teacher)
    if family is None or not family.hierarchical or len({stage_of(n) for n in s_names}) > 1:
        return
    first = stage_of(t_names[0])
    later = [(s, t) for s, t in pairs if stage_of(t_names[t]) != first]
    if not later:
        return
    s, t = later[0]
    within = [s for s, t in pairs if stage_of(t_names[t]) == first]
    fix = f"transfer.layers={within}" if within else "a student as deep as the teacher's first stage"
    raise PlanError(
        f"student layer {s} <- teacher layer {t} (stage {stage_of(t_names[t])}): the teacher layer attends over "
        f"its stage's coarser grid, not the student's one grid (the teacher's first stage, {first}); a student "
        f"of one stage takes maps only from the teacher's first stage: set {fix}, or give the student the "
        "teacher's architecture (model.mirror_teacher=true)"
    )


def _check_layer_pairs(
    spec: TransferMode,
    pairs: Sequence[tuple[int, int]],
    requested: Sequence[Comparison],
    models: PlanModels,
    s_names: Sequence[str],
    share_drop_path: bool,
) -> None:
    """The layer pairs against what the mode and each layer comparison need of them."""
    s_attn, t_attn = models.student_attn, models.teacher_attn
    of_layers = [c for c in requested if c.signal.of_layer]
    if spec.is_copy:
        check_partitions(pairs, s_names, s_attn, models.student_parts, models.teacher_parts)
    for c in of_layers:  # a copied layer's own q/k/v where it borrows the teacher's: frozen and unused
        if set(c.chunks) & set(spec.borrow):
            free = [s for s in Signal if s.chunks and not set(s.chunks) & set(spec.borrow)] + ["features"]
            raise PlanError(
                f"{c.origin}: transfer.mode={spec.name} attends with the teacher's {spec.borrow}, not the student's "
                f"own {c.signal}; compare {', '.join(free)}, or set transfer.mode=distill or none"
            )
    for c in of_layers:  # a student layer without a map (none, hydra) says so, not that its keys differ
        for s, t in c.pairs:
            if not s_attn[s].map_kind.has_map:
                c.loss_fn.check_pair(c, models, s, t, where := f"student block {s} <- teacher block {t}")
                if c.signal is Signal.MAPS:  # a loss of one's own: its attention_map(q, k) would be None
                    raise PlanError(
                        f"{where}: {attention_name_of(s_attn[s])!r} attention has no attention map for "
                        f"{c.loss} to compare (map kind 'none'); {drop_hint(c)}, limit {c.origin}.layers to "
                        "blocks with a map, or pick a row-stochastic/signed attention"
                    )
    for c in of_layers:
        pools = lambda s, t, c=c: c.loss_fn.pools_teacher_keys(c, models, s, t)
        check_partitions(c.pairs, s_names, s_attn, models.student_parts, models.teacher_parts, pools)
    if share_drop_path and len(s_attn) != len(t_attn):
        raise PlanError(
            f"share_drop_path needs equal depths (teacher {len(t_attn)}, student {len(s_attn)}); "
            "set transfer.share_drop_path=false"
        )
    for c in of_layers:
        c.loss_fn.check(c, models)
    for s, t in pairs:
        where = f"student block {s} <- teacher block {t}"
        if t_attn[t].map_kind is not MapKind.SOFTMAX:
            raise PlanError(
                f"{where}: the teacher layer is {attention_name_of(t_attn[t])!r}; teachers need softmax "
                "attention (their q/k define the maps that are transferred)"
            )
        if spec.is_copy and not s_attn[s].map_kind.takes_borrowed_qk:
            raise PlanError(
                f"{where}: mode {spec.name!r} needs softmax attention in the student, but this layer is "
                f"{attention_name_of(s_attn[s])!r}; use mode=distill (map distillation) or mode=none for "
                "efficient-attention students"
            )
        if spec.is_copy:
            check_heads_match(f"mode {spec.name!r}", where, t_attn[t], s_attn[s])
        if spec.is_copy and spec.mixes_chunks:  # q and k borrowed together take any head dim
            check_head_dims_match(f"mode {spec.name!r}", where, t_attn[t], s_attn[s])
        for c in of_layers:
            if (s, t) in c.pairs:
                c.loss_fn.check_pair(c, models, s, t, where)
