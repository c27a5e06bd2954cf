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


def _declared(obj: Any) -> tuple[str, str] | None:
    """(what is hashed, the hash) where ``obj`` says what it holds without being read, else None."""
    if callable(getattr(obj, "fingerprint", None)):
        return "content", obj.fingerprint()
    if isinstance(getattr(obj, "_fingerprint", None), str):  # a Hugging Face `datasets.Dataset`
        return "datasets fingerprint", obj._fingerprint
    split = getattr(obj, "split_info", None)  # timm's webdataset reader: its shards
    if split is not None and getattr(split, "filenames", None):
        return "shard list", fingerprint_of([*split.filenames, getattr(split, "num_samples", "")])
    builder = getattr(obj, "builder", None)  # timm's streamed Hugging Face reader: its dataset's files
    if builder is not None and isinstance(getattr(obj, "split", None), str):
        return "dataset, split and files", fingerprint_of([obj.name, obj.split, getattr(builder, "hash", "")])
    return None


def data_identity(dataset: Any) -> dict[str, Any]:
    """``{"samples": N (None for a stream), "of": what is hashed, "fingerprint": hex}`` of a training
    dataset, looking through the wrappers around it: for an identity one of them declares first, and only
    then for a file list (timm's datasets list their files by reading every sample of a stream, or every row
    of a Hugging Face table); else its class and size alone."""
    chain, obj = [], dataset
    while obj is not None and all(obj is not seen for seen in chain):
        chain.append(obj)
        obj = next((getattr(obj, a) for a in _INNER if getattr(obj, a, None) is not None), None)
    found = next(filter(None, map(_declared, chain)), None)
    lister = next((obj for obj in chain if callable(getattr(obj, "filenames", None))), None)
    if found is None and lister is not None:  # timm's ImageDataset / our readers: paths under the root
        found = "file list", fingerprint_of(lister.filenames(basename=False, absolute=False))
    of, fingerprint = found or ("class and size", fingerprint_of([type(dataset).__qualname__]))
    try:
        samples = len(dataset)
    except TypeError:  # a stream without a length
        samples = None
    return {"samples": samples, "of": of, "fingerprint": fingerprint}
