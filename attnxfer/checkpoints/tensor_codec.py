"""Nested state dicts (optimiser, scheduler, scaler) as flat tensors + JSON metadata, with no pickle: what a
checkpoint stores for state that is not a flat tensor dict."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

STATE_DICT_FORMAT = "attnxfer.state_dict/1"

_TAGS = ("__tensor__", "__tuple__", "__float__", "__dict__")


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name, n = path or "tensor", 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        tensors[name] = obj.detach()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        child = lambda k: f"{path}.{k}" if path else str(k)
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, child(k), tensors) for k, v in obj.items()}
        for k in obj:
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise TypeError(f"state dict key {k!r} at {path or '<root>'!r} must be int or str")
        return {"__dict__": [[k, _encode(v, child(k), tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"state dict entry {path or '<root>'!r} is a {type(obj).__name__}; only tensors, numbers, "
        f"str, bool, None, lists, tuples and dicts can be stored without pickle"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise ValueError(f"state dict metadata refers to tensor {value!r}, which is missing")
            used.add(value)
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, used) for v in value)
        if tag == "__float__":
            return float(value)
        if tag == "__dict__":
            return {k: _decode(v, tensors, used) for k, v in value}
    return {k: _decode(v, tensors, used) for k, v in obj.items()}


def state_dict_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state dict into a flat ``{dotted.path: Tensor}`` dict (a checkpoint group) and JSON
    metadata (for ``state``). Round-trips exactly: int keys, tuples vs lists, ints vs floats, tensor vs float
    values, non-finite floats and None all come back as they went in."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": STATE_DICT_FORMAT, "tree": _encode(dict(state_dict), "", tensors)}
    return tensors, meta


def state_dict_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """Inverse of ``state_dict_to_tensors``; every tensor must be used exactly as referenced."""
    if not isinstance(meta, Mapping) or meta.get("format") != STATE_DICT_FORMAT:
        raise ValueError(
            f"state dict metadata must come from state_dict_to_tensors (format "
            f"'{STATE_DICT_FORMAT}'), got {str(meta)[:80]!r}"
        )
    used: set[str] = set()
    state_dict = _decode(meta["tree"], tensors, used)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"tensors {unused[:5]} are not referenced by the metadata: wrong group or metadata?")
    return state_dict


def optimizer_state_to_tensors(opt_state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (flat tensors, JSON metadata); see ``state_dict_to_tensors``."""
    if "state" not in opt_state_dict or "param_groups" not in opt_state_dict:
        raise ValueError("expected an optimizer state dict with 'state' and 'param_groups'")
    return state_dict_to_tensors(opt_state_dict)


#: the inverse of ``optimizer_state_to_tensors``: its result goes to ``optimizer.load_state_dict``
optimizer_state_from_tensors = state_dict_from_tensors
