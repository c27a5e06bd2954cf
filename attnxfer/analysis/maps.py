"""Maps over the patch grid for pictures (class-token attention, rollout): whole rows of the whole-image
layers, meant for the few images of a picture, not for measuring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from ..models.attention.numerics import row_chunk, row_slices
from .geometry import LayerGeometry, layer_geometry
from .layout import token_layout
from .metrics import attention_rollout, renormalise
from .positions import in_raster_order, row_positions
from .signals import LayerSignals, layer_qk


def _signals(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None,
    qk: Sequence[LayerSignals] | None,
) -> list[LayerSignals]:
    if qk is not None and all(isinstance(s, LayerSignals) for s in qk):
        return list(qk)
    return layer_qk(model, x, borrow)


@torch.no_grad()
def token_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: Sequence[LayerSignals] | None = None,
) -> tuple[list[torch.Tensor | None], list[LayerGeometry]]:
    """Per layer (B, H, grid_h, grid_w) maps and the layer's geometry: the class token's attention over the
    patches, or without a class-token row the attention each patch receives; None for partitioned layers
    and attentions without a map. ``qk``: `layer_qk`'s output for ``x`` if already computed."""
    layout = token_layout(model, x.shape[-2:])
    positions = row_positions(model, x)
    maps: list[torch.Tensor | None] = []
    geometries = []
    for sig, pos in zip(_signals(model, x, borrow, qk), positions):
        geo = layer_geometry(sig, x.shape[0], layout)
        geometries.append(geo)
        if not (geo.whole and sig.kind.has_map):
            maps.append(None)
            continue
        if geo.has_class_row:
            row = sig.map_rows(slice(0, 1))[:, :, 0, geo.prefix :].clamp_min(0)
        else:
            row = _received(sig, geo)
            if pos is not None and pos.matches(sig, x.shape[0]):
                row = in_raster_order(row, pos)
        maps.append(renormalise(row).reshape(*row.shape[:2], *geo.grid).float().cpu())
    return maps, geometries


def _received(sig: LayerSignals, geo: LayerGeometry) -> torch.Tensor:
    """(B, H, P): the mean attention each patch key receives from the patch queries (row chunks)."""
    nq = sig.q.shape[-2]
    total = None
    for rows in row_slices(geo.query_prefix, nq, row_chunk(sig.q, sig.k.shape[-2], live_tensors=4)):
        part = sig.map_rows(rows)[..., geo.prefix :].clamp_min(0).sum(-2)
        total = part if total is None else total + part
    return total / max(1, nq - geo.query_prefix)


@torch.no_grad()
def class_token_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: Sequence[LayerSignals] | None = None,
) -> list[torch.Tensor | None]:
    """`token_maps` of the layers with a class-token row over the whole grid; None for the others."""
    maps, geometries = token_maps(model, x, borrow, qk)
    return [m if g.has_class_row else None for m, g in zip(maps, geometries)]


@torch.no_grad()
def rollout_class_maps(
    model: nn.Module,
    x: torch.Tensor,
    borrow: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    qk: Sequence[LayerSignals] | None = None,
) -> torch.Tensor:
    """The class token's row of the attention rollout over the patches, (B, grid_h, grid_w), through the
    layers over the model's whole token set (the others pass tokens through)."""
    layout = token_layout(model, x.shape[-2:])
    maps, prefix = [], None
    for sig in _signals(model, x, borrow, qk):
        geo = layer_geometry(sig, x.shape[0], layout)
        if not _rolls(geo, layout):
            maps.append(None)
            continue
        prefix = geo.prefix
        maps.append(sig.map_rows().clamp_min(0).mean(1) if sig.kind.has_map else None)
    if prefix is None:
        raise InputError(
            "attention rollout of the class token needs a model with a class token in its whole-image "
            "self-attention layers"
        )
    rolled = attention_rollout(maps)[:, 0, prefix:]
    return renormalise(rolled).reshape(rolled.shape[0], *layout["grid"]).float().cpu()


def _rolls(geo: LayerGeometry, layout: dict) -> bool:
    """Whether rollout goes through this layer: global self-attention over the class token and whole grid."""
    return geo.kind == "global" and geo.prefix >= 1 and tuple(geo.grid) == tuple(layout["grid"])


def has_rollout(model: nn.Module, x: torch.Tensor, qk: Sequence[LayerSignals]) -> bool:
    """Whether `rollout_class_maps` has layers to roll out for ``model`` on ``x``."""
    layout = token_layout(model, x.shape[-2:])
    return any(_rolls(layer_geometry(sig, x.shape[0], layout), layout) for sig in qk)
