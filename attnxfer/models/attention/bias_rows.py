"""`BiasRows`: an additive logit bias handed out a block of query rows at a time, so the chunked CE of biased
logits gathers each chunk's rows from a small table (BEiT, ``RelPosBias``/``RelPosMlp``) and sends their
gradient back chunk by chunk, never holding the N×N bias or its gradient whole; ``rows_fn(rows, *inputs)``
must be a pure, differentiable function of ``inputs``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BiasRows:
    """An additive logit bias of ``shape`` (B or 1, H, N_q, N_k) whose rows ``rows_fn(rows, *inputs)`` gives."""

    rows_fn: Callable[..., torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    shape: tuple[int, int, int, int]

    @classmethod
    def of_tensor(cls, bias: torch.Tensor) -> BiasRows:
        bias = bias.unsqueeze(0) if bias.dim() == 3 else bias
        return cls(_tensor_rows, (bias,), tuple(bias.shape))

    def rows(self, rows: slice) -> torch.Tensor:
        return self.rows_fn(rows, *self.inputs)

    def full(self) -> torch.Tensor:
        return self.rows(slice(0, self.shape[-2]))

    def detach(self) -> BiasRows:
        return BiasRows(self.rows_fn, tuple(t.detach() for t in self.inputs), self.shape)

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self.inputs)


def _tensor_rows(rows: slice, bias: torch.Tensor) -> torch.Tensor:
    return bias[..., rows, :]


def bias_block(bias: torch.Tensor | BiasRows, rows: slice) -> torch.Tensor:
    return bias.rows(rows) if isinstance(bias, BiasRows) else bias[..., rows, :]


def full_bias(bias: torch.Tensor | BiasRows | None) -> torch.Tensor | None:
    return bias.full() if isinstance(bias, BiasRows) else bias


def gathered_bias_rows(
    values: torch.Tensor,
    index: torch.Tensor,
    tokens: int,
    *,
    prefix_pad: int = 0,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    extra: torch.Tensor | None = None,
) -> BiasRows:
    """The bias ``B[h, i, j] = post(values[index[i, j], h])`` (1, H, N, N) as rows gathered per chunk:
    ``prefix_pad`` leading rows and columns zero (``RelPosMlp``), ``extra`` (a shared bias) added."""
    n = tokens - prefix_pad
    index = index.reshape(n, n)
    H = values.shape[-1]

    def rows_fn(rows: slice, values: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        start, stop, _ = rows.indices(tokens)
        inner = slice(max(start - prefix_pad, 0), max(stop - prefix_pad, 0))
        block = values[index[inner]].permute(2, 0, 1)  # (H, r_inner, n)
        if post is not None:
            block = post(block)
        if prefix_pad:
            top = max(min(stop, prefix_pad) - start, 0)
            block = F.pad(block, (prefix_pad, 0, top, 0))
        block = block.unsqueeze(0)
        if more:
            shared = more[0]
            block = block + (shared.unsqueeze(0) if shared.dim() == 3 else shared)[..., rows, :]
        return block

    inputs = (values,) if extra is None else (values, extra)
    return BiasRows(rows_fn, inputs, (1, H, tokens, tokens))
