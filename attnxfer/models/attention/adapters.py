"""Adapters: timm attention classes made transfer-aware by an in-place class swap (no state added, every
parameter keeps timm's name, and without an `AttentionIO` the forward is timm's own), found wherever a model
keeps them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.nn as nn

from .interface import TransferableAttention

_ADAPTERS: dict[type[nn.Module], type[TransferableAttention]] = {}
_REFUSED: dict[type[nn.Module], str] = {}

A = TypeVar("A", bound=type[TransferableAttention])


def register_adapter(timm_class: type[nn.Module]) -> Callable[[A], A]:
    """Class decorator: ``adapter`` is what layers of exactly ``timm_class`` become."""

    def decorator(adapter: A) -> A:
        if not (issubclass(adapter, timm_class) and issubclass(adapter, TransferableAttention)):
            raise TypeError(
                f"adapter {adapter.__name__} must subclass both {timm_class.__name__} and TransferableAttention"
            )
        if timm_class in _ADAPTERS and _ADAPTERS[timm_class] is not adapter:
            raise ValueError(
                f"{timm_class.__qualname__} already has the adapter {_ADAPTERS[timm_class].__name__}"
            )
        _ADAPTERS[timm_class] = adapter
        return adapter

    return decorator


def refuse_attention(timm_class: type[nn.Module], reason: str) -> None:
    """Layers of ``timm_class`` cannot be transferred: ``reason`` says what to do instead."""
    _REFUSED[timm_class] = reason


def adapter_for(timm_class: type[nn.Module]) -> type[TransferableAttention] | None:
    return _ADAPTERS.get(timm_class)


def list_adapters() -> dict[str, str]:
    """``{"module.TimmClass": "module.Adapter"}`` for every registered adapter."""
    return {
        f"{k.__module__}.{k.__qualname__}": f"{v.__module__}.{v.__qualname__}" for k, v in _ADAPTERS.items()
    }


def require_model(model: object) -> None:
    """A name or path given where a built model belongs is refused with how to build it (else it fails deep
    inside, on an attribute a string lacks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected a model (torch.nn.Module), got {type(model).__name__} {str(model)[:80]!r}: build it first, "
            "e.g. attnxfer.load_teacher(name)[0], attnxfer.create_vit(name) or timm.create_model(name)"
        )


def attention_layers(model: nn.Module) -> list[tuple[str, TransferableAttention]]:
    """(qualified name, layer) of every attention layer in ``model`` in forward order, wherever the family
    keeps them, each swapped in place to its adapter; a refused or unadapted layer is a TypeError."""
    require_model(model)
    found: list[tuple[str, TransferableAttention]] = []
    inside: str | None = None  # the attention whose submodules are being skipped
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        cls = type(module)
        if isinstance(module, TransferableAttention):
            pass
        elif cls in _ADAPTERS:
            module.__class__ = _ADAPTERS[cls]
        elif cls in _REFUSED:
            raise TypeError(f"{name} is {cls.__name__}: {_REFUSED[cls]}")
        elif name.rsplit(".", 1)[-1] == "attn":  # where every family's blocks keep their attention
            known = ", ".join(sorted({k.__name__ for k in _ADAPTERS}))
            raise TypeError(
                f"{name} is {cls.__name__} ({cls.__module__}); attnxfer has no adapter for it (adapters: "
                f"{known}). A new timm attention class needs one adapter file in "
                'attnxfer/models/attention/families/ (docs/architecture.md, "Adapters: any timm attention class")'
            )
        else:
            continue
        found.append((name, module))
        inside = name
    if not found:
        raise TypeError(
            f"{type(model).__name__} has no attention layer attnxfer can find: it is not a timm "
            "VisionTransformer-style model (no `attn` child of a timm attention class)"
        )
    return found


def stage_of(name: str) -> str:
    """The stage of the attention layer ``name`` (``layers.1.blocks.0.attn`` -> ``layers.1``)."""
    parts = name.split(".")
    if parts and parts[-1] == "attn":
        parts.pop()
    if parts and parts[-1].isdigit():
        parts.pop()
    if parts and parts[-1] == "blocks":
        parts.pop()
    return ".".join(parts)


def group_stages(names: Sequence[str]) -> list[tuple[str, list[int]]]:
    """(stage name, indices of its layers among ``names``) in order: the one grouping into stages."""
    stages: list[tuple[str, list[int]]] = []
    for i, name in enumerate(names):
        stage = stage_of(name)
        if not stages or stages[-1][0] != stage:
            stages.append((stage, []))
        stages[-1][1].append(i)
    return stages


def attention_stages(model: nn.Module) -> list[tuple[str, list[int]]]:
    """(stage name, indices of its layers among `attention_layers`) in forward order."""
    return group_stages([name for name, _ in attention_layers(model)])


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that hold the model's attention layers, in forward order: the units a run compiles."""
    return [model.get_submodule(name.rpartition(".")[0]) for name, _ in attention_layers(model)]
