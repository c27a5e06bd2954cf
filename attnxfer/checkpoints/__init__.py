"""Checkpoints (atomic safetensors + JSON, RNG state) and export of trained students with model cards."""

from .export import ModelCardInfo, export_run, export_student, push_export
from .rng import capture_rng_state, restore_rng_state
from .run_dir import RunDir, select_checkpoint
from .store import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointInfo,
    CheckpointManager,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    state_dict_from_tensors,
    state_dict_to_tensors,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "ModelCardInfo",
    "RunDir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "capture_rng_state",
    "export_run",
    "export_student",
    "load_checkpoint",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "push_export",
    "restore_rng_state",
    "select_checkpoint",
    "state_dict_from_tensors",
    "state_dict_to_tensors",
    "verify_checkpoint",
]
