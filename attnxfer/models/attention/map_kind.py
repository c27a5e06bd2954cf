"""`MapKind`: what an attention's N×N map is, and so which loss distils it."""

from __future__ import annotations

from enum import StrEnum


class MapKind(StrEnum):
    """What an attention's N×N map is, and so how it is distilled.

    ``softmax`` is the row-stochastic kind with exact rows: a borrowed (q, k) reproduces the teacher's
    map exactly (attention copy), and the map loss is the exact O(N) cross-entropy. ``row_stochastic``
    maps (rows are distributions) take a chunked implicit CE, ``signed`` ones (rows may go negative) a
    map MSE, and ``none`` (no single map) only output losses.
    """

    SOFTMAX = "softmax"
    ROW_STOCHASTIC = "row_stochastic"
    SIGNED = "signed"
    NONE = "none"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def has_map(self) -> bool:
        return self is not MapKind.NONE

    @property
    def row_stochastic(self) -> bool:
        """Rows are probability distributions (softmax included)."""
        return self in (MapKind.SOFTMAX, MapKind.ROW_STOCHASTIC)

    @property
    def takes_borrowed_qk(self) -> bool:
        """A teacher's (q, k) in place of the layer's own gives the teacher's map exactly (attention copy)."""
        return self is MapKind.SOFTMAX

    def refines(self, other: MapKind | str) -> bool:
        """This kind is ``other`` or a special case of it (softmax refines row_stochastic)."""
        other = MapKind(other)
        return self is other or (other is MapKind.ROW_STOCHASTIC and self.row_stochastic)
