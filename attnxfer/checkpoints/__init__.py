"""Checkpoints (atomic safetensors + JSON), teacher loading and export."""
from .export import ModelCardInfo, export_run, export_student, push_export, select_checkpoint
from .exported import load_student
from .rng import capture_rng_state, restore_rng_state
from .store import (CheckpointError, CheckpointExistsError, CheckpointInfo, CheckpointManager,
                    CorruptCheckpointError, CorruptCheckpointWarning, atomic_write_bytes, atomic_write_json,
                    atomic_write_text, load_checkpoint, optimizer_state_from_tensors, optimizer_state_to_tensors,
                    state_dict_from_tensors, state_dict_to_tensors, verify_checkpoint)
from .teacher import (TeacherLoadError, TeacherNotAvailable, TeacherRecord, UnsafeCheckpointError, fetch_teacher,
                      load_teacher)

__all__ = ["capture_rng_state", "restore_rng_state", "CheckpointError", "CheckpointExistsError", "CheckpointInfo",
           "CheckpointManager", "CorruptCheckpointError", "CorruptCheckpointWarning", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text", "load_checkpoint", "optimizer_state_from_tensors",
           "optimizer_state_to_tensors", "state_dict_from_tensors", "state_dict_to_tensors", "verify_checkpoint",
           "ModelCardInfo", "export_run", "export_student", "load_student", "push_export", "select_checkpoint", "TeacherLoadError",
           "TeacherNotAvailable", "TeacherRecord", "UnsafeCheckpointError", "fetch_teacher", "load_teacher"]
