"""Winograd F(4x4, 3x3) convolution, compiled with numba (the optional ``fast`` extra).

A stride-1, dilation-1 3x3 correlation computes each 4x4 block of outputs from a 6x6
block of the input with 36 multiplies per channel instead of 144 (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", 2015)::

    Y = A^T [ sum_c (G g_c G^T) * (B^T d_c B) ] A         (* elementwise, 6x6)

Over a batch, each of the 36 frequencies is one GEMM: ``M[k] = U[k] @ V[k]`` with the
transformed filters ``U`` (36, F, C), the transformed input tiles ``V`` (36, C, T) and
``T = N * tiles per image``, column ``tile*N + n`` (the images innermost, tiles row by
row). The weight gradient is the adjoint of the same linear maps: ``dU[k] = dM[k] @ V[k].T``
with ``dM = A dY A^T`` per 4x4 tile of ``dy``, then ``dg = G^T dU G``; the input gradient
is the forward applied to ``dy`` with the flipped, channel-swapped filters. Tiles that run
past the input or the output read zeros and are not written, so any padding (even larger
than the kernel) and any size work.

The tile transforms are the compiled part. Per channel (or filter) and tile row, the rows
of all N images are de-interleaved into 16 phase planes (row and column modulo 4) with the
images innermost, so every transform loop runs over one tile row of the whole batch:
``tiles per row * N`` unit-stride elements (512 on a 16x16 map at batch 128). The GEMMs
go to numpy's BLAS (:func:`convnet._blas.gemm`).

Accuracy: the transforms' constants (up to 8 in ``A``, 5 in ``B``, 1/24 in ``G``) grow
rounding errors: in float32 the forward and input gradient are about 5e-6 of the
largest output (the exact algorithms: about 3e-7), the weight gradient about 1e-5 (like
the exact ones, whose long sums dominate). float64 results agree to about 1e-14.

The kernels are compiled by :mod:`convnet._jit` (cached on disk; the first process
compiles them in a few seconds, later ones load them).
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

from . import _blas, _jit, core

#: ``B^T`` (6x6): input tile transform, ``V = B^T d B``.
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], dtype=np.float64)
#: ``G`` (6x3): filter transform, ``U = G g G^T``.
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
#: ``A^T`` (4x6): output tile transform, ``Y = A^T M A``.
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], dtype=np.float64)

#: ``G (x) G`` (36x9): the filter transform of a flattened 3x3 filter, ``vec(G g G^T)``.
_GG = np.kron(G, G)

TILE = 4  # outputs per tile side
SPAN = 6  # inputs per tile side: TILE + 3 - 1


# --------------------------------------------------------------------------- kernels
# Plain Python functions, compiled on first use by :func:`kernels`. What made them
# vectorize (checked in the generated assembly): every inner loop indexes 1-D views by
# its loop variable only (an offset of unknown sign makes numba emit a wraparound select,
# and the address is then no longer affine), and the constants come in as ``k``, an array
# of the data's dtype (a Python int or float literal turns float32 arithmetic into float64).
# What made them fast: long inner loops. With one image's tiles innermost (20 per loop on
# a 16x16 map) loop overhead dominated (9 ns per output element); with the batch innermost
# the arithmetic passes measured 0.4-0.55 ns per transformed element (1 thread, AVX2). The
# de-interleave into, and the interleave out of, the images-innermost order is a transpose
# and stays scalar: about 1-1.5 ns per element of x or y (8 images per step, unrolled, their
# rows read or written once in order measured best among the orders tried), now the larger
# part of each transform on maps of 32x32 and more.

def _constants(dtype) -> np.ndarray:
    """The transforms' constants 2, 4, 5, 8 in ``dtype``, for the kernels' ``k`` argument."""
    return np.array([2, 4, 5, 8], dtype=dtype)


def _input_transform(x, pt, pl, th, tw, v, k, c0, c1):
    """``v[k1*6 + k2, c, (ti*tw + tj)*N + n] = (B^T d B)[k1, k2]`` for the 6x6 block ``d`` of
    ``x[n, c]`` whose top-left corner is at row ``4*ti - pt``, column ``4*tj - pl`` (zeros
    outside ``x``), for channels ``c0 <= c < c1``."""
    c2, c4, c5 = k[0], k[1], k[2]
    n_img, n_ch, h, w = x.shape
    lp = tw + 1  # tile columns of a phase row: one more (the 6x6 blocks overlap by 2)
    run = tw * n_img  # the tiles of one tile row, all images: one inner loop
    ph = np.zeros((4, 4, lp * n_img), x.dtype)  # ph[a, b, tj*N + n] = xpad[n, 4ti + a, 4tj + b]
    rt = np.empty((2, 4, 6, run), x.dtype)  # B^T along the phase rows of tile rows ti, ti + 1
    xs = x.reshape(n_img, n_ch * h * w)
    lo = min(max(0, pl), 4 * lp)  # the padded columns lo <= cc < hi are inside x
    hi = max(lo, min(4 * lp, pl + w))
    for c in range(c0, c1):
        for ti in range(th + 1):
            # 1. de-interleave the padded rows 4ti..4ti+3 of all images into the phase planes,
            # 8 images at a time, each image's 4 rows read once, in order
            for a in range(4):
                r = 4 * ti + a - pt
                if r < 0 or r >= h:
                    ph[a] = 0
            for n0 in range(0, n_img - 7, 8):
                x0, x1, x2, x3 = xs[n0], xs[n0 + 1], xs[n0 + 2], xs[n0 + 3]
                x4, x5, x6, x7 = xs[n0 + 4], xs[n0 + 5], xs[n0 + 6], xs[n0 + 7]
                for a in range(4):
                    pa = ph[a]
                    r = 4 * ti + a - pt
                    if r < 0 or r >= h:
                        continue
                    base = (c * h + r) * w - pl  # xs[n, base + cc]: padded column cc of row r
                    for cc in range(lo, hi):
                        col = base + cc
                        pb = pa[cc & 3]
                        q = (cc >> 2) * n_img + n0
                        pb[q] = x0[col]
                        pb[q + 1] = x1[col]
                        pb[q + 2] = x2[col]
                        pb[q + 3] = x3[col]
                        pb[q + 4] = x4[col]
                        pb[q + 5] = x5[col]
                        pb[q + 6] = x6[col]
                        pb[q + 7] = x7[col]
            for a in range(4):  # the last N % 8 images
                pa = ph[a]
                r = 4 * ti + a - pt
                if r < 0 or r >= h:
                    continue
                base = (c * h + r) * w - pl
                for n in range(n_img - n_img % 8, n_img):
                    xn = xs[n]
                    for cc in range(lo, hi):
                        pa[cc & 3, (cc >> 2) * n_img + n] = xn[base + cc]
            # 2. B^T along each row: columns 4tj..4tj+5 are phases 0-3 of tj and 0-1 of tj+1
            # (the next tile column: n_img further)
            slot = ti % 2
            for a in range(4):
                p0, p1, p2, p3 = ph[a, 0], ph[a, 1], ph[a, 2], ph[a, 3]
                p4, p5 = ph[a, 0, n_img:], ph[a, 1, n_img:]
                r0, r1, r2 = rt[slot, a, 0], rt[slot, a, 1], rt[slot, a, 2]
                r3, r4, r5 = rt[slot, a, 3], rt[slot, a, 4], rt[slot, a, 5]
                for q in range(run):
                    d0, d1, d2, d3, d4, d5 = p0[q], p1[q], p2[q], p3[q], p4[q], p5[q]
                    r0[q] = c4 * d0 - c5 * d2 + d4
                    s = d4 - c4 * d2
                    t = d3 - c4 * d1
                    r1[q] = s + t
                    r2[q] = s - t
                    s = d4 - d2
                    t = c2 * (d3 - d1)
                    r3[q] = s + t
                    r4[q] = s - t
                    r5[q] = c4 * d1 - c5 * d3 + d5
            if ti == 0:
                continue
            # 3. B^T down each column of tile row ti - 1: its rows are phases 0-3 of tile row
            # ti - 1 and phases 0-1 of tile row ti (the other slot and this one)
            o0 = (ti - 1) * run
            o1 = o0 + run
            up = 1 - slot
            for k2 in range(6):
                p0, p1, p2, p3 = rt[up, 0, k2], rt[up, 1, k2], rt[up, 2, k2], rt[up, 3, k2]
                p4, p5 = rt[slot, 0, k2], rt[slot, 1, k2]
                v0, v1, v2 = v[k2, c, o0:o1], v[6 + k2, c, o0:o1], v[12 + k2, c, o0:o1]
                v3, v4, v5 = v[18 + k2, c, o0:o1], v[24 + k2, c, o0:o1], v[30 + k2, c, o0:o1]
                for q in range(run):
                    d0, d1, d2, d3, d4, d5 = p0[q], p1[q], p2[q], p3[q], p4[q], p5[q]
                    v0[q] = c4 * d0 - c5 * d2 + d4
                    s = d4 - c4 * d2
                    t = d3 - c4 * d1
                    v1[q] = s + t
                    v2[q] = s - t
                    s = d4 - d2
                    t = c2 * (d3 - d1)
                    v3[q] = s + t
                    v4[q] = s - t
                    v5[q] = c4 * d1 - c5 * d3 + d5


def _output_transform(m, th, tw, bias, y, k, f0, f1):
    """``y[n, f, 4ti + i, 4tj + j] = (A^T M A)[i, j] + bias[f]`` for the 6x6 block ``M`` at
    ``m[:, f, (ti*tw + tj)*N + n]``, for filters ``f0 <= f < f1``; outputs past ``y``'s edge
    are dropped."""
    c2, c4, c8 = k[0], k[1], k[3]
    n_img, n_f, oh, ow = y.shape
    run = tw * n_img
    s = np.empty((6, 4, run), m.dtype)  # A^T along the rows of each block
    o = np.empty((4, 4, run), m.dtype)  # o[i, j, tj*N + n]: the 4x4 output blocks of a tile row
    ys = y.reshape(n_img, n_f * oh * ow)
    for f in range(f0, f1):
        bf = bias[f]
        for ti in range(th):
            c0 = ti * run
            c1 = c0 + run
            for k1 in range(6):
                r = 6 * k1
                m0, m1, m2 = m[r, f, c0:c1], m[r + 1, f, c0:c1], m[r + 2, f, c0:c1]
                m3, m4, m5 = m[r + 3, f, c0:c1], m[r + 4, f, c0:c1], m[r + 5, f, c0:c1]
                s0, s1, s2, s3 = s[k1, 0], s[k1, 1], s[k1, 2], s[k1, 3]
                for q in range(run):
                    e1, e2, e3, e4 = m1[q], m2[q], m3[q], m4[q]
                    a = e1 + e2
                    b = e1 - e2
                    cc = e3 + e4
                    d = e3 - e4
                    s0[q] = m0[q] + a + cc
                    s1[q] = b + c2 * d
                    s2[q] = a + c4 * cc
                    s3[q] = b + c8 * d + m5[q]
            for j in range(4):
                m0, m1, m2, m3, m4, m5 = s[0, j], s[1, j], s[2, j], s[3, j], s[4, j], s[5, j]
                o0, o1, o2, o3 = o[0, j], o[1, j], o[2, j], o[3, j]
                for q in range(run):
                    e1, e2, e3, e4 = m1[q], m2[q], m3[q], m4[q]
                    a = e1 + e2
                    b = e1 - e2
                    cc = e3 + e4
                    d = e3 - e4
                    o0[q] = m0[q] + a + cc + bf
                    o1[q] = b + c2 * d + bf
                    o2[q] = a + c4 * cc + bf
                    o3[q] = b + c8 * d + m5[q] + bf
            # interleave back, 8 images at a time (as _input_transform de-interleaves)
            rows = min(4, oh - 4 * ti)
            for n0 in range(0, n_img - 7, 8):
                y0, y1, y2, y3 = ys[n0], ys[n0 + 1], ys[n0 + 2], ys[n0 + 3]
                y4, y5, y6, y7 = ys[n0 + 4], ys[n0 + 5], ys[n0 + 6], ys[n0 + 7]
                for i in range(rows):
                    base = (f * oh + 4 * ti + i) * ow
                    for col in range(ow):
                        src = o[i, col & 3]
                        q = (col >> 2) * n_img + n0
                        p = base + col
                        y0[p] = src[q]
                        y1[p] = src[q + 1]
                        y2[p] = src[q + 2]
                        y3[p] = src[q + 3]
                        y4[p] = src[q + 4]
                        y5[p] = src[q + 5]
                        y6[p] = src[q + 6]
                        y7[p] = src[q + 7]
            for n in range(n_img - n_img % 8, n_img):
                yn = ys[n]
                for i in range(rows):
                    base = (f * oh + 4 * ti + i) * ow
                    for col in range(ow):
                        yn[base + col] = o[i, col & 3, (col >> 2) * n_img + n]


def _grad_transform(dy, th, tw, dm, k, f0, f1):
    """``dm[k1*6 + k2, f, (ti*tw + tj)*N + n] = (A dY A^T)[k1, k2]`` for the 4x4 block ``dY``
    of ``dy[n, f]`` at row ``4*ti``, column ``4*tj`` (zeros past its edge), for filters
    ``f0 <= f < f1``."""
    c2, c4, c8 = k[0], k[1], k[3]
    n_img, n_f, oh, ow = dy.shape
    run = tw * n_img
    ph = np.zeros((4, 4, run), dy.dtype)  # ph[i, j, tj*N + n] = dy[n, f, 4ti + i, 4tj + j]; the
    # entries past the right edge are never written and stay zero
    r6 = np.empty((6, 4, run), dy.dtype)  # A along the columns of each block
    ds = dy.reshape(n_img, n_f * oh * ow)
    for f in range(f0, f1):
        for ti in range(th):
            c0 = ti * run
            c1 = c0 + run
            rows = min(4, oh - 4 * ti)
            for i in range(rows, 4):
                ph[i] = 0
            for n0 in range(0, n_img - 7, 8):  # 8 images at a time, as in _input_transform
                d0, d1, d2, d3 = ds[n0], ds[n0 + 1], ds[n0 + 2], ds[n0 + 3]
                d4, d5, d6, d7 = ds[n0 + 4], ds[n0 + 5], ds[n0 + 6], ds[n0 + 7]
                for i in range(rows):
                    base = (f * oh + 4 * ti + i) * ow
                    for col in range(ow):
                        dst = ph[i, col & 3]
                        q = (col >> 2) * n_img + n0
                        p = base + col
                        dst[q] = d0[p]
                        dst[q + 1] = d1[p]
                        dst[q + 2] = d2[p]
                        dst[q + 3] = d3[p]
                        dst[q + 4] = d4[p]
                        dst[q + 5] = d5[p]
                        dst[q + 6] = d6[p]
                        dst[q + 7] = d7[p]
            for n in range(n_img - n_img % 8, n_img):
                dn = ds[n]
                for i in range(rows):
                    base = (f * oh + 4 * ti + i) * ow
                    for col in range(ow):
                        ph[i, col & 3, (col >> 2) * n_img + n] = dn[base + col]
            for j in range(4):
                y0, y1, y2, y3 = ph[0, j], ph[1, j], ph[2, j], ph[3, j]
                o0, o1, o2, o3, o4, o5 = r6[0, j], r6[1, j], r6[2, j], r6[3, j], r6[4, j], r6[5, j]
                for q in range(run):
                    e0, e1, e2, e3 = y0[q], y1[q], y2[q], y3[q]
                    a = e0 + e2
                    b = e1 + e3
                    cc = e0 + c4 * e2
                    d = c2 * e1 + c8 * e3
                    o0[q] = e0
                    o1[q] = a + b
                    o2[q] = a - b
                    o3[q] = cc + d
                    o4[q] = cc - d
                    o5[q] = e3
            for k1 in range(6):
                r = 6 * k1
                y0, y1, y2, y3 = r6[k1, 0], r6[k1, 1], r6[k1, 2], r6[k1, 3]
                o0, o1, o2 = dm[r, f, c0:c1], dm[r + 1, f, c0:c1], dm[r + 2, f, c0:c1]
                o3, o4, o5 = dm[r + 3, f, c0:c1], dm[r + 4, f, c0:c1], dm[r + 5, f, c0:c1]
                for q in range(run):
                    e0, e1, e2, e3 = y0[q], y1[q], y2[q], y3[q]
                    a = e0 + e2
                    b = e1 + e3
                    cc = e0 + c4 * e2
                    d = c2 * e1 + c8 * e3
                    o0[q] = e0
                    o1[q] = a + b
                    o2[q] = a - b
                    o3[q] = cc + d
                    o4[q] = cc - d
                    o5[q] = e3


_PY_KERNELS = {"input": _input_transform, "output": _output_transform, "grad": _grad_transform}


# --------------------------------------------------------------------------- compiling

_jit.register(**{f"winograd.{name}": fn for name, fn in _PY_KERNELS.items()})
available = _jit.available
status = _jit.status


def _run(name: str, *args) -> None:
    _jit.run(f"winograd.{name}", *args)


# --------------------------------------------------------------------------- the operations

def _tiles(out_hw: tuple[int, int]) -> tuple[int, int, int]:
    """Tile rows and columns of an output, and its tiles per image."""
    th, tw = -(-out_hw[0] // TILE), -(-out_hw[1] // TILE)
    return th, tw, th * tw


def _buffer(rows: int, length: int, dtype, reuse: str | None = None) -> np.ndarray:
    """A C-contiguous (36, rows, pitch) array; the first ``length`` entries of each row are
    used. The pitch avoids a multiple of 1 KiB (rows aliasing the same cache sets, as in
    :func:`convnet.core.row_buffer`, which gives the memory: ``reuse`` names scratch)."""
    dtype = np.dtype(dtype)
    pitch = length + (32 if (length * dtype.itemsize) % 1024 == 0 else 0)
    flat = core.row_buffer((SPAN * SPAN * rows, pitch), dtype, reuse=reuse)
    return flat.reshape(SPAN * SPAN, rows, pitch)


def filter_transform(weight: np.ndarray) -> np.ndarray:
    """``U = G g G^T`` of weights (F, C, 3, 3), as (36, F, C) in their dtype (computed in float64)."""
    f, c = weight.shape[:2]
    # One GEMM with G (x) G (einsum's path search cost about 0.3 ms a call: a small batch's layer)
    u = _GG @ weight.astype(np.float64, copy=False).reshape(f * c, 9).T
    return u.astype(weight.dtype).reshape(SPAN * SPAN, f, c)


def filter_gradient(du: np.ndarray) -> np.ndarray:
    """``dg = G^T dU G`` of dU (36, F, C): the weight gradient (F, C, 3, 3), dtype of ``du``."""
    f, c = du.shape[1:]
    dg = _GG.T @ du.astype(np.float64, copy=False).reshape(SPAN * SPAN, f * c)
    return np.ascontiguousarray(dg.T.reshape(f, c, 3, 3), dtype=du.dtype)


def _each(fn, ranges: list[tuple[int, int]]) -> list:
    """``fn(i0, i1)`` for every range: in this thread for one, else on the worker threads (the
    kernels release the GIL; BLAS runs single-threaded meanwhile, see :func:`_blas_threads`)."""
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    return list(_pool().map(lambda r: fn(*r), ranges))


def _gemms(a, b, out, ranges) -> None:
    """``out[i] = a[i] @ b[i]`` for the 36 frequencies, split by frequency over the threads
    (each product is one whole GEMM, so a sum over the columns does not depend on the thread
    count)."""
    def run(i0: int, i1: int) -> None:
        for i in range(i0, i1):
            _blas.gemm(a[i], b[i], out[i], beta=0.0)
    _each(run, ranges(SPAN * SPAN))


def _column_gemms(a, b, out, ranges) -> None:
    """``out[i] = a[i] @ b[i]`` for the 36 frequencies, split by column over the threads (each
    output column is computed alike whatever the split). With 2 threads on cifar's and vgg's
    layers this measured 56 and 70 ms fwd + bwd against 80 and 98 ms split by frequency (each
    thread then streams whole (C, N*tiles) operands)."""
    def run(c0: int, c1: int) -> None:
        for i in range(SPAN * SPAN):
            _blas.gemm(a[i], b[i, :, c0:c1], out[i, :, c0:c1], beta=0.0)
    _each(run, ranges(b.shape[2]))


def _transform(x: np.ndarray, pads_before: tuple[int, int], out_hw: tuple[int, int], v: np.ndarray,
               ranges) -> None:
    th, tw, _ = _tiles(out_hw)
    k = _constants(x.dtype)
    _each(lambda c0, c1: _run("input", x, pads_before[0], pads_before[1], th, tw, v, k, c0, c1),
          ranges(x.shape[1]))


def transform_input(x: np.ndarray, pads_before: tuple[int, int], out_hw: tuple[int, int],
                    reuse: str | None = None) -> np.ndarray:
    """Tile transform of NCHW ``x`` for an output of ``out_hw``: (36, C, pitch) whose first
    ``tiles*N`` columns are used, column ``tile*N + n`` for image ``n`` (tiles row by row).
    ``pads_before`` may be negative (the first rows are skipped); ``reuse`` names a scratch
    array (see :func:`convnet.core.row_buffer`)."""
    n, c = x.shape[:2]
    v = _buffer(c, n * _tiles(out_hw)[2], x.dtype, reuse)
    with _blas_threads() as ranges:
        _transform(np.ascontiguousarray(x), pads_before, out_hw, v, ranges)
    return v


def _forward(x: np.ndarray, weight: np.ndarray, bias, pads_before, v: np.ndarray, y: np.ndarray) -> None:
    """``y`` (N, F, OH, OW) from ``x`` and the filters, through the tiles ``v``: the threads
    split the input transform by channel, the GEMMs by column and the output transform by
    filter."""
    th, tw, t_img = _tiles(y.shape[2:])
    f = weight.shape[0]
    cols = y.shape[0] * t_img
    m = _buffer(f, cols, y.dtype, "wino.m")
    b = np.zeros(f, y.dtype) if bias is None else np.ascontiguousarray(bias, dtype=y.dtype)
    k = _constants(y.dtype)
    with _blas_threads() as ranges:
        u = filter_transform(weight)  # a small GEMM: faster on one BLAS thread
        _transform(x, pads_before, y.shape[2:], v, ranges)
        _column_gemms(u, v[:, :, :cols], m[:, :, :cols], ranges)
        _each(lambda f0, f1: _run("output", m, th, tw, b, y, k, f0, f1), ranges(f))


def workspace_per_image(out_hw: tuple[int, int], c_in: int, c_out: int) -> int:
    """Elements of the temporaries per image of one correlation: the tiles of its input and of
    its output (as the engine's plan counts workspace)."""
    return SPAN * SPAN * (c_in + c_out) * _tiles(out_hw)[2]


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, pads_before: tuple[int, int],
            out: np.ndarray, keep: bool = False) -> np.ndarray | None:
    """Stride-1 3x3 correlation of NCHW ``x`` into ``out``: ``out[n, f, i, j] = b[f] +
    sum x[n, c, i+u-pt, j+v-pl] w[f, c, u, v]``, with zeros outside ``x``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    weight : ndarray, shape (F, C, 3, 3)
    bias : ndarray, shape (F,), or None
    pads_before : (pt, pl), the padding on top and left (any integers)
    out : ndarray, shape (N, F, OH, OW), written
    keep : return the transformed input tiles, for :func:`weight_gradient`

    Returns
    -------
    The (36, C, pitch) tile transform of ``x`` with ``keep``, else None.
    """
    n, c = x.shape[:2]
    v = _buffer(c, n * _tiles(out.shape[2:])[2], x.dtype, None if keep else "wino.v")
    # The kernels are compiled for C-contiguous arrays (another layout would compile again).
    target = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
    _forward(np.ascontiguousarray(x), weight, bias, pads_before, v, target)
    if target is not out:
        out[...] = target
    return v if keep else None


def input_gradient(dy: np.ndarray, weight: np.ndarray, pads_before: tuple[int, int], out: np.ndarray) -> None:
    """The input gradient of :func:`forward` into ``out`` (N, C, H, W).

    ``dx[i] = sum_u dy[i + pt - u] w[u]``: the correlation of ``dy`` with the flipped,
    channel-swapped filters, whose top padding is ``2 - pt`` (the tutorial's route).
    """
    flipped = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    forward(dy, flipped, None, (2 - pads_before[0], 2 - pads_before[1]), out)


def weight_gradient(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, pads_before: tuple[int, int],
                    tiles: np.ndarray | None = None) -> np.ndarray:
    """The weight gradient of :func:`forward`, (F, C, 3, 3) in the dtype of ``dy``.

    ``tiles`` is the forward's kept tile transform of ``x`` (recomputed when None).
    """
    n, c = x.shape[:2]
    f = weight.shape[0]
    th, tw, t_img = _tiles(dy.shape[2:])
    cols = n * t_img
    dy = np.ascontiguousarray(dy)
    dm = _buffer(f, cols, dy.dtype, "wino.dm")
    du = np.empty((SPAN * SPAN, f, c), dtype=dy.dtype)
    k = _constants(dy.dtype)
    with _blas_threads() as ranges:
        if tiles is None:
            tiles = _buffer(c, cols, x.dtype, "wino.v")
            _transform(np.ascontiguousarray(x), pads_before, dy.shape[2:], tiles, ranges)
        _each(lambda f0, f1: _run("grad", dy, th, tw, dm, k, f0, f1), ranges(f))
        _gemms(dm[:, :, :cols], tiles[:, :, :cols].transpose(0, 2, 1), du, ranges)
        return filter_gradient(du)


# --------------------------------------------------------------------------- threads

class _Threads:
    lock = threading.Lock()
    pool = None  # ThreadPoolExecutor, made on first use


@contextlib.contextmanager
def _blas_threads():
    """Split the work over Python threads instead of inside BLAS: yields ``ranges(n)``, one
    range of ``range(n)`` (channels, filters, GEMM columns or frequencies) per thread numpy's BLAS may use
    (its count, which the BLAS thread policy may have set), while BLAS runs single-threaded.
    Every element is computed the same way whatever the split, so results do not depend on
    the thread count. Many mid-sized multithreaded
    GEMMs between single-threaded transforms measured far slower on 2 busy cores (the BLAS
    threads spin and wait for each other): cifar's 36 GEMMs 61 ms on one thread, 780 ms on two."""
    threads = max(1, _blas.get_num_threads() or 1)

    def ranges(n: int) -> list[tuple[int, int]]:
        parts = max(1, min(n, threads))
        return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]

    if threads == 1:
        yield ranges
        return
    _blas.set_num_threads(1)
    try:
        yield ranges
    finally:
        _blas.set_num_threads(threads)


def _pool():
    with _Threads.lock:
        if _Threads.pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _Threads.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                               thread_name_prefix="convnet-winograd")
        return _Threads.pool
