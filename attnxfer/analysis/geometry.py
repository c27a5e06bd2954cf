"""Where one layer's query rows and keys sit on the image (`LayerGeometry`), read from the shapes of what it
attended with: class-token maps, attention distance and rollout need layers that see the whole grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .signals import LayerSignals


@dataclass(frozen=True)
class LayerGeometry:
    """``kind``: ``global`` (prefix tokens and the whole grid, or a stage's coarser one), ``class`` (class
    attention), ``windows``, ``reduced`` (spatial reduction) or ``other``; ``grid``, ``patch``: the keys'."""

    kind: str
    prefix: int = 0
    grid: tuple[int, int] | None = None
    patch: tuple[float, float] | None = None
    windows: int = 0

    @property
    def whole(self) -> bool:
        """Keys are the whole image (prefix + grid)."""
        return self.kind in ("global", "class")

    @property
    def has_class_row(self) -> bool:
        """Query row 0 is the class token and its keys cover the grid."""
        return self.whole and self.prefix >= 1

    @property
    def query_prefix(self) -> int:
        """Query rows before the patch queries (all of them for class attention; 0 without a grid)."""
        return self.prefix if self.kind == "global" else 0

    @property
    def label(self) -> str:
        return {
            "global": "global",
            "class": "class attention",
            "windows": f"{self.windows} windows",
            "reduced": "reduced keys",
        }.get(self.kind, "partitioned")

    @property
    def class_map_note(self) -> str:
        """The word on the layer's row of a class-token picture: why it shows something else, or nothing."""
        if not self.whole:
            return self.label  # "4 windows", "reduced keys": no whole-image map
        return "" if self.has_class_row else "received"  # no class token: attention each patch receives


def layer_geometry(sig: LayerSignals, images: int, layout: Mapping[str, Any]) -> LayerGeometry:
    """`LayerGeometry` of ``sig`` for a batch of ``images`` whose model has ``layout`` (`token_layout`)."""
    b, nq, nk = sig.shape
    if b != images:
        return LayerGeometry("windows" if b % images == 0 else "other", windows=b // images)
    if nk < nq:
        return LayerGeometry("reduced")
    if not layout.get("grid"):
        return LayerGeometry("other")
    (gh, gw), (ph, pw) = layout["grid"], layout["patch"]
    if gh * gw <= nk <= gh * gw + max(1, layout.get("prefix", 0)):  # prefix keys: the model's, or one
        prefix = nk - gh * gw
        if nq == nk:
            return LayerGeometry("global", prefix, (gh, gw), (ph, pw))
        if nq <= prefix:
            return LayerGeometry("class", prefix, (gh, gw), (ph, pw))
    elif nq == nk and (gh * gw) % nk == 0:  # a later stage's coarser grid (hierarchical models)
        f = math.isqrt((gh * gw) // nk)
        if f * f * nk == gh * gw and gh % f == 0 and gw % f == 0:
            return LayerGeometry("global", 0, (gh // f, gw // f), (ph * f, pw * f))
    return LayerGeometry("other")
