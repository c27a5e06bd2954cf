"""The efficient-attention zoo: drop-in replacements for timm's ``Attention`` with a declared map kind.

Every class meets the one attention interface (`attnxfer.models.attention.TransferableAttention`:
timm's parameter names qkv, q_norm, k_norm, norm, proj; ``project``, ``attend``,
``attention_map(q, k, rows)``, ``map_kind``, the per-call ``AttentionIO``), adds
``new_parameter_names()``, and is registered by name in the one attention registry
(`attnxfer.models.attention.registry`), beside softmax. A new attention is one file here:
subclass `EfficientAttention` (or `KernelAttention`), implement ``_attend`` and the map rows,
decorate with ``@register_attention('name')`` and import it below.

=================  ==============  =============================================================
name               map kind        family
=================  ==============  =============================================================
softmax            softmax         SDPA softmax, the teacher's attention (``TransferAttention``)
relu_linear        row_stochastic  linear attention, relu(x) + eps features
elu_linear         row_stochastic  linear attention, elu(x) + 1 features
performer          row_stochastic  FAVOR+, positive orthogonal random features
hedgehog           row_stochastic  learnable per-head softmax features, both signs
cosformer          row_stochastic  ReLU kernel with cos re-weighting by position
focused_linear     row_stochastic  FLatten focusing kernel (+ depthwise conv on v, outside the map)
agent              row_stochastic  pooled agent tokens, two softmaxes
window             row_stochastic  softmax in 2-D windows, prefix tokens global
window_linear      row_stochastic  window softmax + kernel scores outside, one normaliser
nystrom            signed          Nystrom landmarks, iterative pseudo-inverse
linformer          signed          learned sequence projections E, F (fixed N)
hydra              none            Hydra: per-channel cosine kernel
hashing            row_stochastic  EcoFormer: b-bit binary codes of q, k; Hamming-affinity kernel
none               none            attention-free block (LIT): the branch adds nothing, the MLP stays
formula:<prog>     row_stochastic  a kernel attention from a program (formula.py); ``len`` programs: signed
=================  ==============  =============================================================

Precision: each class declares ``precision`` (a `PrecisionPolicy`, `precision_policies()` lists them):
on GPU, bf16 operands with fp32 sums where a test shows it safe, fp32 otherwise.

Token layout: timm ViTs put ``num_prefix_tokens`` class/register tokens before the H x W grid.
Attentions that need the grid (window, window_linear, agent, focused_linear's conv) read it
from ``num_prefix_tokens`` / ``grid_size`` kwargs or ``set_token_layout``
(``configure_token_layout(vit)`` sets every layer; ``efficient_student_from_teacher`` does it
for you), else infer a square grid with the fewest prefix tokens. Prefix tokens always attend
to every token and are attended to by every token: window attentions give them exact softmax
rows and put them in every window's key set; agent attention pools agents from grid tokens only
but lets prefix tokens attend through and be attended by the agents; focused linear's conv skips
them (its kernel part treats them like any token); cosFormer gives them the first positions;
Nystrom/Linformer put them in the first landmark segment. The global kernels (linear, performer,
hedgehog, hydra) do not distinguish them at all.
"""

from ..attention.interface import COUNTERPART_MODULES, MapKind
from ..attention.registry import (
    attention_layer,
    create_attention,
    get_attention_class,
    list_attentions,
    register_attention,
)
from .agent import AgentAttention
from .base import EfficientAttention, precision_policies
from .cosformer import CosFormerAttention
from .focused import FocusedLinearAttention
from .formula import FormulaAttention
from .hashing import HashingAttention
from .hedgehog import HedgehogAttention
from .hydra import HydraAttention
from .linear import ELULinearAttention, ReLULinearAttention
from .linformer import LinformerAttention
from .none import NoAttention
from .nystrom import NystromAttention
from .performer import PerformerAttention
from .swap import (
    build_efficient_student,
    check_softmax_teacher,
    configure_token_layout,
    efficient_student_from_teacher,
    new_parameters,
    set_drop_path,
    swap_attentions,
    with_attention,
)
from .window import WindowAttention, WindowLinearAttention

__all__ = [
    "COUNTERPART_MODULES",
    "AgentAttention",
    "CosFormerAttention",
    "ELULinearAttention",
    "EfficientAttention",
    "FocusedLinearAttention",
    "FormulaAttention",
    "HashingAttention",
    "HedgehogAttention",
    "HydraAttention",
    "LinformerAttention",
    "MapKind",
    "NoAttention",
    "NystromAttention",
    "PerformerAttention",
    "ReLULinearAttention",
    "WindowAttention",
    "WindowLinearAttention",
    "attention_layer",
    "build_efficient_student",
    "check_softmax_teacher",
    "configure_token_layout",
    "create_attention",
    "efficient_student_from_teacher",
    "get_attention_class",
    "list_attentions",
    "new_parameters",
    "precision_policies",
    "register_attention",
    "set_drop_path",
    "swap_attentions",
    "with_attention",
]
