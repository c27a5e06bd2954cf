"""Reading a whole model's attentions through the interface (maps, captured signals, per-layer IOs), the
same for softmax and every zoo attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ...errors import InputError
from ...speak import warn
from ..handover import Chunks, Signal
from . import families  # noqa: F401  (registers every family's adapter)
from .adapters import attention_layers
from .interface import AttentionIO, StopForward, TransferableAttention, attention_io

#: What `capture_attention` can record per layer: the `Signal`s one attention layer gives.
CAPTURE_FIELDS: tuple[Signal, ...] = (Signal.INPUT, Signal.Q, Signal.K, Signal.V, Signal.OUTPUT)


def transferable_attentions(model: nn.Module) -> Sequence[TransferableAttention]:
    """The model's attention layers in forward order, made transfer-aware in place."""
    return [attn for _, attn in attention_layers(model)]


@torch.no_grad()
def attention_maps(
    model: nn.Module, x: torch.Tensor, layers: Iterable[int] | None = None
) -> dict[int, torch.Tensor]:
    """Explicit (B, H, N, N) fp32 maps of the chosen blocks (None without a map): for pictures and tests.
    The model's attention layers become their transfer-aware adapters in place (same weights, same outputs)."""
    require_image_batch(x)
    attns = transferable_attentions(model)
    rates = (m.p if isinstance(m, nn.Dropout) else getattr(m, "drop_prob", 0) for m in model.modules())
    if model.training and any(rate or 0 for rate in rates):
        warn(
            "attention_maps: the model is in training mode, so its dropout makes each call's maps differ: eval() it"
        )
    layers = _chosen_layers(attns, layers)
    ios = {i: AttentionIO(return_map=True) for i in layers}
    with attached_ios(attns, ios):
        model.forward_features(x)
    return {i: io.map for i, io in ios.items()}


def require_image_batch(x: Any) -> None:
    """A batch that is not a tensor (a numpy array, a list) is refused in one line, not deep in the
    first convolution; a NaFlexViT batch is its dict of tensors."""
    if not isinstance(x, torch.Tensor | dict):
        raise TypeError(
            f"images must be a torch.Tensor (B, C, H, W), got {type(x).__module__}.{type(x).__name__}: "
            "torch.as_tensor(images) first"
        )


def _chosen_layers(attns: Sequence[TransferableAttention], layers: Iterable[int] | None) -> list[int]:
    """``layers`` (None: every block; negatives count from the end, as `build_plan`'s) as block indices."""
    if isinstance(layers, int | str):  # else "'int' object is not iterable"
        raise InputError(f"layers={layers!r}: a list of block indices, e.g. [0, 1]")
    n = len(attns)
    chosen = list(range(n)) if layers is None else list(layers)
    if bad := [i for i in chosen if not -n <= i < n]:
        raise InputError(f"layers {bad}: the model has {n} attention blocks, 0 to {n - 1} (or -{n} to -1)")
    return list(dict.fromkeys(i % n for i in chosen))  # -1 and the last block's index are one block


def _record_input(module: TransferableAttention, args: tuple, kwargs: dict, *, sink: dict) -> None:
    sink[Signal.INPUT] = args[0] if args else kwargs["x"]
    sink.update(module.call_extras(args, kwargs))  # a rope family's rotary embedding, as ``rope``


@contextlib.contextmanager
def capture_attention(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    fields: Sequence[Signal | str] = (Signal.INPUT, Signal.Q, Signal.K, Signal.OUTPUT),
) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """While active, each forward pass fills ``store[layer][field]`` for the chosen blocks; with ``input``,
    a rope the block passes is kept as ``rope`` (a zoo attention fitted on that input needs it). Tensors keep
    their graph (detach what you keep)."""
    # one field's name is that field, as `Chunks` reads "input" (else its letters: "unknown fields ['i', 'n']")
    if isinstance(fields, str) and fields in CAPTURE_FIELDS:
        fields = (fields,)
    unknown = set(fields) - set(CAPTURE_FIELDS)
    if unknown:
        raise ValueError(
            f"capture_attention: unknown fields {sorted(map(str, unknown))}; choose from "
            f"{', '.join(CAPTURE_FIELDS)}"
        )
    attns = transferable_attentions(model)
    layers = _chosen_layers(attns, layers)
    store: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    wanted = Chunks(f for f in fields if Signal(f).is_chunk)
    ios = {i: AttentionIO(capture=wanted, captured=store[i]) for i in layers} if wanted else {}
    with contextlib.ExitStack() as stack:  # a hook's handle removes it on exit
        stack.enter_context(attached_ios(attns, ios))
        for i in layers:
            attn, sink = attns[i], store[i]
            if Signal.INPUT in fields:
                stack.enter_context(
                    attn.register_forward_pre_hook(partial(_record_input, sink=sink), with_kwargs=True)
                )
            if Signal.OUTPUT in fields:
                stack.enter_context(
                    attn.register_forward_hook(
                        lambda m, args, out, sink=sink: sink.__setitem__(Signal.OUTPUT, out)
                    )
                )
        yield store


@contextlib.contextmanager
def attached_ios(
    attns: Sequence[TransferableAttention],
    ios: Mapping[int, AttentionIO],
    masks: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """While active, layer ``i`` runs with ``ios[i]``; the ``attn_mask`` it is handed goes to ``masks[i]``."""
    with contextlib.ExitStack() as stack:  # a hook's handle removes it on exit
        for i, io in ios.items():
            stack.enter_context(attention_io(attns[i], io))
            if masks is not None:

                def keep(module, args, kwargs, i=i):
                    if kwargs.get("attn_mask") is not None:
                        masks[i] = kwargs["attn_mask"]

                stack.enter_context(attns[i].register_forward_pre_hook(keep, with_kwargs=True))
        yield


def run_with_ios(
    model: nn.Module,
    x: torch.Tensor,
    ios: Mapping[int, AttentionIO],
    *,
    logits: bool = False,
    masks: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The model's own timm forward with ``ios[i]`` on attention layer ``i``, so whatever the blocks do around
    their attention happens as timm does it; None where a layer's io says ``stop``."""
    attns = transferable_attentions(model)
    with attached_ios(attns, ios, masks):
        try:
            return model(x) if logits else model.forward_features(x)
        except StopForward:
            return None
