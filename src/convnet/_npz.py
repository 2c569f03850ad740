"""Reading ``.npz`` archives that may be hostile: sizes are checked before anything is
allocated or decompressed, and every problem is one clear error.

``numpy.load`` trusts what an archive says: a member whose ``.npy`` header declares
terabytes makes it allocate terabytes, a member of unexpected name is decompressed in
full when read, a member that is not in ``.npy`` format comes back as ``bytes``, and a
FIFO path blocks forever. :class:`NpzArchive` instead

* opens only regular files (without blocking on a FIFO that replaces one meanwhile);
* lists members from the zip directory without reading them, so unknown names can be
  rejected before any decompression;
* reads a member's ``.npy`` header alone (``numpy.lib.format``), checks its dtype is a
  plain number or string type and that the data it declares fits in what the archive
  stores for it (stored size, or 1032 x the compressed size, deflate's limit);
* fills arrays the caller allocated (:meth:`read_into`), reading exactly the declared
  bytes and checking the zip CRC, or reads a small member under a size cap
  (:meth:`read_small`).

Errors are raised as ``error(f"{path}: ...")`` with the exception class the caller gives
(e.g. ``ModelFileError``); a missing file is ``FileNotFoundError`` and an unreadable one
``PermissionError``, as ``open`` raises them.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
from collections.abc import Iterable
from typing import IO, NamedTuple

import numpy as np

#: Deflate never expands data by more than 1032:1.
DEFLATE_MAX_RATIO = 1032
#: Largest ``.npy`` header accepted (numpy's own default limit).
MAX_HEADER_SIZE = 10_000
#: Member dtypes accepted: booleans, integers, floats, complex, unicode and bytes strings.
_DTYPE_KINDS = "biufcUS"


class NpyHeader(NamedTuple):
    """What a member's ``.npy`` header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    nbytes: int


def open_regular_file(path: str) -> IO[bytes]:
    """Open ``path`` for reading, refusing anything but a regular file.

    Raises ``FileNotFoundError`` / ``PermissionError`` as ``open`` does, ``IsADirectoryError``
    for a directory, and ``OSError`` (ESPIPE-like, with a clear message) for a FIFO, socket
    or device. ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a
    writer; it is cleared again for the regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if not stat.S_ISREG(mode):
            raise OSError(f"{path}: not a regular file (a FIFO, socket or device); refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str, max_bytes: int, error: type[Exception], what: str = "file") -> bytes:
    """All the bytes of ``path``, a regular file of at most ``max_bytes`` (checked before reading).

    A missing file is ``FileNotFoundError`` naming ``what``, an unreadable one
    ``PermissionError``; a directory, FIFO, socket or device, or a file over the limit, is
    ``error`` with one line naming ``path``.
    """
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        fh = open_regular_file(path)
    except IsADirectoryError:
        raise error(f"{path}: not a regular file (a directory)") from None
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as exc:
        raise error(str(exc) if str(exc).startswith(path) else f"{path}: {exc}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise error(f"{path}: file is {size} bytes, more than the limit of {max_bytes}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: file is larger than the limit of {max_bytes} bytes")
    return data


class NpzArchive:
    """A read-only view of an ``.npz`` archive that checks before it allocates.

    Parameters
    ----------
    path : str
    error : exception class
        Raised (with ``"<path>: "`` in front of the message) for anything wrong with the
        file's contents.

    Use as a context manager. ``members`` maps each member's name (without ``.npy``) to
    its ``zipfile.ZipInfo``.
    """

    def __init__(self, path: str | os.PathLike, error: type[Exception] = ValueError) -> None:
        self.path = os.fspath(path)
        self.error = error
        self._fh = open_regular_file(self.path)
        self.size = os.fstat(self._fh.fileno()).st_size
        try:
            self._zf = zipfile.ZipFile(self._fh)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
            self._fh.close()
            raise self._err(f"not an .npz archive, or truncated or corrupted ({exc})") from None
        except BaseException:
            self._fh.close()
            raise
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name in self.members:
                self.close()
                raise self._err(f"member {name!r} appears twice")
            self.members[name] = info

    def _err(self, message: str) -> Exception:
        return self.error(f"{self.path}: {message}")

    def close(self) -> None:
        self._zf.close()
        self._fh.close()

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checks without reading data ---------------------------------------------------
    def check_names(self, allowed: Iterable[str], what: str = "member") -> None:
        """Reject members not in ``allowed`` (before decompressing anything)."""
        extra = sorted(set(self.members) - set(allowed))
        if extra:
            shown = ", ".join(repr(n) for n in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise self._err(f"unexpected {what}s {shown}")

    def _open_member(self, name: str) -> IO[bytes]:
        info = self.members.get(name)
        if info is None:
            raise self._err(f"member {name!r} is missing")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._err(f"member {name!r} uses an unsupported compression method ({info.compress_type})")
        if info.flag_bits & 0x1:
            raise self._err(f"member {name!r} is encrypted")
        try:
            return self._zf.open(info)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
            raise self._err(f"member {name!r} cannot be read, the file is truncated or corrupted ({exc})") from None

    def _read_header(self, name: str, fp: IO[bytes]) -> NpyHeader:
        info = self.members[name]
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=MAX_HEADER_SIZE)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=MAX_HEADER_SIZE)
            else:
                raise ValueError(f"unknown .npy version {version}")
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise self._err(f"member {name!r} is truncated or corrupted ({exc})") from None
        except (ValueError, SyntaxError, TypeError) as exc:
            raise self._err(f"member {name!r} is not in .npy format ({exc})") from None
        if dtype.hasobject or dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype:
            raise self._err(f"member {name!r} has unsupported dtype {dtype} (numbers or strings only)")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        header_len = fp.tell()
        stored = info.file_size - header_len
        bound = info.compress_size * DEFLATE_MAX_RATIO if info.compress_type == zipfile.ZIP_DEFLATED \
            else info.compress_size
        if nbytes != stored or nbytes > bound or info.compress_size > self.size:
            raise self._err(f"member {name!r} declares {dtype} {tuple(shape)} ({nbytes} bytes), but the archive "
                            f"stores {max(stored, 0)} bytes for it: truncated or corrupted")
        return NpyHeader(tuple(shape), dtype, bool(fortran), nbytes)

    def header(self, name: str) -> NpyHeader:
        """The ``.npy`` header of member ``name``, checked; no data is read."""
        with self._open_member(name) as fp:
            return self._read_header(name, fp)

    # -- reading data ----------------------------------------------------------------------
    def read_into(self, name: str, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous, the member's shape and dtype in native byte order) from
        member ``name``."""
        with self._open_member(name) as fp:
            head = self._read_header(name, fp)
            if head.shape != out.shape or head.dtype.newbyteorder("=") != out.dtype:
                raise self._err(f"member {name!r} holds {head.dtype} {head.shape}, expected {out.dtype} {out.shape}")
            target = out.T if head.fortran_order else out
            if head.fortran_order:
                # A Fortran-ordered member is the C-ordered transpose on disk.
                buf = np.empty(out.shape[::-1], out.dtype)
            else:
                buf = target
            try:
                view = memoryview(buf.reshape(-1)).cast("B") if head.nbytes else memoryview(b"")
                done = 0
                while done < head.nbytes:
                    n = fp.readinto(view[done:])
                    if not n:
                        break
                    done += n
                if done < head.nbytes:
                    raise self._err(f"member {name!r} is truncated ({done} of {head.nbytes} bytes)")
                if fp.read(1):  # reaching the end also makes zipfile check the CRC
                    raise self._err(f"member {name!r} has trailing bytes")
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                if isinstance(exc, self.error):
                    raise
                raise self._err(f"member {name!r} is truncated or corrupted ({exc})") from None
            if head.fortran_order:
                out[...] = buf.T
            if not head.dtype.isnative:
                out.byteswap(inplace=True)  # stored in the other byte order

    def read_small(self, name: str, limit: int) -> np.ndarray:
        """Read member ``name`` whole if its data take at most ``limit`` bytes."""
        head = self.header(name)
        if head.nbytes > limit:
            raise self._err(f"member {name!r} is {head.nbytes} bytes, more than the {limit} allowed for it")
        out = np.empty(head.shape, head.dtype.newbyteorder("="))
        self.read_into(name, out)
        return out
