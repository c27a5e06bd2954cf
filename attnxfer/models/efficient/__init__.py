"""The efficient-attention zoo: drop-in replacements for timm's ``Attention`` with a declared map kind.

Every class keeps timm's parameter names (qkv, q_norm, k_norm, norm, proj), exposes
``attend(q, k, v)``, ``attention_map(q, k, rows)`` and ``new_parameter_names()``, and is
registered by name:

=================  ==============  =============================================================
name               map kind        family
=================  ==============  =============================================================
softmax            row_stochastic  SDPA softmax (the teacher's attention)
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
=================  ==============  =============================================================
"""
from .registry import create_attention, get_attention_class, list_attentions, register_attention
from .base import COUNTERPART_MODULES, MAP_KINDS, EfficientAttention
from .softmax import SoftmaxAttention
from .linear import ELULinearAttention, ReLULinearAttention
from .performer import PerformerAttention
from .hedgehog import HedgehogAttention
from .cosformer import CosFormerAttention
from .focused import FocusedLinearAttention
from .agent import AgentAttention
from .window import WindowAttention, WindowLinearAttention
from .nystrom import NystromAttention
from .linformer import LinformerAttention
from .hydra import HydraAttention
from .student import configure_token_layout, efficient_student_from_teacher, new_parameters

__all__ = [
    'register_attention', 'create_attention', 'get_attention_class', 'list_attentions',
    'EfficientAttention', 'COUNTERPART_MODULES', 'MAP_KINDS',
    'SoftmaxAttention', 'ReLULinearAttention', 'ELULinearAttention', 'PerformerAttention', 'HedgehogAttention',
    'CosFormerAttention', 'FocusedLinearAttention', 'AgentAttention', 'WindowAttention', 'WindowLinearAttention',
    'NystromAttention', 'LinformerAttention', 'HydraAttention',
    'efficient_student_from_teacher', 'new_parameters', 'configure_token_layout',
]
