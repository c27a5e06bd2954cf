"""Checkpoints (atomic safetensors + JSON, RNG state) and export of trained students with model cards."""

from .export import (
    ModelCardInfo as ModelCardInfo,
    export_run as export_run,
    export_student as export_student,
    push_export as push_export,
)
from .rng import capture_rng_state as capture_rng_state, restore_rng_state as restore_rng_state
from .run_dir import RunDir as RunDir, select_checkpoint as select_checkpoint
from .store import (
    CheckpointError as CheckpointError,
    CheckpointExistsError as CheckpointExistsError,
    CheckpointInfo as CheckpointInfo,
    CheckpointManager as CheckpointManager,
    CorruptCheckpointError as CorruptCheckpointError,
    CorruptCheckpointWarning as CorruptCheckpointWarning,
    atomic_write_bytes as atomic_write_bytes,
    atomic_write_json as atomic_write_json,
    atomic_write_text as atomic_write_text,
    load_checkpoint as load_checkpoint,
    optimizer_state_from_tensors as optimizer_state_from_tensors,
    optimizer_state_to_tensors as optimizer_state_to_tensors,
    state_dict_from_tensors as state_dict_from_tensors,
    state_dict_to_tensors as state_dict_to_tensors,
    verify_checkpoint as verify_checkpoint,
)
