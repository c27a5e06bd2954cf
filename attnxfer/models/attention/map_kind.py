"""`MapKind`: what an attention's N×N map is, and so which loss distils it."""

from __future__ import annotations

from enum import StrEnum


class MapKind(StrEnum):
    """``softmax``: a borrowed (q, k) gives the teacher's map exactly, the exact O(N) CE; ``row_stochastic``:
    a chunked implicit CE; ``signed`` (rows may go negative): a map MSE; ``none``: only output losses."""

    SOFTMAX = "softmax"
    ROW_STOCHASTIC = "row_stochastic"
    SIGNED = "signed"
    NONE = "none"

    @property
    def has_map(self) -> bool:
        return self is not MapKind.NONE

    @property
    def row_stochastic(self) -> bool:
        return self in (MapKind.SOFTMAX, MapKind.ROW_STOCHASTIC)

    @property
    def takes_borrowed_qk(self) -> bool:
        """A teacher's (q, k) in place of the layer's own gives the teacher's map exactly (attention copy)."""
        return self is MapKind.SOFTMAX

    def refines(self, other: MapKind | str) -> bool:
        other = MapKind(other)
        return self is other or (other is MapKind.ROW_STOCHASTIC and self.row_stochastic)
