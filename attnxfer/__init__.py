"""attnxfer: attention transfer for Vision Transformers.

Attention copy (a student uses a teacher's attention maps), attention
distillation (a student learns them), and conversion of softmax teachers into
efficient-attention students; timm models throughout.
"""

from .checkpoints import export_run, export_student
from .models import TransferAttention, attention_maps, create_vit, make_transfer_aware, student_like
from .sources import fetch_teacher, load_student, load_teacher
from .transfer import DualViT, PlanError, TransferPlan, attention_distillation_loss, build_plan
from .version import __version__

__all__ = [
    "DualViT",
    "PlanError",
    "TransferAttention",
    "TransferPlan",
    "__version__",
    "attention_distillation_loss",
    "attention_maps",
    "build_plan",
    "create_vit",
    "export_run",
    "export_student",
    "fetch_teacher",
    "load_student",
    "load_teacher",
    "make_transfer_aware",
    "student_like",
]
