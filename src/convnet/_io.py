"""Atomic file writes: a temporary file beside the target, then one rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` only if the ``with`` block succeeds.

    The data go to a new temporary file in the same directory (so the rename stays on one
    file system), are flushed to disk, and the file is renamed over ``path``. An exception
    or interrupt leaves the old file as it was and removes the temporary one. The file is
    created with ``open(..., "xb")``, so it gets the user's umask (not ``mkstemp``'s 0600).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
