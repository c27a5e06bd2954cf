"""The one attention interface that softmax and every zoo attention meet: callers project, attend and read
maps through `TransferableAttention` without asking which class they hold, and one per-call `AttentionIO`
(capture, replace, return the map, stop) is handled here, once, for every attention."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputError
from .attention_io import AttentionIO, StopForward, attention_io as attention_io
from .bias_rows import BiasRows, full_bias
from .map_kind import MapKind
from .numerics import fp32_section, row_chunk, row_slices, upcast
from .opcount import OpCounts
from .partial_qkv import QKV, freeze_chunks, fused_rows
from .placement import RowPlacement, TokenWalk

#: Child modules that have a counterpart in timm's ``Attention`` (copied from a teacher).
COUNTERPART_MODULES: tuple[str, ...] = ("qkv", "q_norm", "k_norm", "norm", "proj")
#: Constructor keywords every attention takes: timm's ``Attention`` ones plus the token layout.
BASE_OPTIONS: tuple[str, ...] = (
    "dim",
    "num_heads",
    "qkv_bias",
    "qk_norm",
    "scale_norm",
    "proj_bias",
    "attn_drop",
    "proj_drop",
    "norm_layer",
    "attn_head_dim",
    "num_prefix_tokens",
    "grid_size",
    "depth",
    "device",
    "dtype",
)


def _json_option(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_json_option(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"attention option value {value!r} is not JSON (int, float, str, bool, None or lists of them)"
    )


def as_grid(grid_size: int | Sequence[int] | None, name: str = "grid_size") -> tuple[int, int] | None:
    """``grid_size`` (an int or (height, width)) as a (height, width) tuple; None stays None. ``name``: the
    option's, for the error."""
    if grid_size is None:
        return None
    pair = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid = tuple(map(int, pair)) if isinstance(pair, Sequence) else ()  # 2.5: refused below, not a TypeError
    if len(grid) != 2 or min(grid) < 1:
        raise InputError(f"{name} must be an int or (height, width) of positive ints, got {grid_size!r}")
    return grid


class TransferableAttention(nn.Module):
    """Abstract base: subclasses keep timm's ``Attention`` attributes and implement ``attend`` (plus
    ``_map_context`` / ``_map_rows`` when they have a map). The class attributes are defaults, so a timm
    ``Attention`` whose class is swapped in place (`make_transfer_aware`) needs no constructor of ours."""

    map_kind: ClassVar[MapKind] = MapKind.ROW_STOCHASTIC
    attention_name: ClassVar[str] = ""
    #: True when ``attend`` needs the token grid (windows, agent pooling, depthwise convs).
    needs_token_layout: ClassVar[bool] = False
    #: Rows per chunk when ``attention_map`` builds many rows; None sizes chunks by the shared budget.
    map_chunk_size: int | None = None
    io: AttentionIO | None = None
    #: timm's optional sigmoid gate on the attention output (``Attention(gated=True)``).
    gate: nn.Module | None = None
    num_prefix_tokens: int | None = None
    grid_size: tuple[int, int] | None = None
    #: The patch grid of the image a dynamic-size model last cut, set as it cuts it (`swap_attentions`): used
    #: for that image's tokens, as their count alone cannot tell 1 + 16x9 from 1 + 12x12.
    input_grid: tuple[int, int] | None = None
    #: This attention's own stage-1 objective (``fit_loss``); None: the loss its map kind takes.
    fit_objective: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        try:
            cls.map_kind = MapKind(cls.map_kind)
        except ValueError:
            raise TypeError(
                f"{cls.__name__}.map_kind must be one of {[k.value for k in MapKind]}, got {cls.map_kind!r}"
            ) from None

    @classmethod
    def own_options(cls) -> list[str]:
        names = []
        for klass in cls.__mro__:
            if not issubclass(klass, TransferableAttention) or "__init__" not in vars(klass):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                named = p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")
                if named and p.name not in BASE_OPTIONS and p.name not in names:
                    names.append(p.name)
        return names

    @classmethod
    def accepts_option(cls, name: str) -> bool:
        return name in BASE_OPTIONS or name in cls.own_options()

    def options(self) -> dict[str, Any]:
        """``own_options`` as JSON values: with the base arguments they rebuild it (exports record them)."""
        missing = [name for name in self.own_options() if not hasattr(self, name)]
        if missing:
            raise TypeError(
                f"{type(self).__name__} keeps no attribute for option(s) {missing}; store them in "
                "__init__ so the attention can be rebuilt"
            )
        return {name: _json_option(getattr(self, name)) for name in self.own_options()}

    def new_parameter_names(self) -> list[str]:
        """Parameters with no softmax counterpart: the ones conversion stage 1 trains."""
        return [n for n, _ in self.named_parameters() if n.split(".")[0] not in COUNTERPART_MODULES]

    def reset_new_parameters(self) -> None:
        """(Re-)initialise the new parameters, not the counterparts."""

    def set_token_layout(self, num_prefix_tokens: int, grid_size: int | Sequence[int] | None = None) -> None:
        """Declare the prefix token count and patch grid (H, W); None: square, from each call's tokens."""
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid_size = as_grid(grid_size)

    def token_layout(self, num_tokens: int) -> tuple[int, tuple[int, int]]:
        """(num_prefix_tokens, (grid_h, grid_w)) for ``num_tokens``; undeclared, the fewest prefix tokens
        (0..16) that leave a square grid (197 -> 1 + 14x14)."""
        p, seen = self.num_prefix_tokens, self.input_grid
        if self.grid_size is None and seen and p is not None and p + math.prod(seen) == num_tokens:
            return p, seen  # the image a dynamic-size model just cut
        if p is not None and self.grid_size is not None:
            gh, gw = self.grid_size
            if p + gh * gw != num_tokens:
                raise ValueError(
                    f"{type(self).__name__}: token layout says {p} prefix + {gh}x{gw} grid = {p + gh * gw} "
                    f"tokens, but the input has {num_tokens}; call set_token_layout() with the new grid"
                )
            return p, (gh, gw)
        candidates = [p] if p is not None else range(0, 17)
        for prefix in candidates:
            side = math.isqrt(max(num_tokens - prefix, 0))
            if side > 0 and side * side == num_tokens - prefix:
                return prefix, (side, side)
        raise ValueError(
            f"{type(self).__name__} needs the token grid but cannot infer it from {num_tokens} tokens "
            f"(num_prefix_tokens={p}); call set_token_layout(num_prefix_tokens, (grid_h, grid_w))"
        )

    def token_partition(self, block: nn.Module | None = None) -> dict[str, Any]:
        """What decides this layer's query and key sets beyond the patch grid (a Swin ``block``'s window and
        shift, a reduction ratio); paired layers must agree on every entry. ``{}`` for flat layers."""
        return {}

    #: How a zoo attention takes this layer's place in a conversion; None where the family does not convert.
    conversion_slot: ClassVar[type | None] = None  # a `slots.ConversionSlot` subclass

    def call_grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """The stage grid (H, W) the block's call names, or None (flat layers; windows the block cuts)."""
        return None

    def call_extras(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What a call hands besides its input that a zoo attention takes too (a rope family's ``rope``)."""
        rope = kwargs.get("rope")
        return {"rope": rope} if rope is not None else {}

    def place_rows(
        self, partition: dict[str, Any], tokens: int, grid: tuple[int, int] | None, walk: TokenWalk
    ) -> RowPlacement | None:
        """Where this layer's query rows and keys sit on the image; None for flat layers."""
        return None

    def key_count(self, tokens: int, grid: tuple[int, int] | None) -> int:
        return tokens

    def key_reduction(self) -> str | None:
        """How this layer's keys reduce its tokens, in words (``"2x2 blocks"``), or None: a student over every
        token then learns the teacher's map pooled onto those keys."""
        return None

    def project(self, x: torch.Tensor, which: str = "qkv") -> dict[str, torch.Tensor]:
        """The requested heads (B, H, N, d), q/k norms applied, as timm computes them."""
        B, N, _ = x.shape
        which = "".join(c for c in QKV if c in which)
        out: dict[str, torch.Tensor] = {}
        if which == "qkv" and isinstance(self.qkv, nn.Linear):
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = dict(zip(QKV, qkv.unbind(0)))
        else:
            for name in which:
                w, b = fused_rows(self.qkv, name)
                out[name] = F.linear(x, w, b).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if "q" in out:
            out["q"] = self.q_norm(out["q"])
        if "k" in out:
            out["k"] = self.k_norm(out["k"])
        return out

    #: Freeze the given q/k/v projections (copied layers don't use them).
    freeze_projections = freeze_chunks

    def logit_scale(self, q: torch.Tensor) -> float:
        """The factor on q·kᵀ in the logits (timm's: q's head dim ** -0.5)."""
        return q.shape[-1] ** -0.5

    def logit_bias(self, q: torch.Tensor, k: torch.Tensor, **call: Any) -> torch.Tensor | None:
        """The additive logit term (B or 1, H, N_q, N_k), or None; ``call``: the forward's extra arguments."""
        return None

    def logit_bias_rows(self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, **call: Any) -> BiasRows:
        """``bias`` as transfer captures it, in blocks of query rows: adapters that gather it from a table
        gather per chunk, so the chunked CE never holds the whole bias or its gradient."""
        return BiasRows.of_tensor(bias)

    #: ``logit_bias`` can return a tensor (the CE then takes the chunked biased path).
    has_logit_bias: ClassVar[bool] = False

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        return self.transfer_forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def transfer_forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        **call: Any,
    ) -> torch.Tensor:
        """``proj(norm(attend(project(x))))`` with ``self.io`` honoured."""
        io = self.io
        if io is None:
            qkv = self.project(x, **call)
            bias = self.logit_bias(qkv["q"], qkv["k"], **call) if self.has_logit_bias else None
        else:
            given = {c: io.override(c) for c in QKV if io.override(c) is not None}
            own = self.project(x, "".join(c for c in QKV if c not in given or c in io.capture), **call)
            for c in io.capture:
                io.captured[c] = own[c]
            own_bias = None
            if attn_mask is not None and "q" in io.capture and "k" in io.capture:
                io.captured["mask"] = attn_mask  # padding (NaFlexViT): the loss leaves padded tokens out
            if self.has_logit_bias and "q" in io.capture and "k" in io.capture:
                own_bias = self.logit_bias(own["q"], own["k"], **call)
                if own_bias is not None:
                    io.captured["bias"] = self.logit_bias_rows(own["q"], own["k"], own_bias, **call)
            if io.stop:
                raise StopForward
            # keys and values of other tokens (a CaiT teacher's blocks leave out the class token a ViT's keep):
            # one line, not a reshape's error mid-forward; queries may be more (PVTv2's pooled keys)
            kv = {c: t.shape[-2] for c, t in {**own, **given}.items() if c in "kv"}
            if given and len(set(kv.values())) > 1:
                said = ", ".join(
                    f"{'the teacher' if c in given else 'the student'}'s {c} {n}" for c, n in kv.items()
                )
                raise InputError(
                    f"token counts differ in a layer paired with the teacher's ({said} tokens); teacher and "
                    "student need the same image size, patch size and prefix tokens in the layers paired "
                    "(transfer.layers)"
                )
            # Borrowed tensors (a bf16 teacher's, say) join the layer's own working dtype.
            dtype = next(iter(own.values())).dtype if own else x.dtype
            qkv = {**own, **{c: t.to(dtype) for c, t in given.items()}}
            if "q" in given and "k" in given:
                bias = full_bias(io.bias).to(dtype) if io.bias is not None else None
            elif own_bias is not None and not given:
                bias = own_bias
            else:
                bias = self.logit_bias(qkv["q"], qkv["k"], **call) if self.has_logit_bias else None
        if io is not None and io.return_lse and bias is None and not is_causal and _hides_nothing(attn_mask):
            # a padding mask that pads nothing (a NaFlexViT batch of whole images) changes no logit: the call
            # hands out its lse as an unmasked one does, so attention_lse runs on every batch it is named for
            attn_mask = None
        mask = _merge_masks(bias, attn_mask)
        if io is not None and io.return_map:
            io.map = self._io_map(qkv["q"], qkv["k"], mask)
        # A replaced q or k comes with its own scale (its head dim): every core scales by q's head dim.
        # the lse of unmasked logits only: a call with a mask or bias (a NaFlexViT batch's padding) hands none,
        # and the loss takes the chunked path that leaves padded tokens out
        if io is not None and io.return_lse and mask is None and not is_causal:
            out, io.lse = self.attend_with_lse(qkv["q"], qkv["k"], qkv["v"])
        else:
            out = self.attend(qkv["q"], qkv["k"], qkv["v"], attn_mask=mask, is_causal=is_causal)
        return self._output(x, out)

    def _output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        gate = self._modules.get("gate")  # the class default None would hide a registered module
        if gate is not None:
            out = out * gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        raise NotImplementedError

    def attend_with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(
            f"{type(self).__name__} is not a softmax attention: it has no log-sum-exp to hand out "
            "(its distillation loss is computed from its implicit map)"
        )

    def attend_mapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The part of ``attend`` that equals ``attention_map(q, k) @ v`` (all but an additive term)."""
        if not self.map_kind.has_map:
            raise TypeError(f'{type(self).__name__} has no attention map (map_kind "none")')
        return self.attend(q, k, v)

    def fit_loss(
        self, q: torch.Tensor, k: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor
    ) -> torch.Tensor:
        """The ``fit_objective`` on (q, k) and a softmax teacher's: for new parameters a map loss cannot
        train (binary codes have no gradient)."""
        raise NotImplementedError(f"{type(self).__name__} declares no stage-1 objective of its own")

    def operation_counts(self, num_tokens: int, batch: int = 1) -> OpCounts | None:
        """Multiplications / additions of one ``attend`` call (`opcount`), or None."""
        return None

    def attention_map(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        rows: slice | None = None,
    ) -> torch.Tensor | None:
        """Rows of the N x N map (B, H, len(rows), N) in fp32, a chunk at a time; None without a map."""
        if not self.map_kind.has_map:
            return None
        N = q.shape[-2]
        start, stop, step = (rows or slice(None)).indices(N)
        if step != 1:
            raise ValueError(f"rows must be a contiguous slice, got step {step}")
        with fp32_section(q.device.type):
            q, k = upcast(q, k)
            context = self._map_context(q, k)
            chunk = row_chunk(q, k.shape[-2], self.map_chunk_size, live_tensors=4)
            parts = [self._map_rows(context, part) for part in row_slices(start, stop, chunk)]
        if not parts:
            return q.new_zeros(q.shape[0], q.shape[1], 0, N)
        return torch.cat(parts, dim=-2)

    def _io_map(
        self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        return self.attention_map(q, k)

    @classmethod
    def contract_gap(cls) -> str | None:
        """What the class lacks of the interface its registration promises, in words (None: nothing), asked as
        it is registered: a plug-in's gap is said once, not as a traceback at its first forward."""
        base = TransferableAttention
        rowless = cls._map_context is base._map_context or cls._map_rows is base._map_rows
        if cls.map_kind.has_map and cls.attention_map is base.attention_map and rowless:
            return (
                f"has map_kind {cls.map_kind.value!r} but no _map_context/_map_rows: give its map's rows, or "
                "declare map_kind = MapKind.NONE"
            )
        return None

    def _map_context(self, q: torch.Tensor, k: torch.Tensor) -> Any:
        """What rows of the map share (once per ``attention_map`` call)."""
        raise NotImplementedError(
            f"{type(self).__name__} has map_kind {self.map_kind.value!r} but no _map_context/_map_rows: "
            "give its map's rows, or declare map_kind = MapKind.NONE"
        )

    def _map_rows(self, context: Any, rows: slice) -> torch.Tensor:
        raise NotImplementedError


def _hides_nothing(attn_mask: torch.Tensor | None) -> bool:
    """A timm ``attn_mask`` that leaves every logit as it is (bool: all True; additive: all 0)."""
    if attn_mask is None:
        return False
    return bool(attn_mask.all()) if attn_mask.dtype == torch.bool else not bool(attn_mask.any())


def _merge_masks(bias: torch.Tensor | None, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """One additive float mask from a logit bias and timm's ``attn_mask`` (bool: True = attend)."""
    if bias is None:
        return attn_mask
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=bias.dtype).masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask
