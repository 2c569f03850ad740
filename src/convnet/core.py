"""The im2col core: small pure functions on arrays.

Everything here works on *channels-last* arrays ``(N, H, W, C)``: im2col then copies
whole contiguous channel rows, and the resulting matrix multiplies need no extra
transposes. The public API (``convnet.functional``) speaks NCHW and converts once,
fused with the padding copy.

Geometry, for one spatial axis with input length ``H``, kernel ``K``, stride ``S``,
dilation ``D`` and pads ``(P0, P1)``::

    OH = (H + P0 + P1 - D*(K-1) - 1) // S + 1          (the floor rule)

Column layout: ``im2col`` returns ``(N*OH*OW, KH*KW*C)`` with columns ordered
``(kh, kw, c)``; a weight ``(F, C, KH, KW)`` matches it as the *kernel matrix*
``weight.transpose(2, 3, 1, 0).reshape(KH*KW*C, F)`` (see :func:`kernel_matrix`), so a
correlation is ``im2col(x) @ kernel_matrix(w)``.

Two algorithms compute that product. ``"im2col"`` builds the column matrix and calls one
GEMM. ``"taps"`` (stride 1 only) never builds it: flattened to rows of C values, tap
``(i, j)`` of every window on the padded grid is a contiguous block of rows shifted by
``i*D*Wp + j*D``, so each of the ``KH*KW`` taps is one accumulating GEMM on a view.
It computes outputs on the whole padded grid (``Hp*Wp`` instead of ``OH*OW`` per image)
and keeps the valid corner; it wins when C is large enough to feed the GEMMs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _blas

Pair = tuple[int, int]
Pads = tuple[tuple[int, int], tuple[int, int]]

# Upper bound, in bytes, for one im2col buffer; bigger batches are processed in chunks.
_WORKSPACE_LIMIT = 256 * 2**20


def get_workspace_limit() -> int:
    """Return the im2col workspace limit in bytes (default 256 MiB)."""
    return _WORKSPACE_LIMIT


def set_workspace_limit(nbytes: int) -> None:
    """Set the largest im2col buffer (bytes) built at once.

    Convolutions whose im2col matrix would exceed the limit work through the batch
    in chunks of images; results are identical, memory stays bounded.
    """
    global _WORKSPACE_LIMIT
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 1:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    _WORKSPACE_LIMIT = int(nbytes)


@contextlib.contextmanager
def workspace_limit(nbytes: int) -> Iterator[None]:
    """Context manager that sets the workspace limit temporarily."""
    old = _WORKSPACE_LIMIT
    set_workspace_limit(nbytes)
    try:
        yield
    finally:
        set_workspace_limit(old)


def output_size(size: int, k: int, s: int, pads: tuple[int, int], d: int = 1) -> int:
    """Floor-rule output length of one spatial axis (see module docstring)."""
    return (size + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def chunks(n: int, per_item_bytes: int) -> list[slice]:
    """Split ``range(n)`` into slices whose buffers stay under the workspace limit."""
    step = max(1, min(n, _WORKSPACE_LIMIT // max(per_item_bytes, 1)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _axis_slices(src_len: int, pads: tuple[int, int]) -> tuple[slice, slice]:
    """Destination and source slices that place a length-``src_len`` axis after padding.

    Negative pads crop instead of pad, which the stride-expanded sensitivity map needs
    when ``P > D*(K-1)``.
    """
    lo, hi = pads
    dst = slice(max(lo, 0), max(lo, 0) + src_len - max(-lo, 0) - max(-hi, 0))
    src = slice(max(-lo, 0), src_len - max(-hi, 0))
    return dst, src


def pad_nchw_to_nhwc(x: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    """Pad an NCHW array and return it channels-last, in a single copy.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    pads : ((top, bottom), (left, right)); negative values crop.
    value : fill value for the border (``-inf`` for max pooling).

    Returns
    -------
    ndarray, shape (N, H + top + bottom, W + left + right, C), dtype of ``x``.
    """
    n, c, h, w = x.shape
    (pt, pb), (pl, pr) = pads
    out = np.empty((n, h + pt + pb, w + pl + pr, c), dtype=x.dtype)
    # Fill only what the copy below will not overwrite: the borders.
    _fill_border(out, pads, value)
    (dh, sh), (dw, sw) = _axis_slices(h, (pt, pb)), _axis_slices(w, (pl, pr))
    assign_channels_last(out[:, dh, dw, :], x[:, :, sh, sw].transpose(0, 2, 3, 1))
    return out


def assign_channels_last(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for (N, H, W, C) arrays, where ``src`` may be a view of NCHW data.

    Gathering channels that lie a power-of-two plane apart (32x32 maps, say) hits the
    same cache sets on every read; copying 8 channels at a time measured 2-3x faster there.
    """
    c = src.shape[3]
    if c > 8 and src.strides[3] > src.strides[2] and src.strides[3] % 2048 == 0:
        for i in range(0, c, 8):
            dst[..., i:i + 8] = src[..., i:i + 8]
    else:
        dst[...] = src


def _fill_border(out: np.ndarray, pads: Pads, value: float) -> None:
    (pt, pb), (pl, pr) = (max(p, 0) for p in pads[0]), (max(p, 0) for p in pads[1])
    hp, wp = out.shape[1], out.shape[2]
    out[:, :pt] = value
    out[:, hp - pb:] = value
    out[:, :, :pl] = value
    out[:, :, wp - pr:] = value


def window_view(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair) -> np.ndarray:
    """Read-only strided view of all windows of a padded channels-last array.

    Parameters
    ----------
    xp : ndarray, shape (N, Hp, Wp, C)
    kernel, stride, dilation : (h, w) pairs
    out_hw : (OH, OW), the number of window positions

    Returns
    -------
    ndarray view, shape (N, OH, OW, KH, KW, C); no data is copied.
    """
    n, _, _, c = xp.shape
    sn, sh, sw, sc = xp.strides
    shape = (n, out_hw[0], out_hw[1], kernel[0], kernel[1], c)
    strides = (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc)
    return as_strided(xp, shape=shape, strides=strides, writeable=False)


# Below this many channels im2col copies tap by tap into a (KH*KW*C, N*OH*OW) buffer:
# a window row of C values is then too short for the row-wise copy (measured 4x faster
# for C=1), and BLAS takes the transposed matrix as it is.
SMALL_CHANNELS = 8


def im2col(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair) -> np.ndarray:
    """Unfold every window of a padded channels-last array into one row.

    Parameters
    ----------
    xp : ndarray, shape (N, Hp, Wp, C), already padded
    kernel, stride, dilation : (h, w) pairs
    out_hw : (OH, OW)

    Returns
    -------
    cols : ndarray, shape (N*OH*OW, KH*KW*C), columns ordered (kh, kw, c), dtype of ``xp``.
        C-contiguous, or for fewer than ``SMALL_CHANNELS`` channels the transpose of a
        C-contiguous ``(KH*KW*C, N*OH*OW)`` array; both go to BLAS without a copy.
    """
    n, c = xp.shape[0], xp.shape[3]
    (oh, ow), (kh, kw) = out_hw, kernel
    if c < SMALL_CHANNELS:
        buf = np.empty((kh, kw, c, n, oh, ow), dtype=xp.dtype)
        for i in range(kh):
            for j in range(kw):
                tap = strided_window(xp.transpose(0, 3, 1, 2), i * dilation[0], j * dilation[1], stride, out_hw)
                buf[i, j] = tap.transpose(1, 0, 2, 3)
        return buf.reshape(kh * kw * c, n * oh * ow).T
    cols = np.empty((n, oh, ow, kh, kw, c), dtype=xp.dtype)
    np.copyto(cols, window_view(xp, kernel, stride, dilation, out_hw))
    return cols.reshape(n * oh * ow, kh * kw * c)


def col2im(cols: np.ndarray, padded_shape: tuple[int, int, int, int], kernel: Pair, stride: Pair,
           dilation: Pair, out_hw: Pair) -> np.ndarray:
    """Adjoint of :func:`im2col`: add every row back onto the window it came from.

    Overlapping windows accumulate (``+=``), so this is the exact transpose of im2col.

    Parameters
    ----------
    cols : ndarray, shape (N*OH*OW, KH*KW*C), C-contiguous or a transposed C-contiguous array
    padded_shape : (N, Hp, Wp, C) of the padded array to rebuild

    Returns
    -------
    ndarray, shape ``padded_shape``, dtype of ``cols``.
    """
    n, hp, wp, c = padded_shape
    oh, ow = out_hw
    kh_, kw_ = kernel
    if cols.flags.c_contiguous:
        blocks = cols.reshape(n, oh, ow, kh_, kw_, c).transpose(3, 4, 0, 1, 2, 5)
    else:  # the transposed layout im2col uses for few channels
        blocks = np.ascontiguousarray(cols.T).reshape(kh_, kw_, c, n, oh, ow).transpose(0, 1, 3, 4, 5, 2)
    out = np.zeros(padded_shape, dtype=cols.dtype)
    for i in range(kh_):
        for j in range(kw_):
            # blocks[i, j] is (N, OH, OW, C): tap (i, j) of every window.
            strided_window(out.transpose(0, 3, 1, 2), i * dilation[0], j * dilation[1], stride,
                           out_hw).transpose(0, 2, 3, 1)[...] += blocks[i, j]
    return out


def zero_insert(dy: np.ndarray, stride: Pair, pads: Pads | None = None) -> np.ndarray:
    """Expand a channels-last map for stride S: ``S-1`` zeros between entries, then pad.

    This is the tutorial's step that turns a strided layer's sensitivity map into the
    stride-1 map of the same layer. Negative pads crop.

    Parameters
    ----------
    dy : ndarray, shape (N, OH, OW, F)
    stride : (SH, SW)
    pads : ((top, bottom), (left, right)) applied after insertion; default none.

    Returns
    -------
    ndarray, shape (N, (OH-1)*SH + 1 + top + bottom, (OW-1)*SW + 1 + left + right, F).
    """
    n, oh, ow, f = dy.shape
    (pt, pb), (pl, pr) = pads if pads is not None else ((0, 0), (0, 0))
    eh, ew = (oh - 1) * stride[0] + 1, (ow - 1) * stride[1] + 1
    out = np.zeros((n, eh + pt + pb, ew + pl + pr, f), dtype=dy.dtype)
    rows = _strided_placement(oh, stride[0], pt, out.shape[1])
    cols = _strided_placement(ow, stride[1], pl, out.shape[2])
    assign_channels_last(out[:, rows[0], cols[0], :], dy[:, rows[1], cols[1], :])
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

    Pooling works tap by tap over these views, so no window array is ever built.
    """
    return xp[..., i:i + stride[0] * (out_hw[0] - 1) + 1:stride[0], j:j + stride[1] * (out_hw[1] - 1) + 1:stride[1]]


def kernel_matrix(weight: np.ndarray) -> np.ndarray:
    """Weights ``(F, C, KH, KW)`` as the ``(KH*KW*C, F)`` matrix matching im2col's columns."""
    f, c, kh, kw = weight.shape
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(kh * kw * c, f)


def flipped_kernel_matrix(weight: np.ndarray) -> np.ndarray:
    """The 180-degree-flipped, channel-swapped filters of the input gradient, as a kernel matrix.

    ``W'[c, f, u, v] = W[f, c, KH-1-u, KW-1-v]``; returns shape ``(KH*KW*F, C)``.
    """
    f, c, kh, kw = weight.shape
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)).reshape(kh * kw * f, c)


def tap_offsets(kernel: Pair, dilation: Pair, row_len: int) -> list[int]:
    """Row offset of each kernel tap ``(i, j)`` in a flattened padded grid of width ``row_len``."""
    return [i * dilation[0] * row_len + j * dilation[1] for i in range(kernel[0]) for j in range(kernel[1])]


def correlate_taps(xp: np.ndarray, wk: np.ndarray, kernel: Pair, dilation: Pair, out_hw: Pair) -> np.ndarray:
    """Stride-1 correlation by one accumulating GEMM per kernel tap (no im2col matrix).

    Parameters
    ----------
    xp : ndarray, shape (N, Hp, Wp, C), padded, C-contiguous
    wk : ndarray, shape (KH*KW*C, F), the kernel matrix
    kernel, dilation : (h, w)
    out_hw : (OH, OW) valid outputs, ``OH = Hp - D*(KH-1)``

    Returns
    -------
    ndarray view, shape (N, OH, OW, F), cut from the padded-grid result.
    """
    n, hp, wp, c = xp.shape
    f = wk.shape[1]
    flat = xp.reshape(-1, c)
    offsets = tap_offsets(kernel, dilation, wp)
    m = flat.shape[0] - offsets[-1]  # grid rows whose every tap stays inside the array
    grid = np.empty((flat.shape[0], f), dtype=xp.dtype)
    taps = wk.reshape(len(offsets), c, f)
    for t, off in enumerate(offsets):
        # beta=0 on the first tap: BLAS then ignores the uninitialised grid.
        _blas.gemm(flat[off:off + m], taps[t], grid[:m], beta=1.0 if t else 0.0)
    return grid.reshape(n, hp, wp, f)[:, :out_hw[0], :out_hw[1], :]


# Per-image GEMMs read and write NCHW in place but pay a call each; below this many
# multiply-adds per image one batched GEMM plus a transpose measured faster (LeNet sizes).
PER_IMAGE_GEMM_MIN = 2_000_000


def gemm_into_nchw(cols: np.ndarray, wk: np.ndarray, out: np.ndarray) -> None:
    """``out[n] += (cols_n @ wk).T`` for each image: the forward GEMM written into NCHW.

    For large images one GEMM per image, ``(F, K) @ (K, OH*OW)``, lands in ``out[n]`` with
    no layout copy; for small ones a single batched GEMM and a transpose are cheaper.

    Parameters
    ----------
    cols : ndarray, shape (N*OH*OW, K), from :func:`im2col`
    wk : ndarray, shape (K, F)
    out : ndarray, shape (N, F, OH, OW), C-contiguous; accumulated into (prefill it with the bias).
    """
    n, f, oh, ow = out.shape
    ohw = oh * ow
    if ohw * wk.shape[0] * f < PER_IMAGE_GEMM_MIN:
        out += (cols @ wk).reshape(n, oh, ow, f).transpose(0, 3, 1, 2)
        return
    for i in range(n):
        _blas.gemm(wk.T, cols[i * ohw:(i + 1) * ohw].T, out[i].reshape(f, ohw), beta=1.0)


def kernel_grad_nchw(cols: np.ndarray, dy: np.ndarray, out: np.ndarray) -> None:
    """``out += sum_n cols_n.T @ dy_n.T``: the filter gradient read straight from NCHW ``dy``.

    Parameters
    ----------
    cols : ndarray, shape (N*OH*OW, K)
    dy : ndarray, shape (N, F, OH, OW)
    out : ndarray, shape (K, F), accumulated into
    """
    n, f = dy.shape[:2]
    ohw = dy.shape[2] * dy.shape[3]
    if ohw * out.shape[0] * f < PER_IMAGE_GEMM_MIN:
        dy2 = np.empty((n,) + dy.shape[2:] + (f,), dtype=dy.dtype)
        assign_channels_last(dy2, dy.transpose(0, 2, 3, 1))
        out += cols.T @ dy2.reshape(-1, f)
        return
    for i in range(n):
        _blas.gemm(cols[i * ohw:(i + 1) * ohw].T, dy[i].reshape(f, ohw).T, out, beta=1.0)
