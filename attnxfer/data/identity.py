"""What a run's training data is, in a few bytes, so that a resume can tell it goes on with the same data
(a sampler position counts samples of one dataset; in another it points at other images). Files are hashed
by their paths relative to the data root: a node-local copy at another ``data.root`` is the same data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

# attributes through which the wrappers attnxfer and timm put around a dataset reach the one inside
_INNER = ("dataset", "image_dataset", "stream", "reader", "table")


def fingerprint_of(parts: Iterable[Any]) -> str:
    """A stable hash of a sequence of strings or bytes (what a dataset's own ``fingerprint()`` returns)."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes | bytearray | memoryview) else str(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _samples(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # a stream without a length
        return None


def _own_fingerprint(obj: Any) -> tuple[str, str] | None:
    """(what is hashed, the hash) where ``obj`` knows its own identity, else None."""
    if callable(getattr(obj, "fingerprint", None)):
        return "content", obj.fingerprint()
    if isinstance(getattr(obj, "_fingerprint", None), str):  # a Hugging Face `datasets.Dataset`
        return "datasets fingerprint", obj._fingerprint
    split = getattr(obj, "split_info", None)  # timm's webdataset reader: its shards
    if split is not None and getattr(split, "filenames", None):
        return "shard list", fingerprint_of([*split.filenames, getattr(split, "num_samples", "")])
    if callable(getattr(obj, "filenames", None)):  # timm's ImageDataset / our readers: paths under the root
        return "file list", fingerprint_of(obj.filenames(basename=False, absolute=False))
    return None


def data_identity(dataset: Any) -> dict[str, Any]:
    """``{"samples": N (None for a stream), "of": what is hashed, "fingerprint": hex}`` of a training
    dataset, looking through the wrappers around it (else its class and size alone)."""
    seen, obj = set(), dataset
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        found = _own_fingerprint(obj)
        if found is not None:
            of, fingerprint = found
            return {"samples": _samples(dataset), "of": of, "fingerprint": fingerprint}
        obj = next((getattr(obj, a) for a in _INNER if getattr(obj, a, None) is not None), None)
    kind = type(dataset).__qualname__
    return {"samples": _samples(dataset), "of": "class and size", "fingerprint": fingerprint_of([kind])}
