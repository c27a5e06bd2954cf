"""What the rope families (EVA, Qwen3-ViT, Gemma4-ViT) share in a conversion: their blocks hand the attention a
rotary embedding per call, so a zoo attention in their place must rotate q and k by it before its feature map.

`RopeSlot` keeps a layer for which softmax is chosen as it is (its rope with it) and refuses a zoo attention
that does not declare that rope keeps its map kind (``rope_keeps_map_kind``), with that attention's reason.
"""

from __future__ import annotations

from torch import nn

from ..map_kind import MapKind
from ..slots import ConversionSlot


class RopeSlot(ConversionSlot):
    """The conversion slot of a layer whose block passes a rotary embedding (see the module docstring)."""

    @classmethod
    def keeps(cls, zoo: type[nn.Module]) -> bool:
        return zoo.map_kind is MapKind.SOFTMAX  # a softmax block of a rope model keeps its own attention

    @classmethod
    def refusal(cls, zoo: type[nn.Module]) -> str | None:
        if getattr(zoo, "rope_keeps_map_kind", False):
            return None
        return zoo.rope_refusal()
