"""Linformer (Wang et al. 2020): keys and values projected along the sequence, N -> k, by E, F shared by
the heads (so a fixed ``seq_len``). They start as segment means: a fresh student is a pooled-key
approximation of the teacher, not noise. The map softmax(q (E k)^T s) F is signed."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import InputError
from ..attention.interface import MapKind
from ..attention.key_pooling import segments
from ..attention.numerics import PrecisionPolicy, matmul_fp32, matmul_split
from ..attention.opcount import OpCounts, matmul_ops, softmax_ops
from ..attention.registry import register_attention
from .base import EfficientAttention

LINFORMER_BF16 = PrecisionPolicy(
    bf16=(
        "E, k and F, v (sequence projections)",
        "q, E k as hi + lo halves (logits)",
        "scores, F v (read-out)",
    ),
    fp32=("E k and F v accumulated over N tokens", "logit and read-out accumulation", "the N x k softmax"),
    why="every product accumulates in fp32 and the softmax runs in fp32: bf16 only rounds operands, as in "
    "flash attention",
)


def project_sequence(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E x along the sequence, (k, N) x (..., N, d) -> (..., k, d) in fp32: one product over the strided
    q/k/v view, which a per-head batched product would copy first."""
    flat = x.movedim(-2, 0).reshape(x.shape[-2], -1)
    return matmul_fp32(e, flat).view(e.shape[0], *x.shape[:-2], x.shape[-1]).movedim(0, -2)


@register_attention("linformer")
class LinformerAttention(EfficientAttention):
    """Options: ``seq_len`` (required: N the module is built for), ``proj_len`` (k, default 64)."""

    map_kind = MapKind.SIGNED
    rope_keeps_map_kind = True
    rope_why = (
        "keeps signed: softmax(q (E k)^T) F is signed for any k; E mixes keys of different positions, so "
        "rope's relative form is not kept inside E k"
    )
    precision = LINFORMER_BF16
    repr_options = ("seq_len", "proj_len")
    grid_sized = (("proj_len", "tokens"),)  # projecting N keys onto more than N costs more than softmax

    def __init__(
        self, dim: int, num_heads: int = 8, *, seq_len: int | None = None, proj_len: int = 64, **kwargs
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if seq_len is None or seq_len < 1:
            raise InputError(
                "linformer needs seq_len, the fixed token count its E/F projections are built for "
                "(num_prefix_tokens + grid_h * grid_w, e.g. 197 for a 224px/16 ViT with a class token); a "
                "conversion fills it in from a fixed-size ViT teacher. One of any size (dynamic_img_size) has no "
                "one token count: give the run's in the attention options (convert.attention_kwargs or "
                "model.attention_kwargs: {seq_len: N}); one of stages (hierarchical) has one per stage, so "
                "linformer cannot convert it"
            )
        if proj_len < 1:
            raise InputError(f"proj_len must be >= 1, got {proj_len}")
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.seq_len = int(seq_len)
        self.proj_len = int(proj_len)
        self.seq_proj_k = nn.Parameter(torch.empty(self.proj_len, self.seq_len, **dd))
        self.seq_proj_v = nn.Parameter(torch.empty(self.proj_len, self.seq_len, **dd))
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        with torch.no_grad():
            rows = segments(self.seq_len, self.proj_len)
            init = (rows / rows.sum(-1, keepdim=True)).float()  # row r: the mean of segment r
            self.seq_proj_k.copy_(init)
            self.seq_proj_v.copy_(init)

    def grid_fit_error(self, built_grid: tuple[int, ...] = ()) -> InputError | None:
        """Also a ``seq_len`` given in the options that is not the model's token count (the swap fills in the
        model's; a dynamic-size model's, at the size it was built for: ``built_grid``): refused where the
        student is built, not at its first image, after the teacher's evaluation."""
        grid = self.grid_size or built_grid
        tokens = (self.num_prefix_tokens or 0) + math.prod(grid) if grid else None
        if tokens is not None and tokens != self.seq_len:
            drop = "drop seq_len (the model's token count is filled in) or " if self.grid_size else ""
            return InputError(
                f"seq_len {self.seq_len} is not the model's {tokens} tokens ({self.num_prefix_tokens or 0} prefix + "
                f"{'x'.join(map(str, grid))} grid): its E/F projections would refuse every image; {drop}set it "
                f"to {tokens}"
            )
        return super().grid_fit_error(built_grid)

    def _scores(self, q, k):
        num_tokens = q.shape[-2]
        if num_tokens != self.seq_len:
            raise InputError(
                f"linformer was built for seq_len={self.seq_len} tokens but got {num_tokens}; its E/F "
                f"projections have a fixed length: rebuild it with seq_len={num_tokens} (the attention options: "
                f"convert.attention_kwargs or model.attention_kwargs: {{seq_len: {num_tokens}}})"
            )
        # the scale on the (k, d) projected keys, not on the (N, k) logits
        k_short = project_sequence(self.seq_proj_k.to(k.dtype), k) * self.scale
        logits = matmul_split(q, k_short.transpose(-2, -1))
        return logits.softmax(dim=-1)  # (B, H, N, k), fp32

    def _attend(self, q, k, v):
        scores = self._scores(q, k)  # first: it refuses a token count other than seq_len
        v_short = project_sequence(self.seq_proj_v.to(v.dtype), v)
        return matmul_fp32(scores.to(v.dtype), v_short.to(v.dtype))

    def _map_context(self, q, k):
        return self._scores(q, k), self.seq_proj_v.to(q.dtype)

    def _map_rows(self, context, rows):
        scores, value_proj = context
        return scores[:, :, rows] @ value_proj

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts:
        n, d, kl = num_tokens, self.head_dim, self.proj_len
        per_head = 2 * matmul_ops(kl, n, d) + OpCounts(mul=n * d) + matmul_ops(n, d, kl)
        per_head = per_head + softmax_ops(n, kl) + matmul_ops(n, kl, d)
        return per_head * (batch * self.num_heads)
