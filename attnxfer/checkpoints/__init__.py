"""Checkpoints (atomic safetensors + JSON, RNG state) and export of trained students with model cards."""
from .export import ModelCardInfo, export_run, export_student, push_export, select_checkpoint
from .rng import capture_rng_state, restore_rng_state
from .store import (CheckpointError, CheckpointExistsError, CheckpointInfo, CheckpointManager,
                    CorruptCheckpointError, CorruptCheckpointWarning, atomic_write_bytes, atomic_write_json,
                    atomic_write_text, load_checkpoint, optimizer_state_from_tensors, optimizer_state_to_tensors,
                    state_dict_from_tensors, state_dict_to_tensors, verify_checkpoint)

__all__ = ["capture_rng_state", "restore_rng_state", "CheckpointError", "CheckpointExistsError", "CheckpointInfo",
           "CheckpointManager", "CorruptCheckpointError", "CorruptCheckpointWarning", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text", "load_checkpoint", "optimizer_state_from_tensors",
           "optimizer_state_to_tensors", "state_dict_from_tensors", "state_dict_to_tensors", "verify_checkpoint",
           "ModelCardInfo", "export_run", "export_student", "push_export", "select_checkpoint"]
