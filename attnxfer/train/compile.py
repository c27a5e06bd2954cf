"""torch.compile of transformer blocks, in place: the one place a run's models get compiled.

The unit is the block, not the model. `TeacherStudent` walks the student's blocks one by one in lock-step with
the teacher's and hands q/k through a per-call `AttentionIO`; a compiled block reads that ``io`` like any
attribute (capturing q/k, or taking a teacher's), so the same graph serves every block of a kind: one
graph per (training, grad mode, io kind) for all blocks of the run, no graph breaks, no recompiles from
step to step (tests/training/test_throughput.py checks this with dynamo's counters). A plain student run
(``transfer.mode=none``) calls the student whole, whose forward calls the same compiled blocks.

``nn.Module.compile`` compiles a module's call in place: no ``_orig_mod.`` wrapper, so parameter names,
``state_dict``, checkpoints, EMA (a deep copy is not compiled) and export are those of the eager model.

Stochastic depth gives every block its own drop rate (0, 0.009, 0.018, ... for ViT-B at 0.1), and dynamo
specialises on a module's float attributes: with timm's ``DropPath`` each block would compile its own
graph (12 per kind, past dynamo's recompile limit of 8, after which blocks silently run eagerly). Before
compiling, `compile_blocks` therefore replaces each ``DropPath`` by `RateAsInputDropPath`, the same
operation with the keep probability in a non-persistent 0-d buffer: a graph input, not a constant.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import torch
import torch.nn as nn
from timm.layers import DropPath

from ..errors import InputError


class CompileMode(StrEnum):
    """torch.compile's ``mode`` for blocks. The CUDA-graph modes (``reduce-overhead``, ``max-autotune``)
    are not offered: blocks hand q/k and activations from one graph to the next, which a CUDA-graph replay
    may overwrite, and no GPU test here covers them."""

    DEFAULT = "default"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


COMPILE_MODES = tuple(CompileMode)


class RateAsInputDropPath(nn.Module):
    """timm's ``DropPath`` (per-sample stochastic depth) with the keep probability as a tensor.

    ``drop_prob`` stays a float for readers (`TeacherStudent`'s shared masks read it); ``forward`` reads only the
    ``keep_prob`` buffer (non-persistent: ``state_dict`` and checkpoints are unchanged). The mask is drawn
    in fp32 and cast, as a bf16 draw would round the probability.
    """

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
    """Compile each module of ``blocks`` in place (lazily: the first call traces), its drop-path rates
    made graph inputs (see the module docstring); returns how many."""
    try:
        mode = CompileMode(mode)
    except ValueError:
        raise InputError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}") from None
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
    """Whether ``module``'s own call is compiled (by `compile_blocks` / ``nn.Module.compile``): a teacher that
    a study's students share is compiled once."""
    return getattr(module, "_compiled_call_impl", None) is not None
