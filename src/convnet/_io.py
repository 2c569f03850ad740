"""Atomic file writes: a temporary file beside the target, then one rename.

Temporary files are named ``.<target name>.<pid>.<random>.tmp``. A process killed in the
middle of a save (``kill -9``, power loss) leaves its temporary file behind; the next save
to the same path removes those whose process is gone, so repeated interrupted saves do not
pile up orphans.

Saving to a symbolic link replaces the file the link points to (atomically, in the link
target's directory) and keeps the link, as ``open(path, "wb")`` would; the link itself is
never replaced by a regular file.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from typing import BinaryIO


def resolve_target(path: str | os.PathLike) -> str:
    """The file a write to ``path`` lands in: ``path`` itself, or the file its symlinks point to."""
    path = os.fspath(path)
    return os.path.realpath(path) if os.path.islink(path) else path


def _temp_name(target: str) -> str:
    directory = os.path.dirname(os.path.abspath(target))
    return os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def remove_orphans(target: str) -> list[str]:
    """Remove temporary files of earlier, interrupted saves to ``target``; returns their paths.

    Only files whose writing process no longer exists are removed (a save in progress in
    another process keeps its file). POSIX only: elsewhere nothing is removed.
    """
    if os.name != "posix":
        return []
    directory = os.path.dirname(os.path.abspath(target))
    pattern = re.compile(re.escape(f".{os.path.basename(target)}.") + r"(\d+)\.[0-9a-f]{8}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` naming ``path`` if a file cannot be saved there (creates and removes
    one temporary file, exactly as a save would)."""
    path = os.fspath(path)
    target = resolve_target(path)
    tmp = _temp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, path) from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` only if the ``with`` block succeeds.

    The data go to a new temporary file in the same directory (so the rename stays on one
    file system), are flushed to disk, and the file is renamed over ``path`` (over the
    file it points to if ``path`` is a symbolic link). An exception or interrupt leaves
    the old file as it was and removes the temporary one; orphans of killed earlier saves
    are removed first. The file is created with ``open(..., "xb")``, so it gets the user's
    umask (not ``mkstemp``'s 0600). ``OSError`` messages name ``path``, not the temporary file.
    """
    path = os.fspath(path)
    target = resolve_target(path)
    remove_orphans(target)
    tmp = _temp_name(target)
    try:
        fh = open(tmp, "xb")
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, path) from None
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_open`, after checking that its directory
    exists (``FileNotFoundError`` naming both, before anything is written)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist")
    with atomic_open(path) as fh:
        fh.write(data)
