"""The common body of every zoo attention: timm's parameter names (so a softmax teacher's weights load
unchanged) on the one attention interface. Cores run with autocast off in the dtype ``precision`` allows
(fp32 by default: feature maps and exponentials overflow or lose their tail in fp16/bf16)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import InputError
from ..attention.families._projections import apply_rope
from ..attention.interface import MapKind, TransferableAttention, as_grid
from ..attention.numerics import FP32_CORE, PrecisionPolicy, fp32_section, operand_dtype, upcast
from ..attention.registry import get_attention_class, list_attentions


class GridFitError(InputError):
    """An option larger than the token grid allows: set by the user's options (``*.attention_kwargs``) even where
    its value is the attention's default (a size the attention's name sets, a formula's ``win``: `InputError`)."""


class EfficientAttention(TransferableAttention):
    """Base class: timm's ``Attention`` constructor (``attn_layer=Cls`` works) plus token layout and
    the subclass's options. ``attn_drop`` acts only where the map is explicit (window) but exists everywhere,
    so state dicts and hooks look like timm's."""

    map_kind = MapKind.ROW_STOCHASTIC
    #: Which parts of the core may take bf16 operands on GPU (fp32 accumulation always); see `PrecisionPolicy`.
    precision: PrecisionPolicy = FP32_CORE
    #: Whether a teacher's rotary embedding (a rope family's), applied to q and k before this
    #: attention builds its map, leaves ``map_kind`` true; ``rope_why`` says why (one line, from the math).
    #: Students of rope teachers are refused where it is False (`rope_support`). Each attention declares it.
    rope_keeps_map_kind: ClassVar[bool] = False
    rope_why: ClassVar[str] = (
        "undeclared: its class sets no rope_keeps_map_kind and rope_why (whether a rotary embedding keeps its "
        "map kind, and why)"
    )
    #: timm's rope layout for this layer (half-rotation vs interleaved), copied from the teacher's attention.
    rotate_half: bool = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        attn_head_dim: int | None = None,
        num_prefix_tokens: int | None = None,
        grid_size: int | Sequence[int] | None = None,
        depth: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {sorted(kwargs)}; "
                f"its own options are: {', '.join(self.own_options()) or '(none)'}"
            )
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; pass attn_head_dim")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm/scale_norm need a norm_layer (e.g. nn.LayerNorm)")
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.depth = depth

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        if num_prefix_tokens is not None or grid_size is not None:
            self.set_token_layout(num_prefix_tokens or 0, grid_size)

    def init_weights(self) -> None:
        # timm's ViT init calls ``init_weights()`` on modules that have one; its Linear init
        # would otherwise be the only thing that touches this module.
        self.reset_new_parameters()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """timm's call, plus the ``rope`` an ``EvaBlock`` passes (applied to q and k in ``project``)."""
        call = {} if rope is None else {"rope": rope}
        return self.transfer_forward(x, attn_mask=attn_mask, is_causal=is_causal, **call)

    def project(
        self, x: torch.Tensor, which: str = "qkv", rope: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """q/k/v heads as timm computes them; with ``rope``, q and k rotated on the patch tokens as the
        teacher's ``EvaAttention`` does, so the feature map sees the teacher's rotated q and k."""
        out = super().project(x, which)
        if rope is not None and not self.rope_keeps_map_kind:
            raise InputError(self.rope_refusal())
        for c in ("q", "k"):
            if c in out:
                out[c] = apply_rope(out[c], rope, self.num_prefix_tokens or 0, self.rotate_half)
        return out

    @classmethod
    def rope_refusal(cls) -> str:
        """The one message for an attention that cannot take a rope teacher's rotary embedding."""
        ok = sorted(n for n, c in rope_support().items() if c[0])
        return (
            f"attention {cls.attention_name or cls.__name__!r} cannot take the teacher's rotary embedding: "
            f"{cls.rope_why}. Attentions that keep their map kind under rope: {', '.join(ok)}"
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Core (B, H, N, d) -> (B, H, N, d) in v's dtype, in the operand dtype `operand_dtype` picks."""
        if attn_mask is not None or is_causal:
            raise ValueError(
                f"{type(self).__name__} does not support attn_mask/is_causal (ViT self-attention has "
                f'neither); use the "softmax" attention for masked layers'
            )
        dtype = operand_dtype(v, self.precision)  # read before autocast is switched off
        with fp32_section(v.device.type):
            out = self._attend(q.to(dtype), k.to(dtype), v.to(dtype))
        if out.shape != v.shape:  # the head merge would take (B, N, H*d) too, and mix tokens with heads
            raise ValueError(
                f"{type(self).__name__}._attend returned shape {tuple(out.shape)}; it must return v's "
                f"(B, H, N, d), {tuple(v.shape)}"
            )
        return out.to(v.dtype)

    def attend_mapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The part of ``attend`` that equals ``attention_map(q, k) @ v`` (fp32, returned in v's dtype)."""
        if not self.map_kind.has_map:
            raise TypeError(f'{type(self).__name__} has no attention map (map_kind "none")')
        with fp32_section(v.device.type):
            out = self._attend_mapped(*upcast(q, k, v))
        return out.to(v.dtype)

    @classmethod
    def contract_gap(cls) -> str | None:
        if cls._attend is EfficientAttention._attend:
            return (
                "defines no _attend(q, k, v): an efficient attention returns v's (B, H, N, d) from it "
                "(attnxfer/models/efficient/base.py)"
            )
        return super().contract_gap()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} defines no _attend(q, k, v): an efficient attention returns v's (B, H, N, d) "
            "from it (attnxfer/models/efficient/base.py)"
        )

    def _attend_mapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend(q, k, v)

    #: (option, bound) of the options sized by the token grid (None: unset); the bound: ``grid`` (per side), ``side``
    #: (the shorter: a square window's), ``tokens`` (N, prefix included) or ``odd side`` (the largest odd number
    #: within the shorter side: a same-size conv's kernel).
    grid_sized: ClassVar[tuple[tuple[str, str], ...]] = ()

    def grid_at(self, built_grid: tuple[int, ...] = ()) -> tuple[int, int] | None:
        """The token grid the attention is judged on: the declared one, else ``built_grid`` (a dynamic-size
        model's at the size it was built for); None where neither says."""
        return self.grid_size or (tuple(built_grid) if len(built_grid) == 2 else None)

    def grid_fit_error(self, built_grid: tuple[int, ...] = ()) -> InputError | None:
        """The refusal of a ``grid_sized`` option larger than the grid allows, where a student is built
        (`with_attention`): beyond it the attention is full attention or costs more, not the efficient one asked
        for. The grid is the declared one, else ``built_grid``, a dynamic-size model's at the size it was built
        for: what trains there (a conversion's stage 1 and its choice of attentions fit at that size) would be
        softmax, whatever it is at other sizes. Not per call: at another resolution the core clamps (a window to
        the grid, landmarks to N)."""
        grid = self.grid_at(built_grid)
        if grid is None:
            return None
        p, (gh, gw), side = self.num_prefix_tokens or 0, grid, min(grid)
        bounds = {"grid": (gh, gw), "side": side, "tokens": p + gh * gw, "odd side": side - 1 + side % 2}
        for option, bound in self.grid_sized:
            size, most = getattr(self, option), bounds[bound]
            if size is not None and any(s > m for s, m in zip(as_grid(size), as_grid(most))):
                size, most = ("x".join(map(str, v)) if isinstance(v, tuple) else v for v in (size, most))
                return (GridFitError if self.accepts_option(option) else InputError)(
                    f"{option} {size} is larger than the {gh}x{gw} token grid ({p + gh * gw} tokens with the "
                    f"prefix) allows: use at most {most}; beyond it {self.attention_name} is full attention or "
                    "costs more, not an efficient attention"
                )
        return None

    def covers_grid(self, built_grid: tuple[int, ...] = ()) -> str | None:
        """What to say of an attention exact at its grid (a window over all of it): softmax computed another way,
        slower, which a student built to be efficient is told; None where it is local (`grid_fit_error`'s grid)."""
        return None

    #: The options ``extra_repr`` shows after the token layout.
    repr_options: ClassVar[tuple[str, ...]] = ()

    def extra_repr(self) -> str:
        layout = ""
        if self.num_prefix_tokens is not None:
            layout = f", num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size}"
        shown = "".join(f", {name}={getattr(self, name)!r}" for name in self.repr_options)
        return f"name={self.attention_name!r}, map_kind={self.map_kind.value!r}, num_heads={self.num_heads}{layout}{shown}"


#: Tensors up to this many entries are kept whole by `snapshot`; larger ones as a fingerprint.
SNAPSHOT_WHOLE = 1 << 16


def snapshot(tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """What a weight-derived cache keeps to tell, by value, whether the weights changed (`unchanged`):
    small tensors whole, larger ones as a fixed random projection. Version counters cannot tell: torch's fused
    AdamW updates weights without bumping them."""
    return tuple(None if t is None else _fingerprint(t) for t in tensors)


def unchanged(kept: Sequence[torch.Tensor | None], tensors: Sequence[torch.Tensor | None]) -> bool:
    fingerprints = (None if t is None else _fingerprint(t) for t in tensors)  # lazily: all() stops early
    return len(kept) == len(tensors) and all(
        a is b
        if a is None or b is None
        else (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) and torch.equal(a, b)
        for a, b in zip(kept, fingerprints)
    )


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.numel() <= SNAPSHOT_WHOLE:
        return t.clone()
    generator = torch.Generator().manual_seed(t.shape[-1])
    probe = torch.randn(t.shape[-1], generator=generator, dtype=torch.float64).to(t.device, t.dtype)
    return t.reshape(-1, t.shape[-1]) @ probe


def rope_support() -> dict[str, tuple[bool, str]]:
    """Every zoo attention's rope declaration: name -> (keeps its map kind, why)."""
    out = {}
    for name in list_attentions():
        cls = get_attention_class(name)
        if isinstance(cls, type) and issubclass(cls, EfficientAttention):
            out[name] = (cls.rope_keeps_map_kind, cls.rope_why)
    return out


def precision_policies() -> dict[str, PrecisionPolicy]:
    """Every registered attention's declared precision policy, by name (softmax: SDPA in its input dtype)."""
    classes = {name: get_attention_class(name) for name in list_attentions()}
    return {
        name: cls.precision
        for name, cls in classes.items()
        if isinstance(cls, type) and hasattr(cls, "precision")
    }
