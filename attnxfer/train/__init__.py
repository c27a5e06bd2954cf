"""Training machinery: the engine's loop, devices and process groups, optimiser groups, EMA, metrics."""

from .ema import StudentEMA
from .optim import student_param_groups

__all__ = ["StudentEMA", "student_param_groups"]
