"""Load numpy arrays from pickle files without executing anything else (``pickle.load`` runs whatever
callable the file names): only numpy's own array/scalar reconstruction functions are resolved."""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced something other than numpy array reconstruction."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # Resolve numpy's reconstruction callables from numpy itself, so both spellings of the module
    # (``numpy.core`` before 2.0, ``numpy._core`` after) map to the object this numpy really uses.
    reconstruct = np.ndarray.__reduce__(np.empty(0))[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy.ndarray / numpy.dtype / numpy scalar reconstruction."""

    _ALLOWED = _allowed_globals()

    def __init__(self, file, *, source: str = "<stream>", encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)  # latin1: Python 2's pickles of numpy arrays (CIFAR's)
        self._source = source if source.startswith("<") else f"'{source}'"  # a file's name, quoted

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self._ALLOWED))
            raise UnsafePickleError(
                f"refusing to unpickle {self._source}: it references the global "
                f"'{module}.{name}', but only numpy array reconstruction is allowed ({allowed}). "
                f"The file is not a plain numpy array pickle; do not load it with pickle.load."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to unpickle {self._source}: it uses persistent ids")


def load_numpy_pickle(path: str | Path) -> np.ndarray:
    """One numpy array from a (possibly gzipped) pickle file; anything else, object arrays too, refused."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    obj = NumpyOnlyUnpickler(io.BytesIO(raw), source=str(path)).load()
    if not isinstance(obj, np.ndarray):
        raise UnsafePickleError(f"expected a numpy array in '{path}', found {type(obj).__name__}")
    if obj.dtype.hasobject:
        raise UnsafePickleError(
            f"refusing the object array in '{path}': only plain numeric/string dtypes are allowed"
        )
    return obj
