"""The rope families' conversion slot: a zoo attention in their place rotates q and k by the block's rope, so
one whose map kind rope would break is refused with its reason; a softmax layer stays as it is."""

from __future__ import annotations

from torch import nn

from ..map_kind import MapKind
from ..slots import ConversionSlot


class RopeSlot(ConversionSlot):
    """The conversion slot of a layer whose block passes a rotary embedding."""

    @classmethod
    def keeps(cls, zoo: type[nn.Module]) -> bool:
        return zoo.map_kind is MapKind.SOFTMAX  # a softmax block of a rope model keeps its own attention

    @classmethod
    def refusal(cls, zoo: type[nn.Module]) -> str | None:
        return None if getattr(zoo, "rope_keeps_map_kind", False) else zoo.rope_refusal()
