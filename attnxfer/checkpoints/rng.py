"""Global random generator states (Python, numpy's legacy one, torch CPU and every CUDA device) as plain JSON,
so a resumed run draws what it would have drawn. Generators you create yourself are saved by their owner;
DataLoader worker seeds follow the torch CPU generator."""

from __future__ import annotations

import base64
import random
import warnings
from typing import Any

import numpy as np
import torch

RNG_FORMAT = "attnxfer.rng/1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _byte_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(_unb64(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global generator, JSON-serialisable."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {
            "version": version,
            "internal": _b64(np.asarray(internal, dtype="<u4").tobytes()),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": name,
            "keys": _b64(np.asarray(keys, dtype="<u4").tobytes()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s.cpu().numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every global generator back where ``capture_rng_state`` found it (CUDA: the devices present,
    warning when some saved ones cannot be)."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ValueError(
            f"RNG state must come from capture_rng_state (format '{RNG_FORMAT}'), got {str(state)[:80]!r}"
        )
    python, numpy = state["python"], state["numpy"]
    internal = tuple(int(x) for x in np.frombuffer(_unb64(python["internal"]), dtype="<u4"))
    random.setstate((python["version"], internal, python["gauss_next"]))
    keys = np.frombuffer(_unb64(numpy["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state(
        (numpy["bit_generator"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(_byte_tensor(state["torch_cpu"]))
    cuda_states = state.get("torch_cuda") or []
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < len(cuda_states):
            warnings.warn(
                f"checkpoint has RNG states for {len(cuda_states)} CUDA devices, this process sees "
                f"{available}; restoring {min(available, len(cuda_states))}: GPU random draws "
                f"will differ from the original run",
                stacklevel=2,
            )
        for index, text in enumerate(cuda_states[:available]):
            torch.cuda.set_rng_state(_byte_tensor(text), index)
