"""Which student layer takes which teacher layer, and whether their tokens agree (grids, prefix tokens,
stages, each layer's token partition)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from numbers import Integral

import torch.nn as nn

from ..models.attention import (
    TransferableAttention,
    attention_layers,
    attention_name_of,
    group_stages,
    stage_of,
    transferable_attentions,
)
from ..models.image_input import find_patch_embedding, image_input
from .modes import PlanError
from .teacher_pass import block_of


def select_layers(depth: int, end_layer: int = 0, layers: Iterable[int] | None = None) -> tuple[int, ...]:
    """Student layers that take part: ``layers`` (negatives from the end), else the paper's ``end_layer``
    (0: all; negative: ``[0, depth + end_layer)``; positive: ``[0, end_layer)``)."""
    if layers is not None:
        if not isinstance(layers, Integral | str):
            layers = list(layers)
        if not isinstance(layers, list) or not all(isinstance(i, Integral) for i in layers):
            raise PlanError(f"transfer.layers={layers!r}: a list of block indices (ints), e.g. [0, 1, -1]")
        if not layers:  # else a distillation run that distils nothing, its plan saying so only by omission
            raise PlanError(
                "transfer.layers=[] names no layer to transfer; name one or more, or leave it unset (null)"
            )
        chosen = []
        for i in layers:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise PlanError(
                    f"transfer.layers: layer {i} is outside the student's {depth} blocks (valid: 0..{depth - 1} or -{depth}..-1)"
                )
            chosen.append(j)
        return tuple(sorted(set(chosen)))
    if not isinstance(end_layer, Integral):  # else a comparison of str and int deep inside
        raise PlanError(f"transfer.end_layer={end_layer!r}: an int (0: all layers, -2: all but the last two)")
    end = depth if end_layer == 0 else (depth + end_layer if end_layer < 0 else end_layer)
    if not 0 < end <= depth:
        said = "asks for more layers than" if end > depth else "selects no layers of"
        raise PlanError(
            f"transfer.end_layer={end_layer} {said} the student's {depth} blocks; "
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


def block_attentions(model: nn.Module, role: str = "student") -> Sequence[nn.Module]:
    """The model's attention layers in forward order (adapted); one no adapter covers is a `PlanError`."""
    try:
        return transferable_attentions(model)
    except TypeError as e:
        raise PlanError(f"{role}: {e}") from None


def token_layout(model: nn.Module) -> tuple[tuple[int, ...], int]:
    """(patch grid, prefix tokens) of ``model`` at its configured image size (no grid without a patch embedding)."""
    grid = image_input(model).grid if find_patch_embedding(model) is not None else ()
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = getattr(getattr(model, "encoder", None), "num_prefix_tokens", 0)
    return grid, int(prefix or 0)


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in attention_layers(model)]


def partitions(model: nn.Module, names: Sequence[str], attn: Sequence[nn.Module]) -> list[dict]:
    """Each layer's `TransferableAttention.token_partition`, read with the block that holds it."""
    return [a.token_partition(block_of(model, n)) for n, a in zip(names, attn)]


def pair_within_stages(
    chosen: Sequence[int],
    s_names: Sequence[str],
    t_names: Sequence[str],
    s_parts: Sequence[dict],
    t_parts: Sequence[dict],
) -> tuple[tuple[int, int], ...]:
    """(student, teacher) layer pairs, uniformly within each stage where both sides have several (tokens and
    widths change between stages). A partner that partitions its tokens otherwise (a shifted Swin block for
    an unshifted one) gives way to the nearest of its stage that partitions them alike, if any."""
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


def attends_within_regions(attn: nn.Module, partition: dict) -> bool:
    """A zoo attention in a shifted Swin window (`SwinSlot`): its rows are restricted to the query's region and
    renormalised, which conversion's stage 1 fits with the region's mass and map distillation cannot take."""
    return hasattr(attn, "region_log_mass") and any(partition.get("shift", ()))


def reduced_keys(attn: nn.Module) -> str | None:
    """How a teacher layer's keys reduce its tokens, in words, or None where its keys are its tokens."""
    return attn.key_reduction() if isinstance(attn, TransferableAttention) else None


def check_partitions(
    pairs: Sequence[tuple[int, int]],
    s_names: Sequence[str],
    s_attn: Sequence[nn.Module],
    s_parts: Sequence[dict],
    t_parts: Sequence[dict],
    pools: Callable[[int, int], bool] = lambda s, t: False,
) -> None:
    """Paired layers see the same query and key sets (`TransferableAttention.token_partition`) unless
    ``pools(s, t)``; the first pair that does not is one `PlanError` naming what differs and the fix."""
    for s, t in pairs:
        sp, tp = s_parts[s], t_parts[t]
        if sp == tp or pools(s, t):
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


def _show(v) -> str:
    if v is None:
        return "none"
    return "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def check_token_layouts(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student see the same tokens (grid and prefix), or one `PlanError` saying what to set."""
    (t_grid, t_prefix), (s_grid, s_prefix) = token_layout(teacher), token_layout(student)
    if (t_grid, t_prefix) == (s_grid, s_prefix):
        return
    fmt = lambda g: "x".join(map(str, g)) or "?"
    fixes = []
    if t_grid != s_grid:  # both see the same images: the teacher's patches (and size) give its grid
        plain = all(find_patch_embedding(m) is not None for m in (teacher, student))
        t_io, s_io = (image_input(m) for m in (teacher, student)) if plain else (None, None)
        as_key = lambda v: v[0] if v[0] == v[1] else list(v)
        fixes += [
            f"{key}={as_key(getattr(t_io, key))}"
            for key in ("patch_size", "img_size")
            if t_io is not None and tuple(getattr(s_io, key)) != tuple(getattr(t_io, key))
        ] or ["the teacher's img_size and patch_size"]
    if t_prefix != s_prefix:
        fixes.append(
            f"class_token=True, reg_tokens={t_prefix - 1}"
            if t_prefix >= 1
            else "class_token=False, global_pool='avg' (the teacher has no prefix token)"
        )
    raise PlanError(
        f"token grids differ: teacher has {fmt(t_grid)} patches + {t_prefix} prefix token(s), "
        f"student {fmt(s_grid)} + {s_prefix}. Give the student the teacher's tokens (attention maps are "
        f"token-by-token); for a timm ViT student, model.kwargs: {', '.join(fixes)}."
    )
