"""Test helpers for hostile inputs: a memory ceiling and a call that must not block."""

from __future__ import annotations

import contextlib
import threading
import tracemalloc
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def traced_peak_below(limit: int) -> Iterator[None]:
    """Assert that the block's traced allocations (tracemalloc) peak below ``limit`` bytes,
    whether it returns or raises."""
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, f"peak {peak} bytes, limit {limit}"


def raised_in_thread(fn: Callable[[], object], what: str, seconds: float = 10) -> Exception:
    """The exception ``fn()`` raises on a daemon thread (a FIFO must not block it)."""
    result: list[Exception] = []

    def target() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} blocked on a FIFO"
    assert result, f"{what} raised nothing"
    return result[0]
