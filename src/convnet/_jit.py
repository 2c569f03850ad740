"""Optional compiled kernels: numba (the ``fast`` extra), imported and compiled on first use.

Modules register plain Python kernels by name (:func:`register`); :func:`run` calls the
compiled one. numba is imported by the first :func:`available` (not at package import:
it costs about half a second), and the kernels are compiled then, lazily per argument
types by numba. They are cached on disk (``cache=True``): the first process compiles
them, later ones load them. Where no cache location is writable (numba tries
``NUMBA_CACHE_DIR``, the package's ``__pycache__``, then the user's cache folder) they are
compiled in memory in every process instead.

Callers keep a numpy path for when numba is missing (:func:`available` is False). Kernels
that only speed up a numpy twin with the same bits ask :func:`ready` instead, which says no
for the process's first :data:`WARMUP_CALLS` calls: a short run (the first 50 or so steps
of a LeNet training) does not pay numba's import and cache load, about 0.8 s, for kernels
that would save it less; a longer one pays it once and gains on every later step.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

_PY_KERNELS: dict[str, Callable] = {}
_OPTIONS: dict[str, dict] = {}  # extra numba.njit options by kernel name
#: Calls of :func:`ready` answered "no" before numba is imported for them (see the module doc).
WARMUP_CALLS = 100


class _State:
    lock = threading.Lock()
    ready_calls = 0  # calls of ready() so far (a race may lose a count: harmless)
    checked = False
    numba = None  # the module, once imported
    reason = ""  # why compiled kernels are unavailable, or how they are cached
    kernels: dict = {}


def register(options: dict | None = None, /, **kernels: Callable) -> None:
    """Add plain Python kernels (compiled on first :func:`run`), with extra ``numba.njit``
    ``options`` if given (e.g. ``{"error_model": "numpy"}``: a float division by zero gives
    inf or nan as in numpy instead of raising, which lets a loop with divisions vectorize)."""
    _PY_KERNELS.update(kernels)
    _OPTIONS.update({name: dict(options or {}) for name in kernels})


def ready() -> bool:
    """Whether a kernel whose numpy twin gives the same bits should run compiled now: after
    :data:`WARMUP_CALLS` calls of this function in the process, where numba imports."""
    if _State.ready_calls < WARMUP_CALLS:
        _State.ready_calls += 1
        return False
    return available()


def available() -> bool:
    """True when numba imports (the ``fast`` extra); the first call imports it."""
    _import_numba()
    return _State.numba is not None


def status() -> str:
    """One line on the compiled kernels: unavailable and why, or where they are cached."""
    _import_numba()
    return _State.reason


def _import_numba() -> None:
    if _State.checked:
        return
    with _State.lock:
        if _State.checked:
            return
        try:
            _State.numba = importlib.import_module("numba")
            _State.reason = f"numba {_State.numba.__version__}"
        except Exception as exc:  # absent, or installed against another numpy
            _State.reason = f"numba not usable ({type(exc).__name__}: {exc})"
        _State.checked = True


def _compile(name: str, cache: bool):
    return _State.numba.njit(cache=cache, nogil=True, boundscheck=False, **_OPTIONS.get(name, {}))(_PY_KERNELS[name])


def kernels() -> dict:
    """The compiled kernels by name; raises RuntimeError without numba."""
    if _State.kernels.keys() >= _PY_KERNELS.keys():
        return _State.kernels
    if not available():
        raise RuntimeError(f"compiled kernels need numba (pip install 'convnet[fast]'): {_State.reason}")
    with _State.lock:
        missing = [name for name in _PY_KERNELS if name not in _State.kernels]
        if missing:
            try:  # numba raises RuntimeError when no cache location is writable
                built = {name: _compile(name, True) for name in missing}
                where = "cached on disk"
            except RuntimeError:
                built = {name: _compile(name, False) for name in missing}
                where = "compiled in memory (no writable numba cache location)"
            _State.reason = f"numba {_State.numba.__version__}, {where}"
            _State.kernels = dict(_State.kernels, **built)
    return _State.kernels


def run(name: str, *args) -> None:
    """Call a kernel; if saving its compiled code fails (the cache folder became unwritable
    after it was chosen), compile it in memory instead and call again."""
    fn = kernels()[name]
    try:
        fn(*args)
    except OSError:
        with _State.lock:
            _State.kernels = dict(_State.kernels, **{name: _compile(name, False)})
            _State.reason = (f"numba {_State.numba.__version__}, compiled in memory "
                             "(the numba cache location is not writable)")
        _State.kernels[name](*args)
