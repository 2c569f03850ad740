"""Reading images for prediction, and turning logits into top-k classes.

``read_images(path, sample_shape, dtype)`` accepts, by content (not by file name):

* PNG and JPEG (and other formats Pillow opens; optional extra ``image``): converted to
  the model's channels (grey or RGB), resized to its height and width, scaled to [0, 1]
  as the training data are (``uint8 / 255``); ``invert=True`` turns dark-on-light
  pictures into MNIST's light-on-dark.
* ``.npy`` arrays: (H, W) or (N, H, W) for one channel, (C, H, W) or (N, C, H, W);
  uint8 is scaled by 1/255, floats are used as they are.
* IDX files (the MNIST format, raw or gzip): (N, H, W) or (N, C, H, W), same scaling.

Every file is hostile: sizes are checked before anything large is allocated, and a
bad file raises :class:`InputFileError` with one line naming it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from ._npz import open_regular_file

__all__ = ["InputFileError", "read_images", "sample_shape", "top_k"]

#: Pictures with more pixels than this are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = 64 * 2**20
#: Array files larger than this are refused before reading.
MAX_ARRAY_BYTES = 2**33

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_NPY = b"\x93NUMPY"
_GZIP = b"\x1f\x8b"


class InputFileError(ValueError):
    """An input file that cannot be read or does not fit the model."""


def sample_shape(model) -> tuple[int | None, ...]:
    """(C, H, W) the model takes: its ``input_shape``, or C from its first conv layer (H, W None)."""
    if model.input_shape is not None:
        return tuple(model.input_shape)
    first = model.layers[0] if len(model) else None
    channels = getattr(first, "in_channels", None)
    if channels is None:
        raise ValueError("the model has no input_shape and does not start with a conv layer, so the "
                         "size of its inputs is unknown")
    return (channels, None, None)


def _open_head(path: str) -> tuple[int, bytes]:
    """(size, first 8 bytes) of a regular file; anything else is an InputFileError."""
    try:
        with open_regular_file(path) as fh:
            return os.fstat(fh.fileno()).st_size, fh.read(8)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: not a regular file (a directory)") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputFileError(reason if reason.startswith(path) else f"{path}: {reason}") from None


def read_images(path: str | os.PathLike, shape: Sequence[int | None], dtype=np.float32,
                invert: bool = False) -> np.ndarray:
    """The images in ``path`` as an (N, C, H, W) array ready for the model.

    Parameters
    ----------
    path : str or os.PathLike
    shape : (C, H, W)
        What the model takes; H and W may be None (any size).
    dtype : float32 or float64
    invert : bool
        For pictures: ``1 - x`` after scaling (dark digits on a light background).

    Raises
    ------
    InputFileError
        (a ``ValueError``) for a missing, unreadable, malformed or ill-fitting file.
    """
    path = os.fspath(path)
    dtype = np.dtype(dtype).type
    size, head = _open_head(path)
    if head.startswith(_NPY):
        x = _read_npy(path, size)
    elif head.startswith(_GZIP) or (len(head) >= 4 and head[:2] == b"\0\0" and head[2] in (8, 9, 11, 12, 13, 14)):
        x = _read_idx(path)
    else:
        return _read_picture(path, shape, dtype, invert)
    return _fit_array(path, x, shape, dtype)


def _read_npy(path: str, size: int) -> np.ndarray:
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise InputFileError(f"{path}: unsupported .npy version {version}")
            offset = fh.tell()
    except (ValueError, OSError) as exc:
        if isinstance(exc, InputFileError):
            raise
        raise InputFileError(f"{path}: malformed .npy header ({exc})") from None
    if dtype.hasobject or dtype.kind not in "uif":
        raise InputFileError(f"{path}: .npy array of dtype {dtype} (numbers only)")
    count = 1
    for d in shape:
        count *= d
    needed = count * dtype.itemsize
    if needed > MAX_ARRAY_BYTES or offset + needed > size:
        raise InputFileError(f"{path}: .npy header declares shape {shape} of {dtype} ({needed} bytes), "
                             f"the file holds {size - offset}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputFileError(f"{path}: cannot read .npy array ({exc})") from None


def _read_idx(path: str) -> np.ndarray:
    from .datasets import IdxFormatError, load_idx

    try:
        return load_idx(path)
    except IdxFormatError as exc:
        raise InputFileError(str(exc)) from None
    except (OSError, MemoryError) as exc:
        raise InputFileError(f"{path}: cannot read IDX file ({exc})") from None


def _fit_array(path: str, x: np.ndarray, shape: Sequence[int | None], dtype) -> np.ndarray:
    c = shape[0]
    if x.ndim == 2 and c == 1:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None] if c == 1 else x[None]
    elif x.ndim != 4:
        raise InputFileError(f"{path}: array of shape {x.shape} is not an image or a stack of images "
                             f"for a model taking {_describe(shape)}")
    if x.shape[0] == 0:
        raise InputFileError(f"{path}: holds no images (shape {x.shape})")
    if any(want is not None and got != want for got, want in zip(x.shape[1:], shape)):
        raise InputFileError(f"{path}: images of shape {x.shape[1:]} do not fit the model, which takes "
                             f"{_describe(shape)}")
    if x.dtype == np.uint8:
        out = x.astype(dtype) / dtype(255)
    elif x.dtype.kind == "f":
        out = x.astype(dtype)
        if not np.isfinite(out).all():
            raise InputFileError(f"{path}: contains NaN or infinite values")
    else:
        raise InputFileError(f"{path}: images of dtype {x.dtype} (uint8 0-255 or floats only)")
    return np.ascontiguousarray(out)


def _describe(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"


def _read_picture(path: str, shape: Sequence[int | None], dtype, invert: bool) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputFileError(f"{path}: reading pictures needs Pillow: pip install 'convnet[image]'") from None
    c, h, w = shape
    if c not in (1, 3):
        raise InputFileError(f"{path}: pictures fit models with 1 or 3 input channels, this one has {c}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise InputFileError(f"{path}: picture of {im.width}x{im.height} pixels is larger than "
                                         f"the limit of {MAX_IMAGE_PIXELS} pixels")
                im = im.convert("L" if c == 1 else "RGB")
                if h is not None and (im.height, im.width) != (h, w):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(im, dtype=np.uint8)
    except InputFileError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        with open(path, "rb") as fh:
            head = fh.read(8)
        kind = "PNG" if head.startswith(_PNG) else "JPEG" if head.startswith(_JPEG) else None
        if kind is not None:
            raise InputFileError(f"{path}: corrupted or truncated {kind} file ({exc})") from None
        if isinstance(exc, UnidentifiedImageError):
            raise InputFileError(f"{path}: not a picture, .npy or IDX file convnet reads") from None
        raise InputFileError(f"{path}: cannot read picture ({exc})") from None
    x = pixels.astype(dtype) / dtype(255)
    if invert:
        x = 1 - x
    x = x[None, None] if c == 1 else np.moveaxis(x, -1, 0)[None]
    return np.ascontiguousarray(x)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes per row, most probable first: ``(classes, probabilities)``, (N, k) each.

    Ties go to the lower class index.
    """
    k = min(int(k), probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)
