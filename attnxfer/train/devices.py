"""Where a run executes and in which precision: the config's words as `StrEnum`s, decided in one place."""

from __future__ import annotations

from enum import StrEnum

import torch

from ..errors import InputError


class Device(StrEnum):
    """The config's ``device``: ``auto`` is CUDA when one is visible, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    @property
    def uses_cuda(self) -> bool:
        return self is Device.CUDA or (self is Device.AUTO and torch.cuda.is_available())


class Precision(StrEnum):
    """The config's ``precision``; ``auto`` is bf16 on GPU and fp32 on CPU (see `resolve_precision`)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self]

    @property
    def accelerate_name(self) -> str:
        return "no" if self is Precision.FP32 else self.value

    @property
    def autocasts(self) -> bool:
        return self in (Precision.BF16, Precision.FP16)

    def autocast(self, device: torch.device) -> torch.autocast:
        """A fresh autocast context for a forward on ``device`` in this precision (off for fp32)."""
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.autocasts)


#: names a user writes for dtypes (config: teacher.dtype, precision); "auto" is decided by the device
TORCH_DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def member(enum: type[StrEnum], value: str, what: str) -> StrEnum:
    """``enum(value)``, or one `error:` line naming the choices."""
    try:
        return enum(value)
    except ValueError:
        raise InputError(f"{what} must be one of {', '.join(m.value for m in enum)}, got {value!r}") from None


def resolve_device(device: Device | str) -> torch.device:
    """``auto`` is CUDA when one is visible, else CPU; ``cuda`` without a GPU is a clear error."""
    device = member(Device, device, "device")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise InputError("device=cuda was requested but no CUDA device is visible; use device=cpu or auto")
    return torch.device("cuda", torch.cuda.current_device()) if device.uses_cuda else torch.device("cpu")


def resolve_precision(precision: Precision | str, device: torch.device) -> Precision:
    """``auto`` trains bf16 on GPU and fp32 on CPU."""
    precision = member(Precision, precision, "precision")
    if precision is Precision.AUTO:
        return Precision.BF16 if device.type == "cuda" else Precision.FP32
    return precision


def teacher_dtype(name: Precision | str, precision: Precision | str | None = None) -> torch.dtype | None:
    """The teacher's dtype for a config name. ``auto`` follows the run's resolved ``precision`` (so
    ``precision=fp32`` runs the teacher in fp32 too); without one, None = decided by the device."""
    name = member(Precision, name, "teacher.dtype")
    if name is not Precision.AUTO:
        return name.dtype
    if not precision:
        return None
    precision = member(Precision, precision, "precision")
    return None if precision is Precision.AUTO else precision.dtype
