"""numpy's own BLAS: an accumulating GEMM, ``c = a @ b + beta * c``, and its thread pool.

numpy's ``matmul`` has no accumulate form, and calling scipy's BLAS wrappers instead
loads a *second* OpenBLAS with its own thread pool; its idle workers spin while numpy's
work, and on a small machine the two pools steal each other's cores (measured: small
GEMMs slowed from 0.2 ms to 4 ms). So :func:`gemm` calls the CBLAS ``gemm`` of the very
library numpy uses, through ctypes, with strides passed as leading dimensions (no
copies). That library is found with ``threadpoolctl.threadpool_info()``, which reports
the file of every BLAS loaded in the process and its internal API (OpenBLAS, MKL, ...).
Where it cannot be found or fails its self-test, or when the environment variable
``CONVNET_BLAS_FALLBACK=1`` forces it, :func:`gemm` falls back to ``numpy.matmul`` and an
add: the same result with one extra pass over ``c``. :func:`backend` says which path is
in use and why.

The thread pool: :func:`limit_blas_threads` sets it for a block; :class:`ThreadPolicy`
chooses a count from what the machine can give (see its docstring).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _args

__all__ = ["gemm", "available", "backend", "Backend", "FALLBACK_ENV", "THREADS_ENV", "limit_blas_threads",
           "get_num_threads", "set_num_threads", "ThreadPolicy", "choose_threads", "resolve_threads",
           "blas_threads", "policy", "usable_cpus"]

#: Set to 1 (or true/yes/on) to force the ``numpy.matmul`` fallback of :func:`gemm`.
FALLBACK_ENV = "CONVNET_BLAS_FALLBACK"
#: Default BLAS thread setting of training and inference: "auto" or a positive int.
THREADS_ENV = "CONVNET_BLAS_THREADS"

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Backend:
    """Which path :func:`gemm` takes, and on what.

    ``path`` is ``"cblas"`` (numpy's BLAS called through ctypes) or ``"matmul"`` (the
    numpy fallback); ``library``, ``internal_api`` and ``version`` describe numpy's BLAS
    as threadpoolctl reports it (None where unknown); ``detail`` names the symbols used
    or says why the fallback is in use.
    """

    path: str
    library: str | None
    internal_api: str | None
    version: str | None
    detail: str

    def __str__(self) -> str:
        lib = f"{self.internal_api or '?'} {self.version or ''}".strip()
        if self.path == "cblas":
            return f"cblas ({self.detail}) of numpy's {lib}: {self.library}"
        return f"numpy matmul fallback: {self.detail}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _numpy_dirs() -> list[str]:
    """Folders where numpy's wheels keep their bundled libraries (Linux, Windows, macOS)."""
    pkg = os.path.dirname(os.path.realpath(np.__file__))
    return [pkg + os.sep, os.path.join(os.path.dirname(pkg), "numpy.libs") + os.sep]


def _numpy_pool(info: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """numpy's BLAS among threadpoolctl's pools, or None and why not."""
    blas = [p for p in info if p.get("user_api") == "blas" and p.get("filepath")]
    if not blas:
        return None, "threadpoolctl sees no BLAS library in this process"
    dirs = _numpy_dirs()
    inside = [p for p in blas if os.path.realpath(p["filepath"]).startswith(tuple(dirs))]
    if len(inside) == 1:
        return inside[0], ""
    if len(blas) == 1:  # a system or conda numpy linked to one shared BLAS
        return blas[0], ""
    return None, ("several BLAS libraries are loaded (" + ", ".join(p["filepath"] for p in blas)
                  + ") and none is inside numpy's folder, so numpy's cannot be told apart")


def _symbol_candidates(letter: str) -> list[tuple[str, Any]]:
    """CBLAS names of ``{s,d}gemm`` in the builds numpy ships or links, with their integer type."""
    i64, i32 = ctypes.c_int64, ctypes.c_int
    return [(f"scipy_cblas_{letter}gemm64_", i64), (f"cblas_{letter}gemm64_", i64),
            (f"scipy_cblas_{letter}gemm", i32), (f"cblas_{letter}gemm", i32)]


def _bind(lib: ctypes.CDLL, dtype: np.dtype) -> tuple[Callable | None, str]:
    real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    ptr = ctypes.c_void_p
    for name, integer in _symbol_candidates("s" if dtype == np.float32 else "d"):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer, real, ptr, integer,
                       ptr, integer, real, ptr, integer]
        fn.restype = None
        return fn, name
    return None, ""


def _self_test(fns: dict[np.dtype, Callable]) -> str:
    """Run a small GEMM of each kind through ``fns``; '' when all agree with matmul."""
    for dtype, fn in fns.items():
        a = np.arange(12, dtype=dtype).reshape(3, 4)
        b = np.arange(20, dtype=dtype).reshape(5, 4).T[:, 1:]  # a (4, 4) transposed view
        for beta in (0.0, 1.0):
            c = np.full((3, 6), 7, dtype=dtype)[:, 1:5]
            want = a @ b + beta * 7
            if not _call(fn, a, b, c, beta) or not np.array_equal(c, want):
                return f"its {dtype} gemm failed the self-test"
    return ""


def _load() -> tuple[dict[np.dtype, Callable], Backend]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}, Backend("matmul", None, None, None, "threadpoolctl is not installed")
    pool, why = _numpy_pool(threadpool_info())
    if pool is None:
        return {}, Backend("matmul", None, None, None, why)
    path, api, version = pool["filepath"], pool.get("internal_api"), pool.get("version")
    if _env_flag(FALLBACK_ENV):
        return {}, Backend("matmul", path, api, version, f"forced by {FALLBACK_ENV}=1")
    try:
        lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle and thread pool
    except OSError as exc:
        return {}, Backend("matmul", path, api, version, f"cannot open {path} ({exc})")
    found, names = {}, []
    for dtype in _FLOATS:
        fn, name = _bind(lib, dtype)
        if fn is not None:
            found[dtype] = fn
            names.append(name)
    if len(found) != len(_FLOATS):
        return {}, Backend("matmul", path, api, version, f"no CBLAS sgemm and dgemm symbols in {path}")
    failed = _self_test(found)
    if failed:
        return {}, Backend("matmul", path, api, version, f"{path}: {failed}")
    return found, Backend("cblas", path, api, version, ", ".join(names))


def _operand(a: np.ndarray) -> tuple[int, int] | None:
    """``(transpose flag, leading dimension)`` for BLAS, or None if ``a`` needs a copy."""
    item = a.itemsize
    rows, cols = a.shape
    s0, s1 = a.strides
    if (s1 == item or cols == 1) and s0 % item == 0 and s0 // item >= max(1, cols):
        return _NO_TRANS, s0 // item
    if (s0 == item or rows == 1) and s1 % item == 0 and s1 // item >= max(1, rows):
        return _TRANS, s1 // item
    return None


def _call(fn: Callable, a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float) -> bool:
    """``c = a @ b + beta * c`` through CBLAS ``fn``; False when an operand's strides need a copy."""
    oc, oa, ob = _operand(c), _operand(a), _operand(b)
    if oc is None or oc[0] != _NO_TRANS or oa is None or ob is None:
        return False
    m, k = a.shape
    fn(_ROW_MAJOR, oa[0], ob[0], m, b.shape[1], k, 1.0, a.ctypes.data, oa[1], b.ctypes.data, ob[1],
       beta, c.ctypes.data, oc[1])
    return True


_GEMM, _BACKEND = _load()


def available() -> bool:
    """True when :func:`gemm` calls numpy's BLAS directly (no temporary, no second thread pool)."""
    return bool(_GEMM)


def backend() -> Backend:
    """The GEMM path in use, numpy's BLAS library, and the reason for a fallback."""
    return _BACKEND


def _check(a: Any, b: Any, c: Any) -> None:
    for name, v in (("a", a), ("b", b), ("c", c)):
        if not isinstance(v, np.ndarray) or v.ndim != 2:
            raise TypeError(f"gemm: {name} must be a 2-D ndarray, got "
                            f"{getattr(v, 'shape', type(v).__name__)}")
    if not a.dtype == b.dtype == c.dtype or c.dtype not in _FLOATS:
        raise TypeError(f"gemm: a, b and c must share one float dtype (float32 or float64), got "
                        f"a {a.dtype}, b {b.dtype}, c {c.dtype}")
    if a.shape[1] != b.shape[0] or c.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"gemm: shapes do not match, a {a.shape} @ b {b.shape} into c {c.shape}")
    if not c.flags.writeable:
        raise ValueError("gemm: c is read-only")


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 1.0) -> None:
    """``c[...] = a @ b + beta * c``, in place.

    Parameters
    ----------
    a : ndarray, shape (M, K); b : ndarray, shape (K, N); c : ndarray, shape (M, N)
        2-D arrays of one float dtype. Views are fine (rows may be strided; ``a`` and
        ``b`` may be transposed views); ``c`` must not overlap ``a`` or ``b``.
    beta : 0 ignores the old contents of ``c`` (it may be uninitialised; this is
        ``numpy.matmul(a, b, out=c)``), 1 accumulates (CBLAS, or matmul and an add).

    Raises
    ------
    TypeError, ValueError
        Before writing anything, for operands that are not 2-D float arrays of one dtype,
        for shapes that do not chain, or for a read-only ``c``.
    """
    _check(a, b, c)
    if beta == 0.0:
        # matmul calls the same BLAS gemm with less per-call overhead than ctypes: measured
        # equal on LeNet's and CIFAR's GEMMs, 1.5 vs 8 us on a tiny one.
        np.matmul(a, b, out=c)
        return
    fn = _GEMM.get(c.dtype)
    if fn is not None and 0 not in c.shape and a.shape[1] and _call(fn, a, b, c, beta):
        return
    c *= beta
    c += a @ b


# --------------------------------------------------------------------------- threads

def _controller() -> Any:
    """threadpoolctl's controller of numpy's BLAS, or None."""
    global _CONTROLLER
    if _CONTROLLER is False:
        _CONTROLLER = None
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return None
        libs = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
        if _BACKEND.library is not None:
            libs = [lc for lc in libs if lc.filepath == _BACKEND.library] or libs
        _CONTROLLER = libs[0] if len(libs) == 1 else None
    return _CONTROLLER


_CONTROLLER: Any = False
_ACTIVE: list[_Threads] = []  # the running "auto" blocks: nested ones share the outermost policy


def get_num_threads() -> int | None:
    """Threads of numpy's BLAS pool (None when it cannot be controlled)."""
    ctl = _controller()
    return None if ctl is None else int(ctl.get_num_threads())


def set_num_threads(threads: int) -> None:
    """Set numpy's BLAS pool to ``threads`` threads (a no-op when it cannot be controlled)."""
    ctl = _controller()
    if ctl is not None:
        ctl.set_num_threads(int(threads))


@contextlib.contextmanager
def limit_blas_threads(threads: int | None) -> Iterator[None]:
    """Limit the BLAS thread pools to ``threads`` inside the ``with`` block (None: leave them).

    On a busy machine spinning BLAS threads can slow small GEMMs down by an order of
    magnitude; ``threads=1`` avoids that. Uses ``threadpoolctl`` (every BLAS in the
    process, numpy's and any other); a no-op without it.
    """
    if threads is None:
        yield
        return
    threads = _args.positive_int(threads, "threads")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional at run time: only speed depends on it
        yield
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield


# --------------------------------------------------------------------------- thread policy

def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat", "rb") as fh:
            fields = fh.readline().split()[1:8]  # user .. softirq; steal is not ours to use
        values = [int(v) for v in fields]
    except (OSError, ValueError):
        return None
    if len(values) < 5:
        return None
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _CLK_TCK


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _others_runnable() -> float | None:
    """Threads of other processes that want a CPU right now, or None where unknown.

    ``procs_running`` (``/proc/stat``: runnable threads machine-wide, at this instant) less
    this process's own runnable threads (state ``R`` in ``/proc/self/task/*/stat``). CPU
    time alone hides demand: while our spinning BLAS threads hold both cores, busy
    processes get little CPU and look idle, yet they are runnable.
    """
    try:
        with open("/proc/stat", "rb") as fh:
            running = next(int(line.split()[1]) for line in fh if line.startswith(b"procs_running"))
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                    own += fh.read().rsplit(b")", 1)[1].split()[0] == b"R"
            except OSError:  # the thread ended meanwhile
                continue
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return float(max(0, running - max(own, 1)))


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def choose_threads(others: float, cpus: int, most: int) -> int:
    """BLAS threads for a machine where other processes keep ``others`` CPUs busy.

    One thread per CPU left free by the others, rounded to the nearest, at least 1 and at
    most ``most``. On 2 CPUs: 2 threads only while the others use under half a CPU.
    (A waiting OpenBLAS thread spins on its core; when another process wants that core
    the GEMM stalls until the scheduler runs it again.)
    """
    free = cpus - max(0.0, others)
    return max(1, min(most, int(math.floor(free + 0.5))))


class ThreadPolicy:
    """Chooses numpy's BLAS thread count from what the machine can give, cheaply.

    Every ``interval`` seconds at most (not on every call), :meth:`update` reads how much
    CPU time the machine spent busy (``/proc/stat``) and subtracts this process's own
    (``os.times``, which counts its spinning BLAS threads too): the rest is the other
    processes' load over the window, in CPUs. It also counts the other processes' threads
    that are runnable at that instant (:func:`_others_runnable`; the smaller of the last two
    counts, so that a passing process does not count), and takes the larger of the two:
    CPU time shows what others got, the count what they want, and while two spinning BLAS
    threads hold both cores the others get little. :func:`choose_threads` turns it into a
    thread count, applied when it changes. Until a first window has been measured the
    policy takes 1 thread, the side that cannot stall; where ``/proc/stat`` is missing
    it takes ``most``.

    The readers are arguments so tests can feed it fake load: ``busy()`` and ``own()``
    return CPU seconds (``busy`` may return None), ``demand()`` the others' runnable
    threads (or None), ``clock()`` wall seconds, ``apply(n)`` sets the pool.
    """

    def __init__(self, most: int | None = None, cpus: int | None = None, interval: float = 0.25,
                 busy: Callable[[], float | None] = _busy_seconds, own: Callable[[], float] = _own_seconds,
                 demand: Callable[[], float | None] = _others_runnable, clock: Callable[[], float] = time.perf_counter,
                 apply: Callable[[int], None] = set_num_threads) -> None:
        self.cpus = usable_cpus() if cpus is None else cpus
        self.most = self._cap(most if most is not None else (get_num_threads() or self.cpus))
        self.interval = interval
        self._busy, self._own, self._demand, self._clock, self._apply = busy, own, demand, clock, apply
        self._last_demand: float | None = None
        self.threads: int | None = None  # the count last applied
        self.others: float | None = None  # the other processes' load in the last window, in CPUs
        self._mark: tuple[float, float | None, float] | None = None

    def _cap(self, most: int) -> int:
        return max(1, min(self.cpus, int(most)))

    def _choice(self) -> int:
        if self._mark is not None and self._mark[1] is None:  # no /proc/stat: nothing to go by
            return self.most
        if self.others is None:
            return 1
        return choose_threads(self.others, self.cpus, self.most)

    def start(self, most: int | None = None) -> int:
        """Begin a block of work (with at most ``most`` threads): apply the current choice.

        Readings persist between blocks, so a short block uses what earlier ones measured.
        """
        if most is not None:
            self.most = self._cap(most)
        if self._mark is None:
            self._mark = (self._clock(), self._busy(), self._own())
        self.threads = None  # the pool may have been changed in between: apply again
        return self.update()

    def update(self) -> int:
        """Re-read the load if ``interval`` has passed since the last reading; apply and
        return the thread count."""
        if self._mark is None:
            return self.start()
        now = self._clock()
        t0, busy0, own0 = self._mark
        if now - t0 >= self.interval:
            busy1, own1 = self._busy(), self._own()
            self._mark = (now, busy1, own1)
            if busy0 is not None and busy1 is not None:
                others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (now - t0)
                demand = self._demand()
                if demand is not None:
                    seen = demand if self._last_demand is None else min(demand, self._last_demand)
                    self._last_demand = demand
                    others = max(others, seen)
                self.others = others
        threads = self._choice()
        if threads != self.threads:
            self._apply(threads)
            self.threads = threads
        return threads


_POLICY: ThreadPolicy | None = None


def policy() -> ThreadPolicy:
    """The process's thread policy (its readings are shared by every "auto" block)."""
    global _POLICY
    if _POLICY is None:
        _POLICY = ThreadPolicy()
    return _POLICY


def resolve_threads(value: Any, name: str = "blas_threads") -> int | str:
    """A ``blas_threads`` argument made canonical: a positive int or ``"auto"``.

    None takes the environment variable ``CONVNET_BLAS_THREADS`` ("auto" or an int), and
    "auto" when it is unset.
    """
    source = name
    if value is None:
        value = os.environ.get(THREADS_ENV, "").strip() or "auto"
        source = THREADS_ENV
        if value != "auto":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{THREADS_ENV} must be 'auto' or a positive int, got {value!r}") from None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{source} must be 'auto' or a positive int, got {value!r}")
        return value
    return _args.positive_int(value, source)


class _Threads:
    """What :func:`blas_threads` yields: call :meth:`step` between units of work."""

    def __init__(self, policy: ThreadPolicy | None) -> None:
        self.policy = policy

    def step(self) -> None:
        if self.policy is not None:
            self.policy.update()


@contextlib.contextmanager
def blas_threads(setting: int | str | None) -> Iterator[_Threads]:
    """Run a block with the BLAS thread ``setting`` (see :func:`resolve_threads`).

    A fixed count is set for the block; "auto" lets the process's :class:`ThreadPolicy`
    choose, at most the pool's current count; the block's loop lets it re-decide by calling
    ``.step()`` on the yielded object (e.g. once per training step; cheap, it reads the
    load at most every 0.25 s). The pool's thread count is restored afterwards.
    """
    setting = resolve_threads(setting)
    if setting != "auto":
        with limit_blas_threads(setting):
            yield _Threads(None)
        return
    if _ACTIVE:  # e.g. validation inside fit: the outer block goes on
        yield _ACTIVE[-1]
        return
    before = get_num_threads()
    if before is None:  # nothing to control
        yield _Threads(None)
        return
    pol = policy()
    pol.start(most=before)
    _ACTIVE.append(_Threads(pol))
    try:
        yield _ACTIVE[-1]
    finally:
        _ACTIVE.pop()
        set_num_threads(before)
