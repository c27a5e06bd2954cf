"""How transformer blocks run: timm's gradient checkpointing (`checkpoint_gradients`), and torch.compile of
the blocks, in place (``nn.Module.compile``: parameter names, checkpoints, EMA and
export stay the eager model's): one graph per (training, grad mode, io kind) for all blocks of a kind, no
graph breaks and no recompiles from step to step (tests/training/test_throughput.py counts them).

Dynamo specialises on a module's float attributes, and stochastic depth gives every block its own rate: with
timm's ``DropPath`` each block would compile its own graph (past the recompile limit of 8, after which blocks
silently run eagerly). `compile_blocks` therefore swaps in `RateAsInputDropPath`, the rate a graph input.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..errors import InputError
from .devices import member


class CompileMode(StrEnum):
    """torch.compile's ``mode`` for blocks. No CUDA-graph modes: blocks hand q/k and activations from one graph
    to the next, which a CUDA-graph replay may overwrite."""

    DEFAULT = "default"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


class RateAsInputDropPath(nn.Module):
    """timm's ``DropPath`` with the keep probability in a non-persistent buffer (``drop_prob`` stays a float
    for `TeacherStudent`'s shared masks). The mask is drawn in fp32 and cast: a bf16 draw would round it."""

    def __init__(self, drop_prob: float, scale_by_keep: bool = True, device: torch.device | None = None):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise InputError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = self.keep_prob.float()
        mask = (torch.rand(shape, device=x.device) < keep).float()
        if self.scale_by_keep:
            mask = mask / keep
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f} (rate as a graph input)"


def compile_blocks(blocks: Iterable[nn.Module], mode: CompileMode | str = CompileMode.DEFAULT) -> int:
    """Compile each of ``blocks`` in place (the first call traces), drop-path rates made graph inputs."""
    mode = member(CompileMode, mode, "compile mode")
    blocks = list(blocks)
    # timm's ``DropPath`` children become `RateAsInputDropPath` (same rate and device), and where some block
    # has a ``DropPath`` under a name, the others' ``Identity`` (rate 0) under that name too: blocks compiled
    # together then have the same module types, so one graph fits all of them
    names = {name for b in blocks for name, child in b.named_children() if type(child) is DropPath}
    for block in blocks:
        device = next((t.device for t in block.parameters()), None)
        for name in names:
            child = getattr(block, name, None)
            if type(child) is DropPath:
                setattr(block, name, RateAsInputDropPath(child.drop_prob, child.scale_by_keep, device))
            elif type(child) is nn.Identity:
                setattr(block, name, RateAsInputDropPath(0.0, True, device))
    for block in blocks:
        block.compile(mode=mode.value)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module``'s own call is compiled (a teacher that a study's students share is compiled once)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def checkpoint_gradients(model: nn.Module) -> None:
    """timm's gradient checkpointing of ``model``'s blocks (``model.grad_checkpointing``): their activations
    recomputed in the backward pass. A `TeacherStudent` keeps what it lends them for that
    (`TeacherStudent.kept_for_backward`), so the gradients are the same."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError):  # a model without the switch; timm's models without it assert
        raise InputError(
            f"model.grad_checkpointing=true: timm's {type(model).__name__} has no gradient checkpointing; remove "
            "it (to fit in memory, divide data.batch_size and multiply optim.accum_steps by the same factor)"
        ) from None
