"""Seeing attention: agreement metrics between teacher and student maps, head correspondence, pictures.

``metrics``   pure functions on rows of maps (KL, JS, top-k overlap, rank correlation, entropy, attention
              distance, rollout, Hungarian head assignment)
``layout``    what tokens a model makes of an image (input size, prefix tokens, patch grid and pitch)
``signals``   what each attention layer attends with (`LayerSignals`: q, k, logit bias from the model's own
              forward), and rows of its map built from them a chunk at a time
``geometry``  where a layer's rows sit, read from its shapes (`LayerGeometry`: whole image, windows, ...)
``compare``   the walk over images and layers of any family with attention adapters, returning plain data
              (`Inspection`); ``layer_sums`` one teacher layer's row chunks reduced to per-head sums
``agreement`` `layer_agreement`, one number per layer for conversion reports
``maps``      class-token maps and rollout over the patch grid, for pictures
``pictures``  matplotlib figures (Agg) of class-token maps, rollout and per-layer curves
``positions`` where a hierarchical layer's rows and keys sit on the image (windows stitched back, reduced
              keys on their grid, Hiera's unrolled order): query pictures per stage, attention distance

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
