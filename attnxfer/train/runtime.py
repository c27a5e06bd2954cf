"""Devices, precision and the process group, decided in one place for every trainer (never torch.cuda directly)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .devices import (
    Device,
    Precision,
    resolve_device,
    resolve_precision,
    teacher_dtype as teacher_dtype,
)
from .distributed import backend_for, init_distributed


def set_seed(seed: int) -> None:
    """Python, numpy and torch generators: the same initial weights on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """The accelerator (devices, DDP, autocast) and this process's place in the job."""

    accelerator: Any
    precision: Precision

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
    device: Device | str = Device.AUTO,
    precision: Precision | str = Precision.AUTO,
    accum_steps: int = 1,
    deterministic: bool = False,
    dist_timeout: float | None = None,
) -> Runtime:
    """Join the process group (gloo for device=cpu even on a GPU node; a clear error where ranks
    would share a GPU; ``dist_timeout``: how long a rank waits for a silent peer, `init_distributed`),
    then let accelerate own devices, DDP and autocast (it finds the group made, and makes none)."""
    from accelerate import Accelerator  # heavy: imported only when a run starts

    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    init_distributed(backend_for(device), dist_timeout)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # a notebook's earlier run set it too
    accelerator = Accelerator(
        cpu=target.type != "cuda",
        mixed_precision=precision.accelerate_name,
        gradient_accumulation_steps=accum_steps,
    )
    return Runtime(accelerator, precision)
