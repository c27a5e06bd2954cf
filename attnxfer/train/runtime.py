"""One place that decides devices, precision and the process group for every trainer.

The engine, conversion's stage 1 and the apps ask this module, never torch.cuda directly, so a
CPU-only machine and a GPU node take the same code path with one decision in between.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .distributed import backend_for, init_distributed

__all__ = ["TORCH_DTYPES", "Runtime", "create_runtime", "resolve_device", "resolve_precision", "set_seed"]

#: names a user writes for dtypes (config: teacher.dtype); "auto" is decided by the device
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when one is visible, else CPU; ``cuda`` without a GPU is a clear error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but no CUDA device is visible; use device=cpu or auto")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` trains bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in _MIXED:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def set_seed(seed: int) -> None:
    """Python, numpy and torch generators: the same initial weights on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """The accelerator (devices, DDP, autocast) and this process's place in the job."""

    accelerator: Any
    precision: str

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def create_runtime(
    device: str = "auto", precision: str = "auto", accum_steps: int = 1, deterministic: bool = False
) -> Runtime:
    """Join the process group (gloo for device=cpu even on a GPU node; a clear error where ranks
    would share a GPU), then let accelerate own devices, DDP and autocast."""
    from accelerate import Accelerator  # heavy: imported only when a run starts

    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    init_distributed(backend_for(device))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        cpu=target.type != "cuda", mixed_precision=_MIXED[precision], gradient_accumulation_steps=accum_steps
    )
    return Runtime(accelerator, precision)


def teacher_dtype(name: str, precision: str | None = None) -> torch.dtype | None:
    """The teacher's dtype for a config name. ``auto`` follows the run's resolved ``precision`` (so
    ``precision=fp32`` runs the teacher in fp32 too); without one, None = decided by the device."""
    if name != "auto":
        return TORCH_DTYPES[name]
    return TORCH_DTYPES.get(precision) if precision else None
