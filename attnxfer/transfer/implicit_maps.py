"""How close any attention's map is to a softmax teacher's, by the student's map kind.

A zoo attention (`attnxfer.models.efficient`) never builds its N×N map on the forward path, but
builds rows of it on request (``attention_map(q, k, rows)``). The teacher's map is
P_t = softmax(s·q_t k_tᵀ). Per layer, by the student's map kind:

* ``row_stochastic`` (rows are distributions): ``ce`` = mean over (batch, head, query) of
  −Σ_j P_t log A_s, the loss; KL = CE − H(P_t) is the agreement reported beside it;
* ``signed`` (Nyström, Linformer: rows may go negative, so no log): ``mse`` = mean over
  (batch, head, query, key) of (A_s − P_t)²;
* ``none`` (Hydra): no map; the caller compares attention outputs (``output`` MSE).

Everything runs in fp32 with autocast off, in query-row chunks. Under autograd each chunk is
checkpointed, so the backward pass recomputes a chunk's rows instead of keeping every chunk's
(B, H, rows, N) tensors. Zeros in a row-stochastic student map (window attention outside its
window) are floored at fp32's smallest normal number (log ≈ −87.3): the CE stays finite and
large where the student cannot put weight that the teacher does.

Hooks (`capture_attention`) read a ViT's per-layer attention input, q, k and output without
touching the attention code: on ``attn`` (input, output) and on ``attn.q_norm`` / ``attn.k_norm``
(q and k after the q/k norms, identities included), which timm's attention and every zoo
attention call on their forward path.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["MAP_LOSSES", "MapAgreement", "map_kind_of", "default_map_loss", "check_map_loss", "implicit_map_loss",
           "output_mse", "capture_attention", "capture_layer", "CAPTURE_FIELDS"]

#: loss name -> the map kinds it applies to
MAP_LOSSES: Dict[str, tuple] = {
    "ce": ("row_stochastic",),
    "mse": ("row_stochastic", "signed"),
    "output": ("row_stochastic", "signed", "none"),
}
_DEFAULT_LOSS = {"row_stochastic": "ce", "signed": "mse", "none": "output"}
#: what `implicit_map_loss` reports as its agreement metric, per loss
METRIC_NAMES = {"ce": "kl", "mse": "map_mse", "output": "output_mse"}
CAPTURE_FIELDS = ("input", "q", "k", "output")
# Elements of one (B, H, rows, N) chunk: 4M fp32 = 16 MiB (a chunk holds a few such tensors).
_CHUNK_BUDGET = 1 << 22


class MapAgreement(NamedTuple):
    """One layer's loss (differentiable w.r.t. the student) and its detached agreement metric."""

    loss: torch.Tensor
    metric: torch.Tensor
    metric_name: str


def map_kind_of(attn: nn.Module) -> str:
    """The attention's declared map kind; timm's softmax attention is row-stochastic."""
    kind = getattr(attn, "map_kind", None)
    return kind if kind is not None else "row_stochastic"


def default_map_loss(kind: str) -> str:
    return _DEFAULT_LOSS[kind]


def check_map_loss(loss: str, kind: str, where: str = "") -> str:
    """``loss`` ('auto' resolves by kind) if it applies to ``kind``, else a ValueError saying what does."""
    if loss == "auto":
        return default_map_loss(kind)
    if loss not in MAP_LOSSES:
        raise ValueError(f"unknown map loss {loss!r}; choose one of auto, {', '.join(MAP_LOSSES)}")
    if kind not in MAP_LOSSES[loss]:
        fits = [name for name, kinds in MAP_LOSSES.items() if kind in kinds]
        why = {"signed": "its map has negative entries, so log A is undefined",
               "none": "it has no attention map"}.get(kind, "")
        raise ValueError(f"{where}map loss {loss!r} does not apply to a {kind!r} attention ({why}); use "
                         f"{' or '.join(repr(f) for f in fits)} (or 'auto')")
    return loss


def _fp32(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _student_rows(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, rows: slice) -> torch.Tensor:
    if hasattr(attn, "attention_map"):
        return attn.attention_map(q, k, rows)
    scale = q.shape[-1] ** -0.5  # timm softmax attention (a TransferAttention student layer)
    return ((q[..., rows, :] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _teacher_rows(q_t: torch.Tensor, k_t: torch.Tensor, rows: slice) -> torch.Tensor:
    return ((q_t[..., rows, :] * q_t.shape[-1] ** -0.5) @ k_t.transpose(-2, -1)).softmax(dim=-1)


def _ce_chunk(attn, q_s, k_s, q_t, k_t, start: int, stop: int):
    """Sums over the chunk of −Σ_j P_t log A_s and of the teacher's entropy (no gradient)."""
    rows = slice(start, stop)
    a_s = _student_rows(attn, q_s, k_s, rows)
    p_t = _teacher_rows(q_t, k_t, rows)
    ce = -(p_t * torch.log(a_s.clamp_min(torch.finfo(a_s.dtype).tiny))).sum()
    entropy = -torch.special.xlogy(p_t, p_t).sum()
    return ce, entropy


def _mse_chunk(attn, q_s, k_s, q_t, k_t, start: int, stop: int):
    rows = slice(start, stop)
    diff = _student_rows(attn, q_s, k_s, rows) - _teacher_rows(q_t, k_t, rows)
    return diff.pow(2).sum(), diff.new_zeros(())


def _auto_chunk(q: torch.Tensor, n_keys: int, chunk: Optional[int]) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return chunk
    return max(1, min(q.shape[-2], _CHUNK_BUDGET // max(1, q.shape[0] * q.shape[1] * n_keys)))


def implicit_map_loss(
        attn: nn.Module,
        q_s: torch.Tensor,
        k_s: torch.Tensor,
        q_t: torch.Tensor,
        k_t: torch.Tensor,
        loss: str = "auto",
        chunk: Optional[int] = None,
) -> MapAgreement:
    """The ``loss`` ('ce' or 'mse'; 'auto' by map kind) between ``attn``'s implicit map on (q_s, k_s)
    and the softmax map of the teacher's (q_t, k_t), all (B, H, N, d) with equal B, H, N.

    Returns the loss (mean over rows for CE, over entries for MSE) and the detached metric: KL for
    CE, the loss itself for MSE. ``q_t``/``k_t`` get no gradient.
    """
    kind = map_kind_of(attn)
    loss = check_map_loss(loss, kind)
    if loss == "output":
        raise ValueError("the 'output' loss compares attention outputs, not maps: use output_mse()")
    if q_s.shape[:3] != q_t.shape[:3] or k_s.shape[-2] != k_t.shape[-2]:
        raise ValueError(f"teacher and student attention shapes differ: q {tuple(q_t.shape)} vs {tuple(q_s.shape)}; "
                         "the student needs the teacher's heads and tokens")
    B, H, N, _ = q_s.shape
    M = k_s.shape[-2]
    step = _auto_chunk(q_s, M, chunk)
    fn = _ce_chunk if loss == "ce" else _mse_chunk
    with _fp32(q_s.device.type):
        q_t, k_t = q_t.detach().float(), k_t.detach().float()
        q_s, k_s = q_s.float(), k_s.float()
        grad = torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad
                                            or any(p.requires_grad for p in attn.parameters()))
        total = entropy = q_s.new_zeros(())
        for start in range(0, N, step):
            stop = min(start + step, N)
            if grad:
                part, ent = checkpoint(fn, attn, q_s, k_s, q_t, k_t, start, stop, use_reentrant=False)
            else:
                part, ent = fn(attn, q_s, k_s, q_t, k_t, start, stop)
            total = total + part
            entropy = entropy + ent.detach()
        if loss == "ce":
            value = total / (B * H * N)
            metric = value.detach() - entropy / (B * H * N)
        else:
            value = total / (B * H * N * M)
            metric = value.detach()
    return MapAgreement(value, metric, METRIC_NAMES[loss])


def output_mse(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """MSE between two attention-module outputs (B, N, C) in fp32; the teacher's gets no gradient."""
    with _fp32(student_out.device.type):
        return F.mse_loss(student_out.float(), teacher_out.detach().float())


def _check_fields(fields: Sequence[str]) -> None:
    unknown = set(fields) - set(CAPTURE_FIELDS)
    if unknown:
        raise ValueError(f"capture_attention: unknown fields {sorted(unknown)}; choose from {CAPTURE_FIELDS}")


def _hook(attn: nn.Module, fields: Sequence[str], store: Dict[str, torch.Tensor], where: str) -> List:
    """Forward hooks that write ``attn``'s input / q / k / output into ``store``; returns their handles."""
    handles = []
    if "input" in fields:
        handles.append(attn.register_forward_pre_hook(lambda m, args: store.__setitem__("input", args[0])))
    if "output" in fields:
        handles.append(attn.register_forward_hook(lambda m, args, out: store.__setitem__("output", out)))
    for name in ("q", "k"):
        if name in fields:
            norm = getattr(attn, f"{name}_norm", None)
            if not isinstance(norm, nn.Module):
                for h in handles:
                    h.remove()
                raise TypeError(f"{where} ({type(attn).__name__}) has no {name}_norm module to read its {name} "
                                "from; expected timm's Attention or an attnxfer zoo attention")
            handles.append(norm.register_forward_hook(
                lambda m, args, out, name=name: store.__setitem__(name, out)))
    return handles


@contextlib.contextmanager
def capture_layer(attn: nn.Module, fields: Sequence[str] = CAPTURE_FIELDS) -> Iterator[Dict[str, torch.Tensor]]:
    """`capture_attention` for one attention module: yields its ``{field: tensor}`` dict."""
    _check_fields(fields)
    store: Dict[str, torch.Tensor] = {}
    handles = _hook(attn, fields, store, "attention")
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: Optional[Iterable[int]] = None,
                      fields: Sequence[str] = CAPTURE_FIELDS) -> Iterator[Dict[int, Dict[str, torch.Tensor]]]:
    """While active, each forward pass of ``model`` fills ``store[layer][field]`` for the chosen
    blocks: ``input`` (the attention's input, after norm1), ``q``/``k`` (B, H, N, d) after the q/k
    norms, ``output`` (after the projection). Tensors keep their graph (detach what you keep)."""
    _check_fields(fields)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks`: expected a timm VisionTransformer")
    layers = range(len(blocks)) if layers is None else list(layers)
    store: Dict[int, Dict[str, torch.Tensor]] = {i: {} for i in layers}
    handles: List = []
    try:
        for i in layers:
            handles += _hook(blocks[i].attn, fields, store[i], f"blocks.{i}.attn")
        yield store
    finally:
        for h in handles:
            h.remove()
