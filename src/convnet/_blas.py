"""An accumulating matrix multiply, ``c = a @ b + beta * c``, on numpy's own BLAS.

numpy's ``matmul`` has no accumulate form, and calling scipy's BLAS wrappers instead
loads a *second* OpenBLAS with its own thread pool; its idle workers spin while
numpy's work, and on a small machine the two pools steal each other's cores (measured:
small GEMMs slowed from 0.2 ms to 4 ms). So this module calls the CBLAS ``gemm`` that
numpy's wheel bundles, through ctypes, with strides passed as leading dimensions (no
copies). Where that library cannot be found (another numpy build), it falls back to
``matmul`` and an add, which gives the same result with one extra pass over ``c``.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

# (symbol, integer type) pairs known from numpy's bundled OpenBLAS builds (ILP64).
_SYMBOLS = {
    np.dtype(np.float32): ("scipy_cblas_sgemm64_", "cblas_sgemm64_"),
    np.dtype(np.float64): ("scipy_cblas_dgemm64_", "cblas_dgemm64_"),
}


def _load() -> dict:
    libs_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    found: dict = {}
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle and thread pool
        except OSError:
            continue
        for dtype, names in _SYMBOLS.items():
            for name in names:
                fn = getattr(lib, name, None)
                if fn is None:
                    continue
                real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, real, ptr, i64,
                               ptr, i64, real, ptr, i64]
                fn.restype = None
                found[dtype] = fn
                break
        if found:
            break
    return found


_GEMM = _load()


def available() -> bool:
    """True when numpy's bundled CBLAS is used (no temporary, no second thread pool)."""
    return bool(_GEMM)


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


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 1.0) -> None:
    """``c[...] = a @ b + beta * c``, in place.

    Parameters
    ----------
    a : ndarray, shape (M, K); b : ndarray, shape (K, N); c : ndarray, shape (M, N)
        2-D arrays of one float dtype. Views are fine (rows may be strided; ``a`` and
        ``b`` may be transposed views); ``c`` must have unit stride along its rows.
    beta : 0 ignores the old contents of ``c`` (it may be uninitialised), 1 accumulates.
    """
    m, k = a.shape
    n = b.shape[1]
    fn = _GEMM.get(c.dtype)
    oc = _operand(c)
    oa, ob = _operand(a), _operand(b)
    if fn is None or oc is None or oc[0] != _NO_TRANS or oa is None or ob is None or 0 in (m, n, k):
        if beta == 0.0:
            np.matmul(a, b, out=c)
        else:
            c *= beta
            c += a @ b
        return
    fn(_ROW_MAJOR, oa[0], ob[0], m, n, k, 1.0, a.ctypes.data, oa[1], b.ctypes.data, ob[1],
       beta, c.ctypes.data, oc[1])
