"""The common body of every zoo attention.

Every attention keeps timm's ``Attention`` parameter names (``qkv``, ``q_norm``, ``k_norm``,
``norm``, ``proj``) so a softmax teacher's weights load unchanged, and splits the work in two:

* ``project_qkv(x)`` -> q, k, v (B, H, N, d), after the q/k norms, exactly as timm computes them;
* ``attend(q, k, v)`` -> (B, H, N, d), the attention core before the output projection.

Subclasses implement ``_attend`` (and, for maps, ``_map_context`` / ``_map_rows``) in the
compute dtype: fp32 with autocast off (float64 stays float64, for tests), because feature maps
and exponentials overflow in fp16/bf16. Implicit N x N maps are built only on request, in row
chunks; forward passes never build them.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

__all__ = [
    'EfficientAttention', 'COUNTERPART_MODULES', 'MAP_KINDS', 'compute_dtype', 'upcast', 'full_precision',
]

#: Child modules that have a counterpart in timm's ``Attention`` (copied from a teacher).
COUNTERPART_MODULES: Tuple[str, ...] = ('qkv', 'q_norm', 'k_norm', 'norm', 'proj')
MAP_KINDS: Tuple[str, ...] = ('row_stochastic', 'signed', 'none')

_BASE_OPTIONS = (
    'dim', 'num_heads', 'qkv_bias', 'qk_norm', 'scale_norm', 'proj_bias', 'attn_drop', 'proj_drop',
    'norm_layer', 'attn_head_dim', 'num_prefix_tokens', 'grid_size', 'depth', 'device', 'dtype',
)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for every input dtype except float64 (kept so tests can compare at 1e-10)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Compute-dtype views/copies. q/k/v stay strided views of the qkv output: a contiguous copy
    was measured ~1.3x faster for the kernel cores on one CPU thread but costs 3 N C floats of
    peak memory, more than the whole kernel core needs."""
    return tuple(t.to(compute_dtype(t)) for t in tensors)


def full_precision(device_type: str):
    """Autocast off: feature maps must not silently drop back to fp16/bf16 inside."""
    return torch.autocast(device_type=device_type, enabled=False)


def _json_option(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_option(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f'attention option value {value!r} is not JSON (int, float, str, bool, None or lists of them)')


def _as_grid(grid_size: Optional[int | Sequence[int]]) -> Optional[Tuple[int, int]]:
    if grid_size is None:
        return None
    if isinstance(grid_size, int):
        return grid_size, grid_size
    grid = tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f'grid_size must be an int or (height, width) of positive ints, got {grid_size!r}')
    return grid


class EfficientAttention(nn.Module):
    """Base class: timm-compatible constructor and parameter names, forward, token layout, maps.

    Constructor arguments are those of ``timm.layers.attention.Attention`` (so
    ``timm.create_model(..., attn_layer=Cls)`` works), plus ``num_prefix_tokens`` /
    ``grid_size`` (token layout, see ``set_token_layout``) and the subclass's own options.
    ``attn_drop`` is honoured only where the map is explicit (softmax, window); the
    module exists everywhere so state dicts and ``attn_drop`` hooks look like timm's.
    """
    map_kind: ClassVar[str] = 'row_stochastic'
    #: True when ``attend`` needs the token grid (windows, agent pooling, depthwise convs).
    needs_token_layout: ClassVar[bool] = False
    attention_name: ClassVar[str] = ''
    #: Rows per chunk when ``attention_map`` builds many rows.
    map_chunk_size: int = 256

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            attn_head_dim: Optional[int] = None,
            num_prefix_tokens: Optional[int] = None,
            grid_size: Optional[int | Sequence[int]] = None,
            depth: int = 0,
            device=None,
            dtype=None,
            **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f'{type(self).__name__} got unknown option(s) {sorted(kwargs)}; '
                f'its own options are: {", ".join(self.own_options()) or "(none)"}')
        if self.map_kind not in MAP_KINDS:
            raise TypeError(f'{type(self).__name__}.map_kind must be one of {MAP_KINDS}, got {self.map_kind!r}')
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}; pass attn_head_dim')
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError('qk_norm/scale_norm need a norm_layer (e.g. nn.LayerNorm)')
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim ** -0.5
        self.depth = depth

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        self.num_prefix_tokens: Optional[int] = None
        self.grid_size: Optional[Tuple[int, int]] = None
        if num_prefix_tokens is not None or grid_size is not None:
            self.set_token_layout(num_prefix_tokens or 0, grid_size)

    # ----------------------------------------------------------------- options / parameters
    @classmethod
    def own_options(cls) -> List[str]:
        """Constructor options beyond timm's ``Attention`` keywords."""
        names = []
        for klass in cls.__mro__:
            if klass is EfficientAttention or not issubclass(klass, EfficientAttention):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != 'self'):
                    if p.name not in _BASE_OPTIONS and p.name not in names:
                        names.append(p.name)
        return names

    @classmethod
    def accepts_option(cls, name: str) -> bool:
        return name in _BASE_OPTIONS or name in cls.own_options()

    def options(self) -> Dict[str, Any]:
        """This attention's own constructor options (``own_options``) as JSON values: with the base
        arguments they rebuild it (exported students record them per block)."""
        missing = [name for name in self.own_options() if not hasattr(self, name)]
        if missing:
            raise TypeError(f'{type(self).__name__} keeps no attribute for option(s) {missing}; store them in '
                            '__init__ so the attention can be rebuilt')
        return {name: _json_option(getattr(self, name)) for name in self.own_options()}

    def new_parameter_names(self) -> List[str]:
        """Parameters with no softmax counterpart: the ones conversion stage 1 trains."""
        return [n for n, _ in self.named_parameters() if n.split('.')[0] not in COUNTERPART_MODULES]

    def reset_new_parameters(self) -> None:
        """(Re-)initialise the new parameters; counterparts are left alone."""

    def init_weights(self) -> None:
        # timm's ViT init calls ``init_weights()`` on modules that have one; its Linear init
        # would otherwise be the only thing that touches this module.
        self.reset_new_parameters()

    # ----------------------------------------------------------------- token layout
    def set_token_layout(self, num_prefix_tokens: int, grid_size: Optional[int | Sequence[int]] = None) -> None:
        """Declare ``num_prefix_tokens`` (class/register tokens first) and the patch grid (H, W).

        With ``grid_size=None`` the grid is taken as square from the token count at each call.
        """
        if num_prefix_tokens < 0:
            raise ValueError(f'num_prefix_tokens must be >= 0, got {num_prefix_tokens}')
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid_size = _as_grid(grid_size)

    def token_layout(self, num_tokens: int) -> Tuple[int, Tuple[int, int]]:
        """(num_prefix_tokens, (grid_h, grid_w)) for a sequence of ``num_tokens``.

        Without a declared layout, falls back to the fewest prefix tokens (0..16) that leave a
        square grid (197 -> 1 + 14x14); declare it with ``set_token_layout`` (or
        ``attnxfer.models.efficient.configure_token_layout(model)``) for anything else.
        """
        p = self.num_prefix_tokens
        if p is not None and self.grid_size is not None:
            gh, gw = self.grid_size
            if p + gh * gw != num_tokens:
                raise ValueError(
                    f'{type(self).__name__}: token layout says {p} prefix + {gh}x{gw} grid = {p + gh * gw} '
                    f'tokens, but the input has {num_tokens}; call set_token_layout() with the new grid')
            return p, (gh, gw)
        candidates = [p] if p is not None else range(0, 17)
        for prefix in candidates:
            side = math.isqrt(max(num_tokens - prefix, 0))
            if side > 0 and side * side == num_tokens - prefix:
                return prefix, (side, side)
        raise ValueError(
            f'{type(self).__name__} needs the token grid but cannot infer it from {num_tokens} tokens '
            f'(num_prefix_tokens={p}); call set_token_layout(num_prefix_tokens, (grid_h, grid_w))')

    # ----------------------------------------------------------------- forward
    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, N, d) after the q/k norms, exactly as timm's Attention computes them."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                f'{type(self).__name__} does not support attn_mask/is_causal (ViT self-attention has '
                f'neither); use the "softmax" attention for masked layers')
        B, N, _ = x.shape
        q, k, v = self.project_qkv(x)
        out = self.attend(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention core (B, H, N, d) -> (B, H, N, d), computed in fp32, returned in v's dtype."""
        with full_precision(v.device.type):
            out = self._attend(*upcast(q, k, v))
        return out.to(v.dtype)

    def attend_mapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The part of ``attend`` that equals ``attention_map(q, k) @ v``.

        The whole of it for every attention but those with an additive term outside the map
        (focused linear attention's depthwise conv on v).
        """
        if self.map_kind == 'none':
            raise TypeError(f'{type(self).__name__} has no attention map (map_kind "none")')
        with full_precision(v.device.type):
            out = self._attend_mapped(*upcast(q, k, v))
        return out.to(v.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _attend_mapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend(q, k, v)

    # ----------------------------------------------------------------- implicit maps
    def attention_map(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            rows: Optional[slice] = None,
    ) -> Optional[torch.Tensor]:
        """Rows of the implicit N x N map, (B, H, len(rows), N), in the compute dtype.

        Built ``map_chunk_size`` rows at a time from a per-call context (features, agents,
        pseudo-inverses), so peak extra memory is one chunk plus the result. ``None`` for
        attentions without a map (map_kind 'none').
        """
        if self.map_kind == 'none':
            return None
        N = q.shape[-2]
        start, stop, step = (rows or slice(None)).indices(N)
        if step != 1:
            raise ValueError(f'rows must be a contiguous slice, got step {step}')
        with full_precision(q.device.type):
            q, k = upcast(q, k)
            context = self._map_context(q, k)
            chunk = max(1, int(self.map_chunk_size))
            parts = [self._map_rows(context, slice(s, min(s + chunk, stop))) for s in range(start, stop, chunk)]
        if not parts:
            return q.new_zeros(q.shape[0], q.shape[1], 0, N)
        return torch.cat(parts, dim=-2)

    def _map_context(self, q: torch.Tensor, k: torch.Tensor) -> Any:
        """Whatever rows of the map share (computed once per ``attention_map`` call)."""
        raise NotImplementedError

    def _map_rows(self, context: Any, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        layout = ''
        if self.num_prefix_tokens is not None:
            layout = f', num_prefix_tokens={self.num_prefix_tokens}, grid_size={self.grid_size}'
        return f'name={self.attention_name!r}, map_kind={self.map_kind!r}, num_heads={self.num_heads}{layout}'
