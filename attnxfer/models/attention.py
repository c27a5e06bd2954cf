"""Transfer-aware softmax attention for timm ViTs.

`TransferAttention` is timm's `Attention` with the same parameters and names,
plus one per-call hook (`io`, an `AttentionIO`) through which a caller can

* capture the layer's ``(q, k, v)`` (after qk-norm), e.g. a teacher's,
* replace any of ``q``, ``k``, ``v`` with someone else's (attention copy),
* ask for the explicit N×N map (visualisation and tests only).

With a replaced ``q`` and ``k`` the layer is ``SDPA(q_t, k_t, v_s)``: the
teacher's attention map applied to the student's values without ever building
the map. Only the projections the layer actually needs are computed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

__all__ = [
    "AttentionIO",
    "PartialQKV",
    "TransferAttention",
    "make_transfer_aware",
    "transfer_attentions",
    "attention_io",
    "attention_maps",
    "sdpa",
]

_CHUNKS = ("q", "k", "v")


@dataclass
class AttentionIO:
    """Instructions for one call of a `TransferAttention`, and what it hands back.

    Overrides are (B, H, N, d) tensors in the layer's head layout. After the call,
    ``captured`` holds the layer's own q/k/v (only those requested in ``capture``)
    and ``map`` the explicit attention map if ``return_map`` was set.
    """

    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    capture: str = ""  # subset of "qkv"
    return_map: bool = False
    captured: Dict[str, torch.Tensor] = field(default_factory=dict)
    map: Optional[torch.Tensor] = None

    def override(self, name: str) -> Optional[torch.Tensor]:
        return getattr(self, name)


class PartialQKV(nn.Module):
    """A fused qkv projection whose q/k/v row blocks are trainable or frozen independently.

    A copied layer never uses its own q/k projections; keeping them as buffers
    (not parameters) means they get no gradient, no weight decay, and no optimizer
    state, while ``state_dict`` still reads and writes timm's ``qkv.weight`` /
    ``qkv.bias`` so checkpoints stay interchangeable with plain timm models.
    """

    def __init__(self, linear: nn.Linear, frozen: Iterable[str]):
        super().__init__()
        frozen = set(frozen)
        unknown = frozen - set(_CHUNKS)
        if unknown:
            raise ValueError(f"PartialQKV: unknown chunks {sorted(unknown)}; use a subset of 'q', 'k', 'v'")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.frozen = tuple(c for c in _CHUNKS if c in frozen)
        self.has_bias = linear.bias is not None
        rows = linear.out_features // 3
        for i, name in enumerate(_CHUNKS):
            w = linear.weight.detach()[i * rows:(i + 1) * rows].clone()
            b = linear.bias.detach()[i * rows:(i + 1) * rows].clone() if self.has_bias else None
            if name in frozen:
                self.register_buffer(f"{name}_weight", w)
                self.register_buffer(f"{name}_bias", b)
            else:
                self.register_parameter(f"{name}_weight", nn.Parameter(w))
                self.register_parameter(f"{name}_bias", nn.Parameter(b) if b is not None else None)

    def chunk(self, name: str):
        return getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.chunk(c)[0] for c in _CHUNKS], 0)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return torch.cat([self.chunk(c)[1] for c in _CHUNKS], 0) if self.has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    # timm-compatible serialisation: one `weight` (and `bias`) like nn.Linear.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w, b = self.weight, self.bias
        destination[prefix + "weight"] = w if keep_vars else w.detach()
        if b is not None:
            destination[prefix + "bias"] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        rows = self.out_features // 3
        for suffix in (("weight", "bias") if self.has_bias else ("weight",)):
            key = prefix + suffix
            if key not in state_dict:
                missing_keys.append(key)
                continue
            full = state_dict[key]
            if full.shape[0] != self.out_features:
                error_msgs.append(f"size mismatch for {key}: {tuple(full.shape)} vs {self.out_features} rows")
                continue
            with torch.no_grad():
                for i, name in enumerate(_CHUNKS):
                    getattr(self, f"{name}_{suffix}").copy_(full[i * rows:(i + 1) * rows])
        for key in state_dict:
            if key.startswith(prefix) and key[len(prefix):] not in ("weight", "bias"):
                rest = key[len(prefix):]
                if "." not in rest:
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen={self.frozen}"


class TransferAttention(Attention):
    """timm `Attention` that can hand out, take in, and show its q/k/v.

    Adds no parameters: a timm model built with it (``attn_layer=TransferAttention``)
    or converted with `make_transfer_aware` keeps timm's parameter names.
    """

    io: Optional[AttentionIO] = None

    def _projection(self, name: str):
        """(weight, bias) rows of the fused qkv for chunk ``name``."""
        if isinstance(self.qkv, PartialQKV):
            return self.qkv.chunk(name)
        i = _CHUNKS.index(name)
        rows = slice(i * self.attn_dim, (i + 1) * self.attn_dim)
        bias = self.qkv.bias[rows] if self.qkv.bias is not None else None
        return self.qkv.weight[rows], bias

    def project(self, x: torch.Tensor, which: str = "qkv") -> Dict[str, torch.Tensor]:
        """The requested heads (B, H, N, d) of q/k/v, qk-norm applied; skips the rest."""
        B, N, _ = x.shape
        which = "".join(c for c in _CHUNKS if c in which)
        out: Dict[str, torch.Tensor] = {}
        if which == "qkv" and isinstance(self.qkv, nn.Linear):
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = dict(zip(_CHUNKS, qkv.unbind(0)))
        else:
            for name in which:
                w, b = self._projection(name)
                out[name] = F.linear(x, w, b).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if "q" in out:
            out["q"] = self.q_norm(out["q"])
        if "k" in out:
            out["k"] = self.k_norm(out["k"])
        return out

    def freeze_projections(self, chunks: Iterable[str]) -> None:
        """Turn the given q/k/v projections into frozen buffers (copied layers don't use them)."""
        chunks = set(chunks)
        if not chunks:
            return
        linear = self.qkv
        if isinstance(linear, PartialQKV):
            if chunks <= set(linear.frozen):
                return  # already frozen: keep the module (and its parameters) as they are
            chunks |= set(linear.frozen)
            linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.has_bias)
            linear.load_state_dict(self.qkv.state_dict())
        self.qkv = PartialQKV(linear, chunks)
        for name in ("q", "k"):
            if name in chunks:
                for p in getattr(self, f"{name}_norm").parameters():
                    p.requires_grad_(False)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        io = self.io
        if io is None:
            return self._attend(x, self.project(x), attn_mask, is_causal, scale=None)
        given = {c: io.override(c) for c in _CHUNKS if io.override(c) is not None}
        own = self.project(x, "".join(c for c in _CHUNKS if c not in given or c in io.capture))
        for c in io.capture:
            io.captured[c] = own[c]
        # Borrowed tensors (a bf16 teacher's, say) join the layer's own working dtype.
        dtype = next(iter(own.values())).dtype if own else x.dtype
        qkv = {**own, **{c: t.to(dtype) for c, t in given.items()}}
        # A replaced q or k comes with its own scale (its head dim); SDPA's default
        # 1/sqrt(d_q) is exactly that when q is the teacher's.
        if io.return_map:
            io.map = explicit_attention_map(qkv["q"], qkv["k"], attn_mask=attn_mask)
        return self._attend(x, qkv, attn_mask, is_causal, scale=None)

    def _attend(self, x, qkv, attn_mask, is_causal, scale):
        B, N, _ = x.shape
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                   is_causal=is_causal, scale=scale)
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` that stays on the fused kernels when v's head dim differs from q's.

    Fused kernels need one head dim for q, k and v; with a teacher's q/k (d_t) and a student's v (d_s)
    torch falls back to the math path, which builds and keeps the N×N map. Zero-padding the narrower
    side to the common dim is exact (zeros add nothing to q·k, and padded value columns are cut off),
    with the logit scale pinned to q's original dim.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    scale = dq ** -0.5 if scale is None else scale
    if dq != dv:
        d = max(dq, dv)
        q, k = F.pad(q, (0, d - dq)), F.pad(k, (0, d - dq))
        v = F.pad(v, (0, d - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale)
    return out[..., :dv] if dq != dv else out


def explicit_attention_map(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) in fp32: the oracle, never the data path."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(~attn_mask, float("-inf"))
    return logits.softmax(dim=-1)


def make_transfer_aware(model: nn.Module) -> nn.Module:
    """Let every timm `Attention` in ``model`` take part in transfer, in place.

    `TransferAttention` subclasses timm's `Attention` and adds no state, so the
    class swap keeps every tensor, name and hook. Other attention types are an
    error: their q/k layout is not timm's standard one.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks`: attnxfer works with timm VisionTransformer-style models")
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if isinstance(attn, TransferAttention):
            continue
        if type(attn) is not Attention:
            raise TypeError(
                f"blocks.{i}.attn is {type(attn).__name__}; attnxfer's softmax transfer needs timm.layers.Attention "
                "(standard ViT/DeiT/MAE blocks). Build the model with attn_layer=TransferAttention or pick a standard ViT.")
        attn.__class__ = TransferAttention
    return model


def transfer_attentions(model: nn.Module) -> Sequence[TransferAttention]:
    """The model's per-block `TransferAttention` modules, in depth order."""
    attns = [blk.attn for blk in model.blocks]
    for i, a in enumerate(attns):
        if not isinstance(a, TransferAttention):
            raise TypeError(f"blocks.{i}.attn is {type(a).__name__}; call attnxfer.models.make_transfer_aware(model) first")
    return attns


@contextlib.contextmanager
def attention_io(attn: TransferAttention, io: Optional[AttentionIO]) -> Iterator[Optional[AttentionIO]]:
    """Attach ``io`` to ``attn`` for the duration of the block; always detaches."""
    attn.io = io
    try:
        yield io
    finally:
        attn.io = None


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, layers: Optional[Iterable[int]] = None) -> Dict[int, torch.Tensor]:
    """Explicit (B, H, N, N) softmax maps of the chosen blocks for input images ``x`` (fp32).

    For visualisation and tests: every map is materialised.
    """
    attns = transfer_attentions(model)
    layers = range(len(attns)) if layers is None else list(layers)
    ios = {i: AttentionIO(return_map=True) for i in layers}
    with contextlib.ExitStack() as stack:
        for i, io in ios.items():
            stack.enter_context(attention_io(attns[i], io))
        model.forward_features(x)
    return {i: io.map for i, io in ios.items()}
