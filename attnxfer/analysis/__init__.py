"""Seeing attention: agreement metrics between teacher and student maps, head correspondence, pictures.
Sits above ``transfer`` (it pairs layers as transfer plans do) and below ``sources``: it takes models and
tensors, never a config or a file.
"""

from ..models.attention import stage_of
from .agreement import layer_agreement
from .compare import (
    PAIR_METRICS,
    InspectedStudent,
    Inspection,
    LayerComparison,
    TeacherLayer,
    compare_attention,
)
from .geometry import LayerGeometry, layer_geometry
from .layout import NotInspectable, input_size, token_layout
from .maps import class_token_maps, has_rollout, rollout_class_maps, token_maps
from .metrics import (
    attention_distance,
    attention_rollout,
    head_assignment,
    patch_distances,
    pearson,
    renormalise,
    row_entropy,
    row_js,
    row_kl,
    row_squared_error,
    spearman_rows,
    topk_overlap,
)
from .signals import LayerSignals, borrowed_signals, layer_qk

__all__ = [
    "PAIR_METRICS",
    "InspectedStudent",
    "Inspection",
    "LayerComparison",
    "LayerGeometry",
    "LayerSignals",
    "NotInspectable",
    "TeacherLayer",
    "attention_distance",
    "attention_rollout",
    "borrowed_signals",
    "class_token_maps",
    "compare_attention",
    "has_rollout",
    "head_assignment",
    "input_size",
    "layer_agreement",
    "layer_geometry",
    "layer_qk",
    "patch_distances",
    "pearson",
    "renormalise",
    "rollout_class_maps",
    "row_entropy",
    "row_js",
    "row_kl",
    "row_squared_error",
    "spearman_rows",
    "stage_of",
    "token_layout",
    "token_maps",
    "topk_overlap",
]
