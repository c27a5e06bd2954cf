"""Name -> class registry of every attention, softmax and the zoo: the one place that turns names (configs,
per-layer lists, exports) into classes, and `attention_name_of` the one way back."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from timm.layers import Attention
from torch import nn

from ...errors import UnknownNameError, did_you_mean
from ...plugins import ATTENTION_GROUP, load_entry_points
from .interface import MapKind

_ATTENTIONS: dict[str, type[nn.Module]] = {}
#: Parametric names "<prefix>:<spec>" (e.g. "formula:sum(relu)"): prefix -> resolver(full name) -> class.
_PARAMETRIC: dict[str, Callable[[str], type[nn.Module]]] = {}

T = TypeVar("T", bound=type[nn.Module])


def register_attention(name: str) -> Callable[[T], T]:
    # a word: configs, per-layer lists and the docs' tables name it as one
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"attention names are lower-case words (a-z, 0-9, _), got {name!r}")

    def decorator(cls: T) -> T:
        if name in _ATTENTIONS and _ATTENTIONS[name] is not cls:
            had = _ATTENTIONS[name]
            raise ValueError(
                f"attention {name!r} is already registered to {had.__module__}.{had.__qualname__}: give "
                f"{cls.__module__}.{cls.__qualname__} a name of its own"
            )
        contract_gap = getattr(cls, "contract_gap", None)  # timm's own Attention (softmax) has none
        if contract_gap is not None and (gap := contract_gap()) is not None:
            raise TypeError(f"attention {name!r}: {cls.__module__}.{cls.__qualname__} {gap}")
        _ATTENTIONS[name] = cls
        cls.attention_name = name
        return cls

    return decorator


def register_parametric_attention(prefix: str, resolve: Callable[[str], type[nn.Module]]) -> None:
    """Make every name ``"<prefix>:<spec>"`` an attention whose class ``resolve(name)`` returns."""
    if prefix in _PARAMETRIC and _PARAMETRIC[prefix] is not resolve:
        raise ValueError(f"parametric attention {prefix!r} is already registered")
    _PARAMETRIC[prefix] = resolve


def list_attentions(map_kind: MapKind | str | None = None) -> list[str]:
    """Registered names (installed packages' too), sorted; optionally only those whose map kind is (or
    refines) ``map_kind``."""
    load_entry_points(ATTENTION_GROUP)
    return sorted(n for n, c in _ATTENTIONS.items() if map_kind is None or c.map_kind.refines(map_kind))


def get_attention_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; an unknown name lists the known ones."""
    # even for a built-in's name: a package registering the same name is then said, not silently passed over
    load_entry_points(ATTENTION_GROUP)
    prefix, colon, _ = name.partition(":")
    if name in _ATTENTIONS:
        return _ATTENTIONS[name]
    if colon and prefix in _PARAMETRIC:
        return _PARAMETRIC[prefix](name)
    parametric = "".join(f", {p}:<...>" for p in sorted(_PARAMETRIC))
    hint = did_you_mean(name, list_attentions())
    raise UnknownNameError(
        f"unknown attention {name!r}{hint} (known attentions: {', '.join(list_attentions())}{parametric}; an "
        f"attention of your own: @register_attention in a module named by an '{ATTENTION_GROUP}' entry point)"
    )


def create_attention(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """An attention layer ``name`` (softmax or a zoo attention) built with the arguments its class takes:
    ``create_attention("performer", 48, num_heads=4, num_features=64)``."""
    return get_attention_class(name)(*args, **kwargs)


def attention_layer(name: str, **options: Any) -> type[nn.Module]:
    """A subclass of the attention ``name`` with ``options`` as defaults, for timm's ``attn_layer``."""
    cls = get_attention_class(name)
    unknown = [k for k in options if not cls.accepts_option(k)]
    if unknown:
        raise TypeError(f"{name} has no option(s) {unknown}; its options are: {', '.join(cls.own_options())}")

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **{**options, **kwargs})

    label = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return type(
        cls.__name__,
        (cls,),
        {
            "__init__": __init__,
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[{label}]",
        },
    )


def attention_name_of(attn: nn.Module) -> str:
    """The registered name of a layer's attention (timm's plain one: ``"softmax"``), else its class."""
    name = getattr(attn, "attention_name", "")  # an instance may refine its class's (a formula's program)
    if name:
        return name
    if type(attn) is Attention:
        return get_attention_class("softmax").attention_name
    return type(attn).__name__
