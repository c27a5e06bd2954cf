"""Seeing attention: agreement metrics between teacher and student maps, head correspondence, pictures.

``metrics``   pure functions on rows of maps (KL, JS, top-k overlap, rank correlation, entropy, attention
              distance, rollout, Hungarian head assignment)
``compare``   the walk over images and layers of any family with attention adapters (each model's own
              forward captures q, k and the logit bias; maps are built a row chunk at a time), returning
              plain data (`Inspection`); `layer_agreement` for conversion reports
``pictures``  matplotlib figures (Agg) of class-token maps, rollout and per-layer curves
``positions`` where a hierarchical layer's rows and keys sit on the image (windows stitched back, reduced
              keys on their grid, Hiera's unrolled order): query pictures per stage, attention distance

Sits above ``transfer`` (it pairs layers as transfer plans do) and below ``sources``: it takes models and
tensors, never a config or a file.
"""

from .compare import (
    PAIR_METRICS,
    Inspection,
    LayerComparison,
    LayerGeometry,
    LayerSignals,
    NotInspectable,
    Subject,
    TeacherLayer,
    class_token_maps,
    compare_attention,
    has_rollout,
    input_size,
    layer_agreement,
    layer_geometry,
    layer_qk,
    rollout_class_maps,
    stage_of,
    token_layout,
    token_maps,
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
    "LayerGeometry",
    "LayerSignals",
    "NotInspectable",
    "Subject",
    "TeacherLayer",
    "attention_distance",
    "attention_rollout",
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
