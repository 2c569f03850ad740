"""Weights alone as ``.safetensors`` (optional extra ``safetensors``), in PyTorch's names.

A PyTorch user loads a file written by :func:`save_safetensors` into the same
architecture with ``model.load_state_dict(safetensors.torch.load_file(path))``, and
writes one for convnet with ``safetensors.torch.save_file(model.state_dict(), path)``.
The architecture stays in convnet's own model file (``model.save``); these files hold
only named arrays.

Files are read as hostile: the size is checked before reading, the header length
against the file, and the tensors' names, shapes and dtypes against the model before
anything is copied. Writes are atomic.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from ._io import write_bytes_atomic
from ._npz import read_regular_file
from .model import Sequential, StateDictKeys

__all__ = ["save_safetensors", "read_safetensors", "load_safetensors", "WeightsFileError"]

#: Larger files are refused unless ``max_bytes`` says otherwise.
MAX_FILE_BYTES = 2**34
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


class WeightsFileError(ValueError):
    """A ``.safetensors`` file that is malformed, too large, or does not fit the model."""


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("reading and writing .safetensors needs the safetensors package: "
                          "pip install 'convnet[safetensors]'") from None
    return safetensors.numpy


def save_safetensors(model: Sequential | Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write the model's ``state_dict()`` (or a given state dict) to ``path`` as ``.safetensors``.

    Parameters
    ----------
    model : Sequential or mapping of str to ndarray
    path : str or os.PathLike
        Replaced atomically.
    metadata : mapping of str to str, optional
        Stored in the file's header (``__metadata__``).
    """
    st = _safetensors_numpy()
    state = model.state_dict() if isinstance(model, Sequential) else model
    if not isinstance(state, Mapping):
        raise TypeError(f"model must be a Sequential or a mapping of names to arrays, got {type(model).__name__}")
    arrays = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise TypeError(f"state entries must be str -> numpy array, got {name!r} -> {type(value).__name__}")
        arrays[name] = np.ascontiguousarray(value)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    data = st.save(arrays, metadata=dict(metadata) if metadata is not None else None)
    write_bytes_atomic(path, data)


def read_safetensors(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES) -> OrderedDict[str, np.ndarray]:
    """The arrays of a ``.safetensors`` file, in the file's order.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    WeightsFileError
        (a ``ValueError``) for a file that is too large, truncated, malformed, or holds a
        dtype numpy cannot represent (e.g. bfloat16); one line saying which.
    """
    st = _safetensors_numpy()
    path = os.fspath(path)
    data = read_regular_file(path, max_bytes, WeightsFileError, "weights file")
    if len(data) < 8:
        raise WeightsFileError(f"{path}: not a safetensors file (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise WeightsFileError(f"{path}: not a safetensors file, or truncated (header of {header_len} bytes "
                               f"declared, the file has {len(data)})")
    try:
        header = json.loads(data[8:8 + header_len])
    except (ValueError, RecursionError):
        raise WeightsFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    order = [k for k in header if k != "__metadata__"]
    for name in order:
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") not in _NUMPY_DTYPES:
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            raise WeightsFileError(f"{path}: tensor {name!r} has dtype {dtype!r}, which convnet does not read "
                                   f"({', '.join(_NUMPY_DTYPES)})")
    try:
        arrays = st.load(data)
    except Exception as exc:  # the Rust parser reports bad offsets, sizes, ... as SafetensorError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsFileError(f"{path}: malformed safetensors file ({reason})") from None
    return OrderedDict((name, arrays[name]) for name in order)


_NUMPY_DTYPES = ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL")


def load_safetensors(model: Sequential, path: str | os.PathLike, strict: bool = True, *,
                     max_bytes: int = MAX_FILE_BYTES) -> StateDictKeys:
    """Load the weights in ``path`` into ``model`` (see ``Sequential.load_state_dict``).

    Raises
    ------
    WeightsFileError
        If the file is malformed or its names, shapes or dtypes do not fit the model;
        the model is left as it was.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a convnet Sequential, got {type(model).__name__}")
    state = read_safetensors(path, max_bytes=max_bytes)
    try:
        return model.load_state_dict(state, strict=strict)
    except (TypeError, ValueError) as exc:
        raise WeightsFileError(f"{os.fspath(path)}: {exc}") from None
