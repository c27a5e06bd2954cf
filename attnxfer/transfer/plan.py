"""The transfer plan: which student layer takes what from which teacher layer, as data.

A plan is built once from the config and the two models, validated there (so a
bad combination fails before any training step), and printed at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.nn as nn

from ..models.attention import (
    MapKind,
    TransferableAttention,
    attention_layers,
    attention_name_of,
    group_stages,
    stage_of,
    transferable_attentions,
)
from ..models.handover import Signal
from ..models.image_input import find_patch_embedding, image_input
from .losses import group_heads_ok
from .map_losses import map_loss_rule
from .modes import MODES, PlanError, TransferMode, get_mode

__all__ = [
    "MODES",
    "PlanError",
    "TransferMode",
    "TransferPlan",
    "build_plan",
    "map_layers",
    "reduced_keys",
    "select_layers",
]


def select_layers(depth: int, end_layer: int = 0, layers: Iterable[int] | None = None) -> tuple[int, ...]:
    """Student layers that take part.

    ``layers`` (explicit indices, negatives count from the end) wins over ``end_layer``.
    ``end_layer`` keeps the paper's meaning: 0 = all layers; negative = layers
    ``[0, depth + end_layer)``; positive = layers ``[0, end_layer)``.
    """
    if layers is not None:
        chosen = []
        for i in layers:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise PlanError(
                    f"layer {i} is outside the student's {depth} blocks (valid: 0..{depth - 1} or -{depth}..-1)"
                )
            chosen.append(j)
        return tuple(sorted(set(chosen)))
    end = depth if end_layer == 0 else (depth + end_layer if end_layer < 0 else end_layer)
    if not 0 < end <= depth:
        raise PlanError(
            f"end_layer={end_layer} selects no layers of a {depth}-block student; "
            f"use 0 (all), -1..-{depth - 1} (drop the last ones) or 1..{depth}"
        )
    return tuple(range(end))


def map_layers(
    student_layers: Sequence[int], student_depth: int, teacher_depth: int
) -> tuple[tuple[int, int], ...]:
    """(student, teacher) pairs; different depths map uniformly, first to first and last to last."""
    if student_depth == teacher_depth:
        return tuple((i, i) for i in student_layers)
    if student_depth == 1:
        return tuple((i, teacher_depth - 1) for i in student_layers)
    ratio = (teacher_depth - 1) / (student_depth - 1)
    return tuple((i, round(i * ratio)) for i in student_layers)


def _block_attentions(model: nn.Module, role: str = "student") -> Sequence[nn.Module]:
    """The model's attention layers in forward order, each meeting the interface (timm classes swapped to
    their adapters); a layer no adapter covers is a `PlanError` naming it."""
    try:
        return transferable_attentions(model)
    except TypeError as e:
        raise PlanError(f"{role}: {e}") from None


def _check_pair(spec: TransferMode, mode: str, where: str, ta: nn.Module, sa: nn.Module) -> None:
    """What the mode needs of one (teacher layer, student layer) pair, read from their declared data:
    map kinds, head counts and head dims."""
    name = attention_name_of(sa)
    if ta.map_kind is not MapKind.SOFTMAX:
        raise PlanError(
            f"{where}: the teacher layer is {attention_name_of(ta)!r}; teachers need softmax attention "
            "(their q/k define the maps that are transferred)"
        )
    if spec.is_copy and not sa.map_kind.takes_borrowed_qk:
        raise PlanError(
            f"{where}: mode {mode!r} needs softmax attention in the student, but this layer is "
            f"{name!r}; use mode=distill (map distillation) or mode=none for efficient-attention "
            "students"
        )
    if spec.distills_maps and not sa.map_kind.has_map:
        raise PlanError(
            f"{where}: {name!r} attention has no attention map to distil (map kind 'none'); set "
            "transfer.mode=none (logit distillation still applies) or pick a row-stochastic/signed "
            "attention"
        )
    groups_heads = spec.distills_maps and map_loss_rule(sa.map_kind).groups_heads
    if spec.needs_equal_heads and ta.num_heads != sa.num_heads:
        raise PlanError(
            f"{where}: mode {mode!r} needs equal head counts (teacher {ta.num_heads}, "
            f"student {sa.num_heads}); set the student's num_heads={ta.num_heads}"
            + (
                " or use mode=distill, which averages teacher heads in groups"
                if group_heads_ok(ta.num_heads, sa.num_heads)
                else ""
            )
        )
    if spec.mixes_chunks and ta.head_dim != sa.head_dim:
        raise PlanError(
            f"{where}: mode {mode!r} mixes teacher and student q/k/v, so head dims must match "
            f"(teacher {ta.head_dim}, student {sa.head_dim}); set the student's embed_dim to "
            f"{ta.num_heads * ta.head_dim}"
        )
    if spec.distills_maps and not groups_heads and ta.num_heads != sa.num_heads:
        raise PlanError(
            f"{where}: map distillation into {name!r} attention needs equal head counts (teacher "
            f"{ta.num_heads}, student {sa.num_heads}); set the student's num_heads={ta.num_heads}"
        )
    if groups_heads and not group_heads_ok(ta.num_heads, sa.num_heads):
        raise PlanError(
            f"{where}: teacher has {ta.num_heads} heads, student {sa.num_heads}; distillation needs "
            "the teacher's head count to equal or be a whole multiple of the student's "
            f"(e.g. student num_heads={ta.num_heads})"
        )


def _token_layout(model: nn.Module) -> tuple[tuple[int, ...], int]:
    """(patch grid, prefix tokens) of ``model`` at its configured image size (`image_input`; no grid for a
    model without a patch embedding attnxfer knows)."""
    grid = image_input(model).grid if find_patch_embedding(model) is not None else ()
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = getattr(getattr(model, "encoder", None), "num_prefix_tokens", 0)
    return grid, int(prefix or 0)


def _layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in attention_layers(model)]


def _partitions(model: nn.Module, names: Sequence[str], attn: Sequence[nn.Module]) -> list[dict]:
    """Each layer's `TransferableAttention.token_partition`, read with the block that holds it."""
    return [a.token_partition(model.get_submodule(n.rpartition(".")[0])) for n, a in zip(names, attn)]


def _pair_within_stages(
    chosen: Sequence[int],
    s_names: Sequence[str],
    t_names: Sequence[str],
    s_parts: Sequence[dict],
    t_parts: Sequence[dict],
) -> tuple[tuple[int, int], ...]:
    """(student, teacher) layer pairs. Hierarchical models (several stages on both sides) pair stage by stage,
    uniformly within each (`map_layers` on the stage's depths): token counts and widths change between
    stages, so a layer's partner is in the same stage. With one stage on either side: over the whole depth.
    A partner that partitions its tokens otherwise (a shifted Swin block for an unshifted one) gives way to
    the nearest layer of its stage that partitions them like the student layer, if there is one."""
    s_stages, t_stages = group_stages(s_names), group_stages(t_names)
    if len(s_stages) == 1 or len(t_stages) == 1:
        s_stages, t_stages = [("", list(range(len(s_names))))], [("", list(range(len(t_names))))]
    elif len(s_stages) != len(t_stages):
        raise PlanError(
            f"stage layouts differ: teacher has {len(t_stages)} stages (depths "
            f"{[len(i) for _, i in t_stages]}), student {len(s_stages)} (depths {[len(i) for _, i in s_stages]}); "
            "layers pair within stages, so give the student the teacher's number of stages (depths may differ)"
        )
    stage_of_layer = {i: j for j, (_, idx) in enumerate(s_stages) for i in idx}
    pairs = []
    for s in chosen:
        j = stage_of_layer[s]
        s_idx, t_idx = s_stages[j][1], t_stages[j][1]
        ((_, u),) = map_layers([s_idx.index(s)], len(s_idx), len(t_idx))
        alike = [i for i in range(len(t_idx)) if t_parts[t_idx[i]] == s_parts[s]]
        if t_parts[t_idx[u]] != s_parts[s] and alike:
            u = min(alike, key=lambda i: (abs(i - u), i))
        pairs.append((s, t_idx[u]))
    return tuple(pairs)


def reduced_keys(attn: nn.Module) -> str | None:
    """How a teacher layer's keys reduce its tokens, in words (its adapter's `key_reduction`: strided blocks,
    adaptive bins), or None where its keys are its tokens."""
    return attn.key_reduction() if isinstance(attn, TransferableAttention) else None


def _pools_teacher_keys(spec: TransferMode, sa: nn.Module, ta: nn.Module, sp: dict) -> bool:
    """Map distillation into a student layer that keys every token of its stage (it declares no partition of
    its own: a zoo attention) from a teacher layer that says which tokens each of its keys was made from
    (``key_pooling``: PVTv2's spatial reduction): the student's rows are pooled onto the teacher's keys, as
    stage 1 of a conversion does."""
    return (
        spec.distills_maps
        and not sp
        and callable(getattr(ta, "key_pooling", None))
        and map_loss_rule(sa.map_kind).pooled
    )


def _check_partitions(
    spec: TransferMode,
    pairs: Sequence[tuple[int, int]],
    s_names: Sequence[str],
    s_attn: Sequence[nn.Module],
    t_attn: Sequence[nn.Module],
    s_parts: Sequence[dict],
    t_parts: Sequence[dict],
) -> None:
    """Paired layers must see the same query and key sets (`TransferableAttention.token_partition`: the grid a
    stage works on, windows and shifts, sub-sampling ratios), unless the student's map pools onto the
    teacher's keys (`_pools_teacher_keys`); the first pair that does not is ONE `PlanError` naming its stage,
    every entry that differs and what would make them agree."""
    for s, t in pairs:
        sp, tp = s_parts[s], t_parts[t]
        if sp == tp or _pools_teacher_keys(spec, s_attn[s], t_attn[t], sp):
            continue
        keys = [
            k for k in sorted(set(sp) | set(tp), key=lambda k: (k not in tp, k)) if sp.get(k) != tp.get(k)
        ]
        diff = "; ".join(f"{key} teacher {_show(tp.get(key))}, student {_show(sp.get(key))}" for key in keys)
        stage = stage_of(s_names[s]) or "blocks"
        if sp:
            fix = f"build the student with the teacher's {', '.join(keys)} in this stage"
        else:
            fix = (
                f"this student layer ({attention_name_of(s_attn[s])}) keys every token and the teacher layer "
                "cannot pool its keys onto them; leave the layer out of transfer.layers, or use "
                "transfer.mode=none"
            )
        raise PlanError(
            f"stage {stage} (student layer {s} <- teacher layer {t}) partitions its tokens differently: {diff}. "
            f"Attention maps are transferred token by token and key set by key set: {fix}"
        )


def _layer_loss(spec: TransferMode, sa: nn.Module, ta: nn.Module, sp: dict, tp: dict) -> str:
    """What one distilled layer's loss compares, as the map-loss table says for its map kind (pooled onto the
    teacher's reduced keys where they differ from the student's): printed with the plan."""
    if not spec.distills_maps:
        return ""
    text = f"{attention_name_of(sa)}: {map_loss_rule(sa.map_kind).describe}"
    reduced = reduced_keys(ta)
    if sp != tp and reduced is not None:
        text += f", pooled onto the teacher's reduced keys ({reduced} of tokens)"
    return text


def _show(v) -> str:
    if v is None:
        return "none"
    return "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def _layout_mismatch(
    student: nn.Module, t_grid: tuple[int, ...], t_prefix: int, s_grid: tuple[int, ...], s_prefix: int
) -> str:
    """The one message for a pair whose tokens differ: what differs, and the student settings that match
    the teacher (attention maps are token-by-token)."""
    fmt = lambda g: "x".join(map(str, g)) or "?"
    fixes = []
    if t_grid != s_grid:
        patch = image_input(student).patch_size if find_patch_embedding(student) is not None else None
        if patch is not None and len(t_grid) == 2:
            ph, pw = patch
            size = (t_grid[0] * ph, t_grid[1] * pw)
            fixes.append(f"img_size={size[0] if size[0] == size[1] else size} (patch {ph})")
        else:
            fixes.append("the teacher's img_size and patch_size")
    if t_prefix != s_prefix:
        fixes.append(
            f"class_token=True, reg_tokens={t_prefix - 1}"
            if t_prefix >= 1
            else "class_token=False, global_pool='avg' (the teacher has no prefix token)"
        )
    return (
        f"token grids differ: teacher has {fmt(t_grid)} patches + {t_prefix} prefix token(s), "
        f"student {fmt(s_grid)} + {s_prefix}. Give the student the teacher's tokens (attention maps are "
        f"token-by-token); for a timm ViT student: {', '.join(fixes)}."
    )


@dataclass(frozen=True)
class TransferPlan:
    """Validated, explicit description of one attention-transfer setup."""

    mode: TransferMode
    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer)
    weight: float = 1.0  # the paper's atd_weight (distillation modes)
    student_depth: int = 0
    teacher_depth: int = 0
    teacher_heads: int = 0
    student_heads: int = 0
    share_drop_path: bool = False
    tokens: int = 0
    logit_weight: float = 0.0  # KL between teacher and student logits (knowledge distillation)
    logit_temperature: float = 1.0
    #: per pair, what its map loss compares (`map_losses.MapLossRule.describe`); empty unless maps are distilled
    layer_losses: tuple[str, ...] = ()
    #: weight of feature distillation (`feature_loss.feature_distill_loss` between the final tokens)
    feature_weight: float = 0.0
    #: weight of the task loss on the student's logits; 0: no task loss, and no label is read
    task_weight: float = 1.0

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.pairs)

    @property
    def teacher_for(self) -> dict[int, int]:
        return dict(self.pairs)

    @property
    def teacher_layers(self) -> frozenset:
        return frozenset(t for _, t in self.pairs)

    @property
    def head_groups(self) -> int:
        return max(1, self.teacher_heads // max(1, self.student_heads))

    @property
    def last_teacher_layer(self) -> int:
        return max((t for _, t in self.pairs), default=-1)

    @property
    def uses_teacher(self) -> bool:
        """The teacher runs during training: attention pairs, logit or feature distillation."""
        return bool(self.pairs) or self.logit_weight > 0 or self.feature_weight > 0

    @property
    def compares(self) -> dict[Signal, float]:
        """What the student is compared with its teacher on, and each comparison's weight: the distilled
        attention signal (maps, q, k or v), the logits, the final token features."""
        out: dict[Signal, float] = {}
        if self.mode.distill is not None and self.pairs:
            out[self.mode.distill] = self.weight
        if self.logit_weight > 0:
            out[Signal.LOGITS] = self.logit_weight
        if self.feature_weight > 0:
            out[Signal.FEATURES] = self.feature_weight
        return out

    def _logit_line(self) -> str:
        return (
            f"  logit distillation: weight {self.logit_weight:g}, temperature {self.logit_temperature:g} "
            "(KL between teacher and student class distributions)"
        )

    def _objective_lines(self) -> list[str]:
        """Logit and feature distillation, and the task loss where it is not the default weight 1."""
        lines = [self._logit_line()] if self.logit_weight > 0 else []
        if self.feature_weight > 0:
            lines.append(
                f"  feature distillation: weight {self.feature_weight:g}, final token features after the final "
                "norm (prefix and patch tokens): cosine distance + smooth-L1 on tokens standardised by the "
                "teacher's"
            )
        if self.task_weight != 1.0:
            lines.append(
                f"  task loss: weight {self.task_weight:g}"
                if self.task_weight > 0
                else "  task loss: none (transfer.task_weight=0: no label is read)"
            )
        return lines

    def describe(self) -> str:
        """A short human-readable table, printed at start-up."""
        m = self.mode
        lines = [f"transfer plan: mode={m.name} ({m.description})"]
        if m.moves_nothing:
            return "\n".join(lines + self._objective_lines())
        kind = (
            f"borrow {m.borrow} from teacher"
            if m.is_copy
            else (f"distill {m.distill}" + (f", weight {self.weight:g}" if m.is_distill else ""))
        )
        lines.append(
            f"  {kind}; tokens {self.tokens}; heads teacher {self.teacher_heads} / student "
            f"{self.student_heads}"
            + (f" (teacher maps averaged in groups of {self.head_groups})" if self.head_groups > 1 else "")
        )
        lines.append(
            f"  drop path: {'shared with teacher' if self.share_drop_path else 'teacher deterministic'}; "
            f"teacher runs at eval: {m.teacher_at_eval}"
        )
        identity = all(s == t for s, t in self.pairs)
        sl = self.student_layers
        span = f"{sl[0]}-{sl[-1]}" if sl == tuple(range(sl[0], sl[-1] + 1)) else ",".join(map(str, sl))
        if identity:
            lines.append(f"  layers {span} of {self.student_depth} (same teacher layers)")
        else:
            lines.append(
                f"  student layers {span} of {self.student_depth} <- teacher layers "
                + ", ".join(f"{s}<-{t}" for s, t in self.pairs)
            )
        lines += self._loss_lines()
        return "\n".join(lines + self._objective_lines())

    def _loss_lines(self) -> list[str]:
        """One line per run of consecutive student layers whose map loss is the same."""
        runs: list[tuple[list[int], str]] = []
        for (s, _), text in zip(self.pairs, self.layer_losses):
            if text and runs and runs[-1][1] == text:
                runs[-1][0].append(s)
            elif text:
                runs.append(([s], text))
        return [
            f"  loss, layer{'s' if len(idx) > 1 else ''} "
            f"{idx[0] if len(idx) == 1 else f'{idx[0]}-{idx[-1]}'}: {text}"
            for idx, text in runs
        ]

    def __str__(self) -> str:
        return self.describe()


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
) -> TransferPlan:
    """Build and validate a plan for these two models; every incompatibility is a `PlanError`.

    ``logit_weight`` > 0 adds logit distillation (KL at ``logit_temperature``) to any mode, ``none``
    included; ``feature_weight`` > 0 adds feature distillation (the final token features) to any mode;
    ``task_weight`` weighs the task loss (0: none, and nothing reads a label). Students with zoo attention
    (`attnxfer.models.efficient`) take modes ``none`` and ``distill`` (their implicit maps learn the
    teacher's, by map kind).
    """
    spec = get_mode(mode)
    s_attn = _block_attentions(student)
    extra = {
        **_logit_settings(teacher, student, logit_weight, logit_temperature),
        **_feature_settings(teacher, student, feature_weight, task_weight),
    }
    if task_weight == 0 and spec.moves_nothing and not logit_weight and not feature_weight:
        raise PlanError(
            "nothing to train: transfer.task_weight=0 and nothing is distilled; set transfer.feature_distill "
            "> 0 (the final features), an attention mode (transfer.mode=distill) or transfer.task_weight > 0"
        )
    if spec.moves_nothing:
        return TransferPlan(spec, (), weight, len(s_attn), 0, 0, s_attn[0].num_heads, False, 0, **extra)
    if teacher is None:
        raise PlanError(f"mode {mode!r} needs a teacher; set teacher=... or use mode=none")
    t_attn = _block_attentions(teacher, "teacher")
    _check_token_layouts(teacher, student)
    t_grid, t_prefix = _token_layout(teacher)
    tokens = (t_grid[0] * t_grid[1] if len(t_grid) == 2 else 0) + t_prefix
    chosen = select_layers(len(s_attn), end_layer, layers)
    s_names, t_names = _layer_names(student), _layer_names(teacher)
    s_parts, t_parts = _partitions(student, s_names, s_attn), _partitions(teacher, t_names, t_attn)
    pairs = _pair_within_stages(chosen, s_names, t_names, s_parts, t_parts)
    _check_partitions(spec, pairs, s_names, s_attn, t_attn, s_parts, t_parts)
    if share_drop_path and len(s_attn) != len(t_attn):
        raise PlanError(
            f"share_drop_path needs equal depths (teacher {len(t_attn)}, student {len(s_attn)}); "
            "set share_drop_path=false"
        )
    for s, t in pairs:
        _check_pair(spec, mode, f"student block {s} <- teacher block {t}", t_attn[t], s_attn[s])
    return TransferPlan(
        spec,
        pairs,
        float(weight),
        len(s_attn),
        len(t_attn),
        t_attn[0].num_heads,
        s_attn[0].num_heads,
        bool(share_drop_path),
        tokens,
        layer_losses=tuple(_layer_loss(spec, s_attn[s], t_attn[t], s_parts[s], t_parts[t]) for s, t in pairs),
        **extra,
    )


def _check_token_layouts(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student see the same tokens (grid and prefix), or one `PlanError` saying what to set."""
    (t_grid, t_prefix), (s_grid, s_prefix) = _token_layout(teacher), _token_layout(student)
    if (t_grid, t_prefix) != (s_grid, s_prefix):
        raise PlanError(_layout_mismatch(student, t_grid, t_prefix, s_grid, s_prefix))


def _feature_settings(
    teacher: nn.Module | None, student: nn.Module, weight: float, task_weight: float
) -> dict[str, float]:
    """Feature distillation compares the final tokens one for one: a teacher, the same tokens, the same width."""
    if weight < 0 or task_weight < 0:
        raise PlanError(
            f"transfer.feature_distill and transfer.task_weight must be >= 0, got {weight} and {task_weight}"
        )
    if weight > 0:
        if teacher is None:
            raise PlanError(
                "feature distillation (transfer.feature_distill > 0) needs a teacher; set teacher.spec or "
                "transfer.feature_distill=0"
            )
        _check_token_layouts(teacher, student)
        t_width, s_width = getattr(teacher, "num_features", None), getattr(student, "num_features", None)
        if t_width != s_width:
            raise PlanError(
                f"feature distillation compares final tokens channel by channel: the teacher's have "
                f"{t_width} channels, the student's {s_width}; give the student the teacher's embed_dim "
                f"({t_width}) or set transfer.feature_distill=0"
            )
    return dict(feature_weight=float(weight), task_weight=float(task_weight))


def _logit_settings(teacher: nn.Module | None, student: nn.Module, weight: float, temperature: float) -> dict:
    if weight < 0 or temperature <= 0:
        raise PlanError(
            f"logit distillation needs weight >= 0 and temperature > 0, got weight {weight}, "
            f"temperature {temperature}"
        )
    if weight > 0:
        if teacher is None:
            raise PlanError(
                "logit distillation (transfer.logit_distill > 0) needs a teacher; set teacher.spec or "
                "transfer.logit_distill=0"
            )
        t_classes, s_classes = getattr(teacher, "num_classes", 0), getattr(student, "num_classes", 0)
        if not t_classes:
            raise PlanError(
                "the teacher has no classifier head (num_classes=0, e.g. an MAE encoder), so there are "
                "no teacher logits to distil; set transfer.logit_distill=0"
            )
        if t_classes != s_classes:
            raise PlanError(
                f"logit distillation needs the teacher's classes: teacher has {t_classes}, student "
                f"{s_classes}; set transfer.logit_distill=0 or use a teacher trained on this label set"
            )
    return dict(logit_weight=float(weight), logit_temperature=float(temperature))
