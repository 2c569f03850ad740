"""Timing, memory and machine-description helpers for ``benchmarks/bench.py``.

Kept apart from the harness so that the measuring rules (warm-up, median of
time-bounded repeats, tracemalloc peaks, a wall-clock cap for slow loops) are
written once and read in one place.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import signal
import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Timing:
    """Wall-clock times of repeated calls, in seconds."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        """JSON form; ``scale`` multiplies every time (per-image scaling)."""
        return {
            "median_s": self.median * scale,
            "min_s": min(self.times) * scale,
            "max_s": max(self.times) * scale,
            "repeats": len(self.times),
        }


def measure(fn: Callable[[], Any], *, warmup: int = 1, min_repeats: int = 3,
            max_repeats: int = 50, budget_s: float = 1.0) -> tuple[Timing, Any]:
    """Time ``fn()`` after ``warmup`` untimed calls; return the timing and the first result.

    Repeats until at least ``min_repeats`` calls were timed and ``budget_s``
    seconds were spent on timed calls, or ``max_repeats`` calls were made.
    The garbage collector is paused while timing (as ``timeit`` does) so a
    collection does not land inside one sample; numpy frees its buffers by
    reference counting, so nothing piles up.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    first = None
    have_first = False
    for _ in range(warmup):
        out = fn()
        if not have_first:
            first, have_first = out, True
        del out
    timing = Timing()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        spent = 0.0
        while len(timing.times) < max_repeats:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            timing.times.append(dt)
            spent += dt
            if not have_first:
                first, have_first = out, True
            del out
            if len(timing.times) >= min_repeats and spent >= budget_s:
                break
    finally:
        if was_enabled:
            gc.enable()
    return timing, first


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    numpy reports its data buffers to tracemalloc, so this counts every array
    the call creates (outputs and caches included), and nothing that existed
    before the call (the inputs).
    """
    gc.collect()
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        if started_here:
            tracemalloc.stop()
    return max(0, peak - base)


def profile_top(fn: Callable[[], Any], repeats: int = 3, top: int = 8) -> dict[str, Any]:
    """Where ``fn``'s time goes: cProfile's functions with the largest own time.

    Matrix products (``@``) are not function calls, so their time counts in the
    function that makes them; numpy ufuncs and methods appear by name.
    """
    import cProfile
    import pstats

    fn()  # warm-up outside the profile
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(repeats):
        fn()
    prof.disable()
    total = (time.perf_counter() - t0) / repeats
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    own = sum(v[2] for v in stats.values()) or 1.0
    rows = []
    for (path, line, name), (_, ncalls, tottime, _, _) in sorted(
            stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = name if path == "~" else f"{name} ({os.path.basename(path)}:{line})"
        rows.append({"function": where, "calls": ncalls // repeats, "share": tottime / own,
                     "own_s": tottime / repeats})
    return {"total_s": total, "top": rows}


@contextlib.contextmanager
def blas_threads(threads: int | None) -> Iterator[str | None]:
    """Limit numpy's BLAS to ``threads`` threads inside the block (None: leave it).

    Yields a note for the report when the limit could not be applied (no
    threadpoolctl), else None.
    """
    from convnet._blas import limit_blas_threads

    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        note = None if threads is None else f"numpy BLAS threads NOT set to {threads}: threadpoolctl is not installed"
        yield note
        return
    with limit_blas_threads(threads):
        yield None


class TimeLimitExceeded(Exception):
    """Raised inside a ``time_limit`` block that ran out of time."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Abort the block with ``TimeLimitExceeded`` after ``seconds`` of wall time.

    Uses ``SIGALRM``, which Python delivers between bytecodes: it interrupts a
    Python loop (the loop reference) promptly, a single long C call only when it
    returns. Where there is no ``setitimer`` or we are not on the main thread,
    the block runs without a limit.
    """
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def _raise(signum, frame):  # noqa: ARG001
        raise TimeLimitExceeded(f"time limit of {seconds:g} s exceeded")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def gemm_rate(n: int = 2048, budget_s: float = 1.0, min_repeats: int = 3) -> dict[str, Any]:
    """Measured float32 GEMM rate: median time of an ``(n, n) @ (n, n)`` numpy matmul."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    timing, _ = measure(lambda: np.matmul(a, b, out=out), warmup=1,
                        min_repeats=min_repeats, budget_s=budget_s)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": "float32", **timing.to_dict(), "gflops": flops / timing.median / 1e9}


class OtherLoad:
    """CPU time that *other* processes used while a block ran, from ``/proc/stat``.

    On 2 shared cores another job's CPU use makes BLAS threads wait for each other,
    which can slow a measurement several-fold; this tells whether that happened.
    ``fraction`` is the other processes' share of the machine's capacity during the
    block (0 = the machine was ours alone); None where ``/proc/stat`` is missing.
    """

    def __init__(self) -> None:
        self.fraction: float | None = None
        self.other_cpu_s: float | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OtherLoad:
        self._busy0 = self._busy_s()
        t = os.times()
        self._own0, self._wall0 = t.user + t.system, time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy1 = self._busy_s()
        if self._busy0 is None or busy1 is None:
            return
        t = os.times()
        wall = time.perf_counter() - self._wall0
        own = t.user + t.system - self._own0
        self.other_cpu_s = max(0.0, (busy1 - self._busy0) - own)
        capacity = wall * (os.cpu_count() or 1)
        self.fraction = min(1.0, self.other_cpu_s / capacity) if capacity > 0 else 0.0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> list[dict[str, Any]]:
    """Thread pools (BLAS, OpenMP) from threadpoolctl when installed, else numpy's build config."""
    try:
        import threadpoolctl
    except ImportError:
        pass
    else:
        keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture",
                "threading_layer")
        return [{k: pool.get(k) for k in keep if pool.get(k) is not None}
                for pool in threadpoolctl.threadpool_info()]
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return [{"user_api": "blas", "source": "numpy.show_config (build time; threads unknown)",
                 "name": blas.get("name"), "version": blas.get("version"),
                 "configuration": blas.get("openblas configuration")}]
    except Exception as exc:  # the config layout is not a stable API
        return [{"user_api": "blas", "error": f"unavailable: {exc}"}]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, Python/numpy, BLAS and thread settings."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    env_keys = sorted(k for k in os.environ
                      if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOTO", "BLIS_", "VECLIB_")))
    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "env": {k: os.environ[k] for k in env_keys},
    }
