"""The im2col core: small pure functions on arrays.

Everything here works on *CNHW* arrays ``(C, N, H, W)``: channels first, then the batch.
Converting to and from the public NCHW layout swaps the two leading axes only, so every
copy moves whole ``H*W`` planes; and since a channel's planes of all images lie side by
side, each convolution pass is *one* matrix multiply over the whole batch.

Geometry, for one spatial axis with input length ``H``, kernel ``K``, stride ``S``,
dilation ``D`` and pads ``(P0, P1)``, is the floor rule of :func:`convnet._args.output_size`::

    OH = (H + P0 + P1 - D*(K-1) - 1) // S + 1

Column layout: ``im2col`` returns the C-contiguous ``(KH*KW*C, N*OH*OW)`` matrix with rows
ordered ``(kh, kw, c)`` and columns ``(n, oh, ow)``; a weight ``(F, C, KH, KW)`` matches it
as the *kernel matrix* ``weight.transpose(0, 2, 3, 1).reshape(F, KH*KW*C)`` (see
:func:`kernel_matrix`), so a correlation is ``kernel_matrix(w) @ im2col(x)``, a CNHW result
``(F, N*OH*OW)``.

Two algorithms compute that product. ``"im2col"`` builds the column matrix and calls one
GEMM. ``"taps"`` (stride 1 only) never builds it: flattened to ``(C, N*Hp*Wp)``, tap
``(i, j)`` of every window on the padded grid is the column block shifted by
``i*D*Wp + j*D``, so each of the ``KH*KW`` taps is one accumulating GEMM on a view.
It computes outputs on the whole padded grid (``Hp*Wp`` instead of ``OH*OW`` per image)
and keeps the valid corner of each image.

On small maps the plan may put the batch innermost instead, *CHWN* ``(C, H, W, N)``
(:func:`nchw_to_chwn`, :func:`im2col_chwn`, :func:`col2im_chwn`): the same rows, columns
ordered ``(oh, ow, n)``, so a stride-1 window row is one run of ``OW*N`` elements.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _args, _blas, _jit

Pair = tuple[int, int]
Pads = tuple[tuple[int, int], tuple[int, int]]

# Upper bound, in bytes, of a convolution's temporaries (its workspace); bigger batches are
# processed in chunks of images. The process-wide default; workspace_limit() overrides it per thread.
_WORKSPACE_LIMIT = 256 * 2**20
_LIMITS = threading.local()


class WorkspaceLimitError(MemoryError):
    """One image's convolution workspace is larger than the workspace limit (nothing was allocated)."""


def get_workspace_limit() -> int:
    """Return the workspace limit in bytes that applies in this thread (default 256 MiB)."""
    stack = getattr(_LIMITS, "stack", None)
    return stack[-1][0] if stack else _WORKSPACE_LIMIT


def _limit_bytes(nbytes: object) -> int:
    return _args.positive_int(nbytes, "nbytes")


def set_workspace_limit(nbytes: int) -> None:
    """Set the process-wide workspace limit: the most bytes a convolution's temporaries take.

    A batch whose workspace would exceed it is computed in chunks of images (results are
    identical up to rounding); a single image whose workspace exceeds it is refused with a
    ``MemoryError`` naming the limit, before anything is allocated. Threads inside
    :func:`workspace_limit` keep their own limit.
    """
    global _WORKSPACE_LIMIT
    _WORKSPACE_LIMIT = _limit_bytes(nbytes)


@contextlib.contextmanager
def workspace_limit(nbytes: int) -> Iterator[None]:
    """Context manager: the workspace limit is ``nbytes`` in this thread until the block ends.

    Per thread, so threads nesting it in any order never see each other's limits, and
    each block restores exactly what it replaced.
    """
    entry = [_limit_bytes(nbytes)]  # a fresh object: its block removes this entry, not another's
    if not hasattr(_LIMITS, "stack"):
        _LIMITS.stack = []
    _LIMITS.stack.append(entry)
    try:
        yield
    finally:
        stack = _LIMITS.stack
        del stack[next(i for i in range(len(stack) - 1, -1, -1) if stack[i] is entry)]


def row_buffer(shape: tuple[int, ...], dtype, fill: float | None = None,
               reuse: str | None = None) -> np.ndarray:
    """A new array whose first axis is a row of a matrix with a BLAS-friendly row stride.

    Every CNHW array here is also a matrix ``(shape[0], prod(shape[1:]))``. When that row
    length is a multiple of 1 KiB (``N*OH*OW = 65536``, say), the rows BLAS reads alias the
    same cache sets; padding the row stride by 32 elements measured 10-20% faster GEMMs.

    Parameters
    ----------
    shape : (rows, ...) the array's shape
    dtype : its dtype
    fill : value to fill the array with; None leaves it uninitialised
    reuse : a name for a *scratch* array: memory kept from the previous request under the
        same name (in this thread) is reused instead of fresh pages, whose first-touch
        faults measured 10-15% of a CIFAR-sized forward + backward. Only for temporaries
        that are dead before the caller returns; see :func:`release_scratch`.

    Returns
    -------
    ndarray view of ``shape``; the trailing axes are C-contiguous, axis 0 is strided.
    """
    length = int(math.prod(shape[1:]))  # math.prod, not np.prod: this runs ~10 times a training step
    dtype = np.dtype(dtype)
    stride = length + (32 if (length * dtype.itemsize) % 1024 == 0 else 0)
    if reuse is None:
        buf = np.empty((shape[0], stride), dtype=dtype)
    else:
        pool = _scratch_pool()
        key = (reuse, np.dtype(dtype))
        flat = pool.get(key)
        if flat is None or flat.size < shape[0] * stride:
            pool[key] = flat = np.empty(shape[0] * stride, dtype=dtype)
        buf = flat[:shape[0] * stride].reshape(shape[0], stride)
    view = buf[:, :length].reshape(shape)
    if fill is not None:
        view.fill(fill)
    return view


_SCRATCH = threading.local()


def _scratch_pool() -> dict:
    if not hasattr(_SCRATCH, "pool"):
        _SCRATCH.pool = {}
    return _SCRATCH.pool


def release_scratch() -> None:
    """Free the scratch arrays this thread keeps between convolution calls."""
    _scratch_pool().clear()


def scratch_bytes() -> int:
    """Bytes held by this thread's scratch arrays."""
    return sum(a.nbytes for a in _scratch_pool().values())


def as_matrix(a: np.ndarray) -> np.ndarray:
    """View of an array from :func:`row_buffer` (or any C-contiguous one) as ``(rows, length)``.

    Raises rather than copies, so writes through the view always reach ``a``.
    """
    return np.reshape(a, (a.shape[0], -1), copy=False)


def nchw_to_cnhw(x: np.ndarray, pads: Pads = ((0, 0), (0, 0)), reuse: str | None = None) -> np.ndarray:
    """Pad an NCHW array with zeros and return it as CNHW, in a single plane-wise copy.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    pads : ((top, bottom), (left, right)), non-negative
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    ndarray, shape (C, N, H + top + bottom, W + left + right), dtype of ``x``, from
    :func:`row_buffer`.
    """
    return _padded_copy(x, (1, 0, 2, 3), pads, reuse)


def _padded_copy(x: np.ndarray, order: tuple[int, ...], pads: Pads, reuse: str | None) -> np.ndarray:
    """``x`` (N, C, H, W) transposed by ``order`` into a :func:`row_buffer`, with its H and W
    axes zero-padded by ``pads``: only the border is zeroed, the interior is one copy."""
    (pt, pb), (pl, pr) = pads
    src = x.transpose(order)
    ha = order.index(2)  # where H lands; W follows it
    shape = list(src.shape)
    shape[ha] += pt + pb
    shape[ha + 1] += pl + pr
    out = row_buffer(tuple(shape), x.dtype, reuse=reuse)
    lead = (slice(None),) * ha
    hp, wp = shape[ha], shape[ha + 1]
    for border in (slice(0, pt), slice(hp - pb, hp)):
        out[lead + (border,)] = 0
    for border in (slice(0, pl), slice(wp - pr, wp)):
        out[lead + (slice(None), border)] = 0
    out[lead + (slice(pt, hp - pb), slice(pl, wp - pr))] = src
    return out


def cnhw_to_nchw(y: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None) -> None:
    """``out[...] = y`` with the two leading axes swapped, plus ``bias`` per channel (one pass).

    Parameters
    ----------
    y : ndarray, shape (F, N, OH, OW), any strides (a view into a padded grid is fine)
    out : ndarray, shape (N, F, OH, OW), written
    bias : ndarray, shape (F,), optional
    """
    src = y.transpose(1, 0, 2, 3)
    if bias is None:
        out[...] = src
    else:
        np.add(src, bias.reshape(1, -1, 1, 1), out=out)


def as_groups(m: np.ndarray, groups: int) -> np.ndarray:
    """View of a matrix ``(G*R, K)`` as the stack ``(G, R, K)`` of its row groups (never a copy)."""
    return np.reshape(m, (groups, m.shape[0] // groups, m.shape[1]), copy=False)


def stacked_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 0.0) -> None:
    """``c[g] = a[g] @ b[g] + beta * c[g]`` for every group ``g`` of stacks ``(G, ., .)``.

    One group is one BLAS call (:func:`convnet._blas.gemm`); more groups are one
    ``matmul`` over the group axis (grouped convolution: no Python loop over groups).
    """
    if a.shape[0] == 1:
        _blas.gemm(a[0], b[0], c[0], beta=beta)
    elif a.shape[2] == 1:
        # Outer products (a depthwise layer's W.T @ dy): one broadcast multiply measured 6x
        # faster than matmul's per-group calls.
        if beta == 0.0:
            np.multiply(a, b, out=c)
        else:
            c += a * b
    elif beta == 0.0:
        np.matmul(a, b, out=c)
    else:
        c += np.matmul(a, b)


def gemm_into_nchw(wm: np.ndarray, cols: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None,
                   blocks: int = 4, groups: int = 1, per_image: bool = False) -> None:
    """``out = wm @ cols`` laid out NCHW (plus ``bias``).

    ``blocks`` groups of images at a time: the GEMM yields CNHW rows into a temporary of
    ``1/blocks`` of the output, then transposed into place. With ``per_image`` (no groups),
    one GEMM per image writes its (F, OH*OW) block of ``out`` in place instead (numpy's
    matmul over the image axis): no temporary and no transpose, but smaller GEMMs.

    Parameters
    ----------
    wm : ndarray, shape (F, K), the kernel matrix
    cols : ndarray, shape (K, N*OH*OW), the column matrix
    out : ndarray, shape (N, F, OH, OW), C-contiguous, written
    bias : ndarray, shape (F,), optional
    blocks : number of image groups
    groups : channel groups of a grouped convolution: ``wm`` and ``cols`` rows split into
        ``groups`` equal blocks, multiplied block by block (see :func:`stacked_gemm`)
    per_image : one GEMM per image (ignored with groups, or an ``out`` that is not C-contiguous)
    """
    n, f, oh, ow = out.shape
    ohw = oh * ow
    if per_image and groups == 1 and out.flags.c_contiguous:
        np.matmul(wm, cols.reshape(cols.shape[0], n, ohw).transpose(1, 0, 2), out=out.reshape(n, f, ohw))
        if bias is not None:
            out += bias.reshape(1, -1, 1, 1)
        return
    step = -(-n // blocks)
    tmp = row_buffer((f, step, oh, ow), out.dtype, reuse="gemm_into_nchw")
    for i in range(0, n, step):
        nb = min(step, n - i)
        t = tmp[:, :nb]
        stacked_gemm(as_groups(wm, groups), as_groups(cols[:, i * ohw:(i + nb) * ohw], groups),
                     as_groups(as_matrix(t), groups))
        cnhw_to_nchw(t, out[i:i + nb], bias)


def window_view(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair) -> np.ndarray:
    """Read-only strided view of all windows of a padded CNHW array, taps first.

    Parameters
    ----------
    xp : ndarray, shape (C, N, Hp, Wp)
    kernel, stride, dilation : (h, w) pairs
    out_hw : (OH, OW), the number of window positions

    Returns
    -------
    ndarray view, shape (KH, KW, C, N, OH, OW); entry ``[u, v, c, n, i, j]`` is
    ``xp[c, n, i*SH + u*DH, j*SW + v*DW]``. No data is copied.
    """
    c, n = xp.shape[:2]
    sc, sn, sh, sw = xp.strides
    shape = (kernel[0], kernel[1], c, n, out_hw[0], out_hw[1])
    strides = (sh * dilation[0], sw * dilation[1], sc, sn, sh * stride[0], sw * stride[1])
    return as_strided(xp, shape=shape, strides=strides, writeable=False)


def im2col(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair,
           reuse: str | None = None, groups: int = 1) -> np.ndarray:
    """Unfold every window of a padded CNHW array into one column.

    Parameters
    ----------
    xp : ndarray, shape (C, N, Hp, Wp), already padded
    kernel, stride, dilation : (h, w) pairs
    out_hw : (OH, OW)
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    cols : ndarray, shape (KH*KW*C, N*OH*OW), dtype of ``xp``, rows ordered (kh, kw, c),
        columns (n, oh, ow); contiguous rows with a padded row stride (:func:`row_buffer`).
        Each tap copies whole strided planes. With ``groups`` G, rows are ordered
        (g, kh, kw, c within the group): G stacked column matrices of the channel groups.
    """
    c, n = xp.shape[:2]
    (oh, ow), (kh, kw) = out_hw, kernel
    cols = row_buffer((kh * kw * c, n, oh, ow), xp.dtype, reuse=reuse)
    windows = window_view(xp, kernel, stride, dilation, out_hw).reshape(kh, kw, groups, c // groups, n, oh, ow)
    np.copyto(cols.reshape(groups, kh, kw, c // groups, n, oh, ow), windows.transpose(2, 0, 1, 3, 4, 5, 6))
    return as_matrix(cols)


def _valid_outputs(size: int, pad_before: int, out_len: int, tap: int, s: int, d: int) -> tuple[int, int, int]:
    """Outputs ``[lo, hi)`` whose tap reads inside the unpadded input, and the first input index.

    Output ``o`` reads input ``o*S + tap*D - P``; the rest of the axis reads padding.
    """
    first = tap * d - pad_before
    lo = min(out_len, max(0, -(first // s)))  # ceil(-first / s), clipped
    hi = max(lo, min(out_len, (size - 1 - first) // s + 1))
    return lo, hi, lo * s + first


def im2col_nchw(x: np.ndarray, pads: Pads, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair,
                reuse: str | None = None, groups: int = 1) -> np.ndarray:
    """:func:`im2col` of the zero-padded CNHW input, read straight from unpadded NCHW ``x``.

    Skips the padded copy (a pass over the input and its memory): each tap copies the
    in-bounds part of its strided planes and zeroes the border that would read padding.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    pads : ((top, bottom), (left, right)), non-negative
    kernel, stride, dilation : (h, w) pairs
    out_hw : (OH, OW)
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    cols : ndarray, shape (KH*KW*C, N*OH*OW), equal to ``im2col(nchw_to_cnhw(x, pads), ...)``.
    """
    n, c, h, w = x.shape
    (oh, ow), (kh, kw) = out_hw, kernel
    cols = row_buffer((kh * kw * c, n, oh, ow), x.dtype, reuse=reuse)
    taps = cols.reshape(groups, kh, kw, c // groups, n, oh, ow)
    src = x.transpose(1, 0, 2, 3).reshape(groups, c // groups, n, h, w)
    for i in range(kh):
        r0, r1, hs = _valid_outputs(h, pads[0][0], oh, i, stride[0], dilation[0])
        for j in range(kw):
            c0, c1, ws = _valid_outputs(w, pads[1][0], ow, j, stride[1], dilation[1])
            dst = taps[:, i, j]
            dst[..., :r0, :] = 0
            dst[..., r1:, :] = 0
            dst[..., r0:r1, :c0] = 0
            dst[..., r0:r1, c1:] = 0
            if r1 > r0 and c1 > c0:
                dst[..., r0:r1, c0:c1] = src[..., hs:hs + (r1 - r0 - 1) * stride[0] + 1:stride[0],
                                             ws:ws + (c1 - c0 - 1) * stride[1] + 1:stride[1]]
    return as_matrix(cols)


def col2im(cols: np.ndarray, padded_shape: tuple[int, int, int, int], kernel: Pair, stride: Pair,
           dilation: Pair, out_hw: Pair, reuse: str | None = None, groups: int = 1) -> np.ndarray:
    """Adjoint of :func:`im2col`: add every column back onto the window it came from.

    Overlapping windows accumulate (``+=``), so this is the exact transpose of im2col.

    Parameters
    ----------
    cols : ndarray, shape (KH*KW*C, N*OH*OW)
    padded_shape : (C, N, Hp, Wp) of the padded array to rebuild
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.
    groups : rows ordered as :func:`im2col`'s with the same ``groups``

    Returns
    -------
    ndarray, shape ``padded_shape``, dtype of ``cols``.
    """
    c, n = padded_shape[:2]
    (oh, ow), (kh, kw) = out_hw, kernel
    blocks = cols.reshape(groups, kh, kw, c // groups, n, oh, ow)
    out = row_buffer(padded_shape, cols.dtype, fill=0.0, reuse=reuse)
    by_group = out.reshape((groups, c // groups) + tuple(padded_shape[1:]))
    for i in range(kh):
        for j in range(kw):
            strided_window(by_group, i * dilation[0], j * dilation[1], stride, out_hw)[...] += blocks[:, i, j]
    return out


def zero_insert(dy: np.ndarray, stride: Pair, pads: Pads | None = None, reuse: str | None = None) -> np.ndarray:
    """Expand maps for stride S: ``S-1`` zeros between entries of the last two axes, then pad.

    This is the tutorial's step that turns a strided layer's sensitivity map into the
    stride-1 map of the same layer. Negative pads crop.

    Parameters
    ----------
    dy : ndarray, shape (..., OH, OW), any strides (a transposed NCHW view gives CNHW)
    stride : (SH, SW)
    pads : ((top, bottom), (left, right)) applied after insertion; default none.
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    ndarray, shape (..., (OH-1)*SH + 1 + top + bottom, (OW-1)*SW + 1 + left + right), from
    :func:`row_buffer`.
    """
    oh, ow = dy.shape[-2:]
    (pt, pb), (pl, pr) = pads if pads is not None else ((0, 0), (0, 0))
    eh, ew = (oh - 1) * stride[0] + 1, (ow - 1) * stride[1] + 1
    out = row_buffer(dy.shape[:-2] + (eh + pt + pb, ew + pl + pr), dy.dtype, fill=0.0, reuse=reuse)
    rows = _strided_placement(oh, stride[0], pt, out.shape[-2])
    cols = _strided_placement(ow, stride[1], pl, out.shape[-1])
    out[..., rows[0], cols[0]] = dy[..., rows[1], cols[1]]
    return out


def _strided_placement(count: int, step: int, offset: int, length: int) -> tuple[slice, slice]:
    """Slices placing entries ``k`` (k < count) at ``offset + k*step`` inside ``[0, length)``."""
    first = 0 if offset >= 0 else (-offset + step - 1) // step
    last = min(count - 1, (length - 1 - offset) // step) if length - 1 - offset >= 0 else -1
    if last < first:
        return slice(0, 0), slice(0, 0)
    dst = slice(offset + first * step, offset + last * step + 1, step)
    return dst, slice(first, last + 1)


def pad2d(x: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    """Pad the last two axes of ``x`` with ``value``; returns ``x`` itself when pads are zero.

    Parameters
    ----------
    x : ndarray, shape (..., H, W)
    pads : ((top, bottom), (left, right)), non-negative

    Returns
    -------
    ndarray, shape (..., H + top + bottom, W + left + right), dtype of ``x``.
    """
    (pt, pb), (pl, pr) = pads
    if pt == pb == pl == pr == 0:
        return x
    h, w = x.shape[-2:]
    out = np.full(x.shape[:-2] + (h + pt + pb, w + pl + pr), value, dtype=x.dtype)
    out[..., pt:pt + h, pl:pl + w] = x
    return out


def strided_window(xp: np.ndarray, i: int, j: int, stride: Pair, out_hw: Pair) -> np.ndarray:
    """View of the kernel tap ``(i, j)`` across every window: ``xp[..., i::SH, j::SW]`` cut to (OH, OW).

    Pooling and col2im work tap by tap over these views, so no window array is ever built.
    """
    return xp[..., i:i + stride[0] * (out_hw[0] - 1) + 1:stride[0], j:j + stride[1] * (out_hw[1] - 1) + 1:stride[1]]


def kernel_matrix(weight: np.ndarray) -> np.ndarray:
    """Weights ``(F, C, KH, KW)`` as the ``(F, KH*KW*C)`` matrix matching im2col's rows."""
    f, c, kh, kw = weight.shape
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(f, kh * kw * c)


def flipped_kernel_matrix(weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """The 180-degree-flipped, channel-swapped filters of the input gradient, as a kernel matrix.

    ``W'[c, f, u, v] = W[f, c, KH-1-u, KW-1-v]``; returns ``kernel_matrix(W')``, shape
    ``(C, KH*KW*F)``. With ``groups`` G (``weight`` of shape (F, C/G, KH, KW)), the swap
    stays inside each group: ``W'`` is (C, F/G, KH, KW) and the result (C, KH*KW*F/G).
    """
    f, cg, kh, kw = weight.shape
    flipped = weight[:, :, ::-1, ::-1].reshape(groups, f // groups, cg, kh, kw).transpose(0, 2, 1, 3, 4)
    return kernel_matrix(flipped.reshape(groups * cg, f // groups, kh, kw))


def tap_offsets(kernel: Pair, dilation: Pair, row_len: int) -> list[int]:
    """Offset of each kernel tap ``(i, j)`` in a flattened padded grid of width ``row_len``."""
    return [i * dilation[0] * row_len + j * dilation[1] for i in range(kernel[0]) for j in range(kernel[1])]


def correlate_taps(xp: np.ndarray, wm: np.ndarray, kernel: Pair, dilation: Pair, out_hw: Pair,
                   reuse: str | None = None) -> np.ndarray:
    """Stride-1 correlation by one accumulating GEMM per kernel tap (no im2col matrix).

    Parameters
    ----------
    xp : ndarray, shape (C, N, Hp, Wp), padded; axes 1-3 C-contiguous (a :func:`row_buffer`)
    wm : ndarray, shape (F, KH*KW*C), the kernel matrix
    kernel, dilation : (h, w)
    out_hw : (OH, OW) valid outputs, ``OH = Hp - D*(KH-1)``
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    ndarray view, shape (F, N, OH, OW), cut from the padded-grid result.
    """
    c, n, hp, wp = xp.shape
    f = wm.shape[0]
    flat = as_matrix(xp)
    offsets = tap_offsets(kernel, dilation, wp)
    m = flat.shape[1] - offsets[-1]  # grid points whose every tap stays inside the array
    grid = as_matrix(row_buffer((f, n, hp, wp), xp.dtype, reuse=reuse))
    for t, off in enumerate(offsets):
        # beta=0 on the first tap: BLAS then ignores the uninitialised grid.
        _blas.gemm(wm[:, t * c:(t + 1) * c], flat[:, off:off + m], grid[:, :m], beta=1.0 if t else 0.0)
    return grid.reshape(f, n, hp, wp)[:, :, :out_hw[0], :out_hw[1]]


def _phase_taps(k: int, s: int, d: int) -> list[tuple[int, int, int]]:
    """``(tap, phase, shift)`` of each tap along one axis: tap ``i`` lands at ``(o + shift)*S + phase``."""
    return [(i, (i * d) % s, (i * d) // s) for i in range(k)]


def transposed_taps(dy: np.ndarray, wm: np.ndarray, padded_hw: Pair, kernel: Pair, stride: Pair,
                    dilation: Pair, reuse: str | None = None) -> np.ndarray:
    """``col2im(wm.T @ dy)`` without the column matrix: one accumulating GEMM per kernel tap.

    Tap ``(i, j)`` adds ``W_ij.T @ dy`` to the padded input positions ``o*S + (i, j)*D``.
    Splitting those positions by phase ``(o*S + i*D) mod S`` makes each phase a stride-1
    grid that reads ``dy`` shifted by ``(i*D) // S``: with ``dy`` zero-padded in front by the
    largest shift, each tap is one GEMM reading a shifted column block of the flattened
    grid (as in :func:`correlate_taps`). The same products as col2im's GEMM on a grid
    slightly larger than ``OH*OW``, with no ``(KH*KW*C, N*OH*OW)`` matrix and no scatter.

    Parameters
    ----------
    dy : ndarray, shape (F, N, OH, OW)
    wm : ndarray, shape (F, KH*KW*C), the kernel matrix
    padded_hw : (Hp, Wp) of the padded input
    kernel, stride, dilation : (h, w)
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    ndarray, shape (C, N, Hp, Wp), dtype of ``dy``.
    """
    f, n, oh, ow = dy.shape
    (kh, kw), (sh, sw) = kernel, stride
    c = wm.shape[1] // (kh * kw)
    rows, cols = _phase_taps(kh, sh, dilation[0]), _phase_taps(kw, sw, dilation[1])
    qh, qw = max(q for _, _, q in rows), max(q for _, _, q in cols)
    # Phase grids hold ceil(Hp/S) rows of outputs; dy sits below qh leading zero rows.
    hg, wg = -(-padded_hw[0] // sh), -(-padded_hw[1] // sw)
    hz, wz = max(hg, oh) + qh, max(wg, ow) + qw
    names = (None, None, None) if reuse is None else (reuse + ".dy", reuse + ".out", reuse + ".acc")
    grid = row_buffer((f, n, hz, wz), dy.dtype, fill=0.0, reuse=names[0])
    grid[:, :, qh:qh + oh, qw:qw + ow] = dy
    flat = as_matrix(grid)
    w_taps = np.ascontiguousarray(wm.reshape(f, kh * kw, c).transpose(1, 2, 0))  # (taps, C, F)
    out = row_buffer((c, n) + tuple(padded_hw), dy.dtype, fill=0.0, reuse=names[1])
    acc = as_matrix(row_buffer((c, n, hz, wz), dy.dtype, reuse=names[2]))
    m = flat.shape[1] - (qh * wz + qw)  # grid points whose every read stays inside the array
    for a in sorted({p for _, p, _ in rows}):
        for b in sorted({p for _, p, _ in cols}):
            taps = [(i * kw + j, (qh - qi) * wz + (qw - qj))
                    for i, pa, qi in rows if pa == a for j, pb, qj in cols if pb == b]
            for k, (t, off) in enumerate(taps):
                # beta=0 on the phase's first tap: BLAS then ignores acc's old contents.
                _blas.gemm(w_taps[t], flat[:, off:off + m], acc[:, :m], beta=1.0 if k else 0.0)
            dst = out[:, :, a::sh, b::sw]
            dst[...] = acc.reshape(c, n, hz, wz)[:, :, :dst.shape[2], :dst.shape[3]]
    return out


# --------------------------------------------------------------------------- the CHWN layout
# Small maps (LeNet's second layer: 10x10 outputs) make every CNHW window copy a run of OW
# elements, so im2col and col2im pay numpy's per-run cost on 10-element runs. With the batch
# innermost, (C, H, W, N), a stride-1 window row is one run of OW*N elements. The column
# matrix then has columns ordered (oh, ow, n); the GEMMs are the same.

def nchw_to_chwn(x: np.ndarray, pads: Pads = ((0, 0), (0, 0)), reuse: str | None = None) -> np.ndarray:
    """:func:`nchw_to_cnhw` with the batch innermost: returns (C, H + top + bottom, W + left +
    right, N), from :func:`row_buffer`."""
    return _padded_copy(x, (1, 2, 3, 0), pads, reuse)


def _chwn_windows(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair,
                  writeable: bool = False) -> np.ndarray:
    """View (KH, KW, C, OH, OW, N) of a CHWN array: ``[u, v, c, i, j, n]`` is
    ``xp[c, i*SH + u*DH, j*SW + v*DW, n]``. No data is copied."""
    sc, sh, sw, sn = xp.strides
    shape = (kernel[0], kernel[1], xp.shape[0], out_hw[0], out_hw[1], xp.shape[3])
    strides = (sh * dilation[0], sw * dilation[1], sc, sh * stride[0], sw * stride[1], sn)
    return as_strided(xp, shape=shape, strides=strides, writeable=writeable)


def im2col_chwn(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair,
                reuse: str | None = None) -> np.ndarray:
    """:func:`im2col` of a padded CHWN array ``xp`` (C, Hp, Wp, N), from :func:`nchw_to_chwn`
    (the other arguments as there): the (KH*KW*C, OH*OW*N) column matrix, rows ordered (kh,
    kw, c) as :func:`im2col`'s, columns (oh, ow, n)."""
    kh, kw = kernel
    cols = row_buffer((kh * kw * xp.shape[0],) + tuple(out_hw) + (xp.shape[3],), xp.dtype, reuse=reuse)
    # At stride 1 numpy merges (ow, n) into one run of OW*N elements per window row.
    np.copyto(cols.reshape((kh, kw, xp.shape[0]) + cols.shape[1:]),
              _chwn_windows(xp, kernel, stride, dilation, out_hw))
    return as_matrix(cols)


def col2im_chwn(cols: np.ndarray, padded_shape: tuple[int, int, int, int], kernel: Pair, stride: Pair,
                dilation: Pair, out_hw: Pair, reuse: str | None = None) -> np.ndarray:
    """Adjoint of :func:`im2col_chwn`: add every column back onto its window (CHWN).

    Compiled where numba is installed (:mod:`convnet._jit`, after its warm-up calls), numpy
    otherwise: the same additions in the same order, so the same bits.

    Parameters
    ----------
    cols : ndarray, shape (KH*KW*C, OH*OW*N), columns ordered (oh, ow, n)
    padded_shape : (C, Hp, Wp, N) of the padded array to rebuild
    reuse : str, optional
        Scratch name for the result's memory (see :func:`row_buffer`); default fresh.

    Returns
    -------
    ndarray, shape ``padded_shape``, dtype of ``cols``.
    """
    (kh, kw), (oh, ow) = kernel, out_hw
    c, n = padded_shape[0], padded_shape[3]
    out = row_buffer(padded_shape, cols.dtype, fill=0.0, reuse=reuse)
    rows = _whole_rows(cols) if _jit.ready() else None
    out_rows = _whole_rows(as_matrix(out), writeable=True) if rows is not None else None
    if out_rows is not None:
        _jit.run("core.col2im_chwn", rows, out_rows, padded_shape[1:], kernel, out_hw, stride, dilation)
    else:
        _col2im_chwn_numpy(cols.reshape(kh, kw, c, oh, ow, n), out, stride, dilation)
    return out


def _whole_rows(m: np.ndarray, writeable: bool = False) -> np.ndarray | None:
    """A matrix whose rows are contiguous, with the gaps between them included: the
    C-contiguous (rows, row stride) view of the memory it spans (a :func:`row_buffer`'s
    padded rows), so that a compiled loop sees unit strides (numba's loops over arrays of
    unknown strides measured 3x slower); None if that memory is not all in the array's buffer."""
    item = m.itemsize
    if m.ndim != 2 or m.strides[1] != item or m.strides[0] % item or m.strides[0] < m.shape[1] * item:
        return None
    if not m.flags.c_contiguous:
        owner = m.base if isinstance(m.base, np.ndarray) else None
        if owner is None or not owner.flags.c_contiguous:
            return None
        start = m.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
        if start < 0 or start + m.shape[0] * m.strides[0] > owner.nbytes:
            return None
    # Always a fresh view with the asked writeability: one array type, one compiled kernel per dtype.
    return as_strided(m, shape=(m.shape[0], m.strides[0] // item), strides=m.strides, writeable=writeable)


def _col2im_chwn_numpy(blocks: np.ndarray, out: np.ndarray, stride: Pair, dilation: Pair) -> None:
    """``out += col2im(blocks)`` for blocks (KH, KW, C, OH, OW, N), tap by tap."""
    kh, kw = blocks.shape[:2]
    windows = _chwn_windows(out, (kh, kw), stride, dilation, blocks.shape[3:5], writeable=True)
    for i in range(kh):
        for j in range(kw):
            windows[i, j] += blocks[i, j]  # taps overlap each other, so one at a time


def _col2im_chwn_kernel(rows, out_rows, padded_hwn, kernel, out_hw, stride, dilation):  # compiled (convnet._jit)
    """:func:`_col2im_chwn_numpy` output row by output row, on whole rows (:func:`_whole_rows`)
    of the column matrix, (KH*KW*C, >= OH*OW*N), and of the result, (C, >= Hp*Wp*N). Each
    element still receives its taps in the order (kh, kw), but the row being summed stays in
    the L1 cache and the batch-long inner loop vectorizes: 3-4.4x faster (LeNet's second
    conv, 1 thread: 0.86 -> 0.19 ms at N=64, C=6; 1.0 -> 0.33 ms at N=32, C=16)."""
    hp, wp, n = padded_hwn
    (kh, kw), (oh, ow), (sh, sw), (dh, dw) = kernel, out_hw, stride, dilation
    c = out_rows.shape[0]
    for ci in range(c):
        dst_plane = out_rows[ci]
        for h in range(hp):
            for u in range(kh):
                r = h - u * dh
                if r < 0 or r % sh != 0 or r // sh >= oh:
                    continue
                i = r // sh
                for v in range(kw):
                    src_row = rows[(u * kw + v) * c + ci]
                    for j in range(ow):
                        at = (h * wp + j * sw + v * dw) * n
                        dst = dst_plane[at:at + n]
                        src = src_row[(i * ow + j) * n:(i * ow + j + 1) * n]
                        for m in range(n):
                            dst[m] += src[m]


_jit.register(**{"core.col2im_chwn": _col2im_chwn_kernel})


def gemm_chwn_into_nchw(wm: np.ndarray, cols: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None,
                        reuse: str | None = None) -> None:
    """``out = wm @ cols`` (plus ``bias``) for a CHWN column matrix, written NCHW.

    Parameters
    ----------
    wm : ndarray, shape (F, K), the kernel matrix
    cols : ndarray, shape (K, OH*OW*N), from :func:`im2col_chwn`
    out : ndarray, shape (N, F, OH, OW), written
    bias : ndarray, shape (F,), optional
    reuse : str, optional
        Scratch name of the (F, OH, OW, N) product; default fresh.
    """
    n, f, oh, ow = out.shape
    y = row_buffer((f, oh, ow, n), out.dtype, reuse=reuse)
    _blas.gemm(wm, cols, as_matrix(y), beta=0.0)
    src = y.transpose(3, 0, 1, 2)
    if bias is None:
        out[...] = src
    else:
        np.add(src, bias.reshape(1, -1, 1, 1), out=out)
