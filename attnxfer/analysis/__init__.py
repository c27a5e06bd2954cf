"""Seeing attention: agreement metrics between teacher and student maps, head correspondence, pictures.

``metrics``   pure functions on rows of maps (KL, JS, top-k overlap, rank correlation, entropy, attention
              distance, rollout, Hungarian head assignment)
``compare``   the walk over images and layers (row chunks through each attention's ``attention_map``),
              returning plain data (`Inspection`); `layer_agreement` for conversion reports
``pictures``  matplotlib figures (Agg) of class-token maps, rollout and per-layer curves

Sits above ``transfer`` (it pairs layers as transfer plans do) and below ``sources``: it takes models and
tensors, never a config or a file.
"""

from .compare import (
    PAIR_METRICS,
    Inspection,
    LayerComparison,
    Subject,
    TeacherLayer,
    class_token_maps,
    compare_attention,
    layer_agreement,
    layer_qk,
    rollout_class_maps,
    token_layout,
)
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

__all__ = [
    "PAIR_METRICS",
    "Inspection",
    "LayerComparison",
    "Subject",
    "TeacherLayer",
    "attention_distance",
    "attention_rollout",
    "class_token_maps",
    "compare_attention",
    "head_assignment",
    "layer_agreement",
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
    "token_layout",
    "topk_overlap",
]
