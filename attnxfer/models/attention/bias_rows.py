"""`BiasRows`: an additive logit bias handed out a block of query rows at a time.

A relative-position bias is N×N per layer, but it is *gathered* from a small table
(``table[index[i, j], h]``: BEiT, timm's ``RelPosBias``/``RelPosMlp``). The exact CE of biased logits
walks query-row chunks (`attnxfer.transfer.losses.biased_attention_ce`); with a `BiasRows` it gathers
each chunk's bias rows when it needs them and sends their gradient back into the table chunk by chunk,
so neither the bias nor its gradient is ever held whole. A bias that is only known as a full tensor
(SAM's input-dependent decomposed bias, BEiT's model-wide shared bias) is wrapped by `BiasRows.of_tensor`:
rows are views, and its gradient is the tensor's size.

``rows_fn(rows, *inputs)`` must be a pure, differentiable function of ``inputs`` (the tensors the bias is
computed from: a table, a shared bias) returning (B or 1, H, len(rows), N_k).
"""

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
        """A full bias tensor (H, N_q, N_k) or (B or 1, H, N_q, N_k) as rows of itself."""
        bias = bias.unsqueeze(0) if bias.dim() == 3 else bias
        return cls(_tensor_rows, (bias,), tuple(bias.shape))

    def rows(self, rows: slice) -> torch.Tensor:
        """(B or 1, H, len(rows), N_k), differentiable w.r.t. ``inputs``."""
        return self.rows_fn(rows, *self.inputs)

    def full(self) -> torch.Tensor:
        """The whole bias (for SDPA's ``attn_mask`` in attention copy, and for oracles)."""
        return self.rows(slice(0, self.shape[-2]))

    def detach(self) -> BiasRows:
        return BiasRows(self.rows_fn, tuple(t.detach() for t in self.inputs), self.shape)

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self.inputs)


def _tensor_rows(rows: slice, bias: torch.Tensor) -> torch.Tensor:
    return bias[..., rows, :]


def bias_block(bias: torch.Tensor | BiasRows, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of a bias given as a tensor or as `BiasRows`."""
    return bias.rows(rows) if isinstance(bias, BiasRows) else bias[..., rows, :]


def full_bias(bias: torch.Tensor | BiasRows | None) -> torch.Tensor | None:
    """The whole bias tensor of a tensor, a `BiasRows` or None."""
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
    """The bias ``B[h, i, j] = post(values[index[i, j], h])`` (1, H, N, N) as rows gathered per chunk.

    ``values`` (L, H) is the table (a parameter, or a small tensor computed from parameters: ``RelPosMlp``'s
    MLP output); ``index`` holds (tokens − prefix_pad)² table rows; ``prefix_pad`` leading query rows and
    key columns are zero (timm pads the prefix tokens of ``RelPosMlp``'s bias), ``post`` is elementwise
    (an activation, a gain) and applies before the padding; ``extra`` (H, N, N) or (1, H, N, N), if given,
    is added (BEiT's shared bias: a full tensor).
    """
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
