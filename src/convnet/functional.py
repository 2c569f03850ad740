"""Pure forward/backward functions, vectorized on the im2col core.

All image arrays are NCHW, conv weights ``(F, C, KH, KW)`` and linear weights
``(out, in)``, as in PyTorch. Every function accepts float32 or float64 and returns
the same dtype (mixing them is a ``TypeError``), never modifies its inputs, and
validates its arguments before doing any work.

Output size follows the floor rule ``(H + 2P - D*(K-1) - 1) // S + 1``; rows and
columns that no window reaches get zero gradient.
"""

from __future__ import annotations

import sys
from typing import Literal, NamedTuple

import numpy as np

from . import _args, _conv, core
from ._args import IntOrPair, Padding
from ._conv import ConvCache

__all__ = [
    "ConvCache", "conv2d", "conv2d_with_cache", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
    "max_pool2d", "max_pool2d_with_argmax", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "relu", "relu_backward", "leaky_relu", "leaky_relu_backward", "sigmoid", "sigmoid_backward",
    "tanh", "tanh_backward", "identity", "identity_backward", "softmax", "log_softmax",
    "softmax_cross_entropy", "softmax_cross_entropy_backward", "linear", "linear_backward",
    "mse_loss", "mse_loss_backward", "dropout", "dropout_backward",
    "BatchNormStats", "batch_norm", "batch_norm_with_stats", "batch_norm_backward",
    "adaptive_avg_pool2d", "adaptive_avg_pool2d_backward",
]

BackwardMethod = Literal["auto", "zero_insert", "col2im"]
Algo = Literal["auto", "im2col", "taps", "winograd"]


# --------------------------------------------------------------------------- convolution
# Each op checks its arguments, asks the conv engine (convnet._conv) for the layer's plan
# and runs it; the tuning policy (algorithms, routes, thresholds, chunks) lives there.

def _conv_geometry(x, weight, bias, stride, padding, dilation, groups=1) -> _conv.Geometry:
    s, pads, d, out_hw = _args.conv_args(x, weight, bias, stride, padding, dilation, groups)
    return _conv.Geometry.of(x.shape, weight, s, pads, d, out_hw, int(groups))


def _check_algo(algo: object, g: _conv.Geometry, forward: bool = True, method: str = "auto") -> None:
    _args.choice(algo, "algo", ("auto",) + _conv.ALGOS)
    reason = _conv.unsupported(algo, g, forward, method)
    if reason:
        raise ValueError(reason)


def _check_method(method: object, g: _conv.Geometry) -> None:
    _args.choice(method, "method", ("auto",) + _conv.METHODS)


def conv2d_with_cache(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                      stride: IntOrPair = 1, padding: Padding = 0, dilation: IntOrPair = 1, groups: int = 1,
                      *, algo: Algo = "auto") -> tuple[np.ndarray, ConvCache | None]:
    """2-D cross-correlation (a CNN "convolution"), keeping what backward needs.

    ``y[n, f, i, j] = b[f] + sum_{c, u, v} x_pad[n, c, i*S + u*D, j*S + v*D] * w[f, c, u, v]``,
    computed as the matrix multiply ``kernel_matrix(w) @ im2col(x)`` on the CNHW layout.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    weight : ndarray, shape (F, C // groups, KH, KW)
    bias : ndarray, shape (F,), optional
    stride, dilation : int or (h, w), >= 1
    padding : int, (h, w), ``"valid"`` or ``"same"`` (stride 1)
    groups : int, dividing C and F: filters ``[g*F/G, (g+1)*F/G)`` see only the input
        channels ``[g*C/G, (g+1)*C/G)``. Depthwise convolution is ``groups=C``. The
        groups are batched in each GEMM (one matmul over a group axis).
    algo : ``"auto"``, ``"im2col"``, ``"taps"`` (stride 1, groups 1) or ``"winograd"`` (3x3
        kernels, stride 1, dilation 1, groups 1; needs numba, the ``fast`` extra). im2col and
        taps give the same result up to rounding (:mod:`convnet.core`); Winograd F(4x4, 3x3)
        rounds more (in float32 about 5e-6 of the largest output, against 3e-7; see
        :mod:`convnet._winograd`). ``"auto"`` picks by the forward + backward time measured
        per layer shape (the plan of :mod:`convnet._conv`), Winograd only where numba is
        installed and the environment variable ``CONVNET_WINOGRAD`` is not ``0``.

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW)
    cache : ConvCache or None
        None when the batch was processed in chunks because its workspace exceeds
        :func:`convnet.core.get_workspace_limit`.

    Raises
    ------
    convnet.core.WorkspaceLimitError
        (a ``MemoryError``) when one image's workspace alone exceeds the limit; nothing
        is allocated then.
    """
    g = _conv_geometry(x, weight, bias, stride, padding, dilation, groups)
    _check_algo(algo, g)
    return _conv.forward(x, weight, bias, g, _conv.plan(g, backward=True, algo=algo), keep=True)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, stride: IntOrPair = 1,
           padding: Padding = 0, dilation: IntOrPair = 1, groups: int = 1, *, algo: Algo = "auto") -> np.ndarray:
    """2-D cross-correlation; see :func:`conv2d_with_cache` (``algo="auto"`` may use taps here).

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW)
    """
    g = _conv_geometry(x, weight, bias, stride, padding, dilation, groups)
    _check_algo(algo, g)
    return _conv.forward(x, weight, bias, g, _conv.plan(g, backward=False, algo=algo), keep=False)[0]


def conv2d_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, stride: IntOrPair = 1,
                    padding: Padding = 0, dilation: IntOrPair = 1, cache: ConvCache | None = None,
                    method: BackwardMethod = "auto", *, groups: int = 1, algo: Algo = "auto",
                    input_grad: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Two routes (``method``) give the input gradient (the tutorial's *sensitivity map*):

    - ``"zero_insert"``, the tutorial's: insert ``S-1`` zeros between the entries of
      ``dy``, pad it by ``D*(K-1) - P``, and correlate it (stride 1) with the
      180-degree-flipped, channel-swapped filters;
    - ``"col2im"``: ``dcols = W.T @ dy`` then :func:`convnet.core.col2im` (or, for many
      input channels, the same sums tap by tap: :func:`convnet.core.transposed_taps`).

    ``"auto"`` picks the cheaper for the shape. The filter gradient is the one GEMM
    ``dy @ im2col(x).T`` on CNHW ``dy`` (reusing forward's column matrix when cached);
    the bias gradient sums ``dy`` over N, H, W.

    Parameters
    ----------
    dy : ndarray, shape (N, F, OH, OW)
    x : ndarray, shape (N, C, H, W), the forward input
    weight : ndarray, shape (F, C // groups, KH, KW)
    stride, padding, dilation, groups : as in the forward call
    cache : ConvCache, optional, from :func:`conv2d_with_cache` on the same ``x``. A cache
        of another input, or of ``x`` before an in-place change, is a ``ValueError``
        (checked by a fingerprint of ``x``'s contents: one cheap pass over it).
    method : "auto", "zero_insert" or "col2im"
    algo : "auto", "im2col", "taps" or "winograd": how the input gradient is summed, with a
        column matrix and one GEMM, by one GEMM per kernel tap (any stride here), or by
        Winograd tiles (``"zero_insert"`` route; 3x3, stride 1, dilation 1, numba). The
        filter gradient follows the forward's algorithm (the cache's, else the plan's):
        Winograd's reuses the forward's transformed tiles, the others the column matrix
        (per-tap GEMMs with a batch-long reduction measured 2x slower). A cache from an
        exact forward keeps "auto" on the exact algorithms.
    input_grad : False skips the input gradient (``dx`` is None): a network's first layer
        needs only its filter and bias gradients.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), or None with ``input_grad=False``
    dweight : ndarray, shape (F, C, KH, KW)
    dbias : ndarray, shape (F,)
    """
    g = _conv_geometry(x, weight, None, stride, padding, dilation, groups)
    _args.check_array(dy, "dy", 4, "(N, F, OH, OW)")
    _args.check_shape(dy, "dy", (g.n, g.f) + g.out_hw)
    _args.check_same_dtype(dy=dy, x=x, weight=weight)
    _check_method(method, g)
    _check_algo(algo, g, forward=False, method=method)
    if cache is not None and not _conv.cache_matches(cache, x, g):
        raise ValueError("cache does not belong to this input and geometry (another x, x changed in place "
                         "since the forward, or other shapes); pass the cache returned by conv2d_with_cache "
                         "for the same x, weight shape, stride, padding and dilation")
    exact = cache is not None and cache.algo != "winograd"  # an exact forward keeps backward exact
    p = _conv.plan(g, backward=True, method=method, dx_algo=algo, winograd=False if exact else None)
    return _conv.backward(dy, x, weight, g, p, cache, input_grad)


def _transpose_geometry(x, weight, bias, stride, padding, output_padding, groups, dilation) -> _conv.Geometry:
    """The geometry of the convolution whose input gradient is this transposed convolution."""
    s, pads, d, out_hw = _args.conv_transpose_args(x, weight, bias, stride, padding, output_padding, groups,
                                                   dilation)
    n, _, h, w = x.shape
    return _conv.Geometry.of((n, weight.shape[1] * groups) + out_hw, weight, s, pads, d, (h, w), int(groups))


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, stride: IntOrPair = 1,
                     padding: IntOrPair = 0, output_padding: IntOrPair = 0, groups: int = 1,
                     dilation: IntOrPair = 1) -> np.ndarray:
    """Transposed convolution ("deconvolution"), as PyTorch's ``conv_transpose2d``.

    The input gradient of :func:`conv2d` made an op of its own, computed by the same code:
    the tutorial's sensitivity map (insert ``S-1`` zeros between the entries of ``x``, pad
    by ``D*(K-1) - P``, correlate with the 180-degree-flipped, channel-swapped filters) or
    its col2im form, as the plan picks. So ``<conv2d(z, w), x> == <z, conv_transpose2d(x, w)>``.

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W)
    weight : ndarray, shape (C_in, C_out // groups, KH, KW), PyTorch's layout (the weight
        of the ``conv2d`` from C_out to C_in channels that this op transposes)
    bias : ndarray, shape (C_out,), optional
    stride, dilation : int or (h, w), >= 1
    padding : int or (h, w), >= 0: rows and columns cropped from each side of the full result
    output_padding : int or (h, w), smaller than the stride or the dilation: extra rows
        and columns at the bottom and right (which conv2d's floor rule maps to the same size)
    groups : int dividing C_in

    Returns
    -------
    y : ndarray, shape (N, C_out, OH, OW), ``OH = (H-1)*S - 2P + D*(KH-1) + output_padding + 1``
    """
    g = _transpose_geometry(x, weight, bias, stride, padding, output_padding, groups, dilation)
    y = _conv.input_grad(x, weight, g, _conv.plan(g, backward=True))
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y


def conv_transpose2d_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, stride: IntOrPair = 1,
                              padding: IntOrPair = 0, output_padding: IntOrPair = 0, groups: int = 1,
                              dilation: IntOrPair = 1, input_grad: bool = True
                              ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv_transpose2d` with respect to its input, weight and bias.

    The input gradient is the forward :func:`conv2d` of ``dy`` (cut to the input's size);
    the weight gradient is conv2d's filter gradient with the roles of input and output
    swapped, sharing that forward's column matrix.

    Parameters
    ----------
    dy : ndarray, shape (N, C_out, OH, OW)
    x, weight, stride, padding, output_padding, groups, dilation : as in the forward call
    input_grad : False skips ``dx`` (None)

    Returns
    -------
    dx : ndarray, shape (N, C_in, H, W), or None
    dweight : ndarray, shape (C_in, C_out // groups, KH, KW)
    dbias : ndarray, shape (C_out,)
    """
    g = _transpose_geometry(x, weight, None, stride, padding, output_padding, groups, dilation)
    _args.check_array(dy, "dy", 4, "(N, C_out, OH, OW)")
    _args.check_shape(dy, "dy", (g.n, g.c, g.h, g.w))
    _args.check_same_dtype(dy=dy, x=x, weight=weight)
    p = _conv.plan(g, backward=True)
    # conv2d's roles: dy is that convolution's input, x its output's gradient.
    dx, cache = _conv.forward(dy, weight, None, g, p, keep=True) if input_grad else (None, None)
    _, dweight, _ = _conv.backward(x, dy, weight, g, p, cache, input_grad=False, bias_grad=False)
    return dx, dweight, dy.sum(axis=(0, 2, 3))


# --------------------------------------------------------------------------- pooling
# Window ops work on each tap's strided view (core.strided_window) or on shifted views of the
# flat planes, never on a window array. Measured choices (1 thread, float32, N=64 C=32 32x32
# and LeNet's pools):
# sums and maxima without an index are separable: a pass along the height, whose reads are
# whole rows, then one along the width on the smaller result (KH + KW ops instead of
# KH*KW: 1.05-1.6x faster for max, 1.4-1.9x for mean). A strided view that several ops
# read is first copied to a contiguous array (arg-max forward 1.4x faster). Errors are
# written into each tap's view of dx, with no zero fill where the windows tile the input
# and no ``+=`` where they do not overlap (mean backward 2-2.8x faster). Max pooling's
# arg-max and its backward each have a second route, chosen by geometry: see
# :func:`_argmax_route` and :func:`_rows_dx`.

def _pool_dy(dy: np.ndarray, x: np.ndarray, out_hw: tuple[int, int]) -> None:
    _args.check_array(dy, "dy", 4, "(N, C, OH, OW)")
    _args.check_shape(dy, "dy", x.shape[:2] + out_hw)
    _args.check_same_dtype(dy=dy, x=x)


def _all_finite(a: np.ndarray) -> bool:
    """Whether ``a`` holds no inf or nan: one BLAS dot (a sum of squares that overflows only
    sends the caller down its slower exact path), ~3x faster than ``np.isfinite(a.sum())``."""
    flat = a.ravel(order="K")
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.vdot(flat, flat)))


def _has_nan(a: np.ndarray) -> bool:
    """Whether ``a`` holds a nan: numpy's maximum propagates nan. As fast as a BLAS dot on one
    thread (measured), and it never wakes BLAS threads (a dot of 0.5 M floats runs on two)."""
    return bool(np.isnan(a.max()))


def _taps_along(a: np.ndarray, axis: int, t: int, s: int, n: int) -> np.ndarray:
    """View of tap ``t`` of ``n`` windows of stride ``s`` along ``axis``: ``a[..., t:t+s*(n-1)+1:s, ...]``."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(t, t + s * (n - 1) + 1, s)
    return a[tuple(index)]


def _reduce_along(a: np.ndarray, axis: int, k: int, s: int, n: int, op: np.ufunc) -> np.ndarray:
    """``op`` over the ``k`` taps of each window along ``axis``; always a fresh array."""
    if k == 1:
        return _taps_along(a, axis, 0, s, n).copy()
    out = op(_taps_along(a, axis, 0, s, n), _taps_along(a, axis, 1, s, n))
    for t in range(2, k):
        op(out, _taps_along(a, axis, t, s, n), out=out)
    return out


def _window_reduce(xp: np.ndarray, k, s, out_hw, op: np.ufunc) -> np.ndarray:
    """``op`` (``np.add`` or ``np.maximum``) over every window: along the height, then the width."""
    rows = _reduce_along(xp, 2, k[0], s[0], out_hw[0], op)
    return _reduce_along(rows, 3, k[1], s[1], out_hw[1], op)


def _spread_along(src: np.ndarray, shape: tuple[int, ...], axis: int, k: int, s: int, n: int) -> np.ndarray:
    """Adjoint of a ``k``-tap window sum along ``axis``: each element of ``src`` goes to its
    ``k`` inputs; the result has ``shape`` (inputs no window reaches get 0)."""
    if k == 1 and s == 1 and shape[axis] == n:
        return src
    covered = k == s and shape[axis] == k * n  # every element written exactly once
    out = np.empty(shape, dtype=src.dtype) if covered else np.zeros(shape, dtype=src.dtype)
    for t in range(k):
        view = _taps_along(out, axis, t, s, n)
        if k > s:  # windows overlap: an input may receive from several
            view += src
        else:
            view[...] = src
    return out


def max_pool2d(x: np.ndarray, kernel_size: IntOrPair, stride: IntOrPair | None = None,
               padding: IntOrPair = 0) -> np.ndarray:
    """Max pooling; the border is padded with ``-inf`` so padding never wins.

    A window holding a NaN gives NaN.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size : int or (h, w)
    stride : int or (h, w); None means ``kernel_size``
    padding : int or (h, w), at most half the kernel

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
    """
    k, s, pads, out_hw = _args.pool_args(x, kernel_size, stride, padding)
    return _window_reduce(core.pad2d(x, pads, -np.inf), k, s, out_hw, np.maximum)


def max_pool2d_with_argmax(x: np.ndarray, kernel_size: IntOrPair, stride: IntOrPair | None = None,
                           padding: IntOrPair = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_pool2d` and, for each output, which tap of its window holds the maximum.

    Passing ``argmax`` to :func:`max_pool2d_backward` routes the error without
    recomputing the forward's maximum.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
    argmax : uint8 ndarray (int32 for windows of more than 256 taps), shape (N, C, OH, OW)
        The tap ``i * KW + j`` of the window's (first, row-major) maximum, as ``np.argmax``
        of the flattened window picks it (a NaN counts as the maximum).
    """
    k, s, pads, out_hw = _args.pool_args(x, kernel_size, stride, padding)
    return _max_pool_argmax(core.pad2d(x, pads, -np.inf), k, s, out_hw)


def _argmax_dtype(k) -> np.dtype:
    return np.dtype(np.uint8 if k[0] * k[1] <= 256 else np.int32)


# Arg-max routes. "taps" visits the KH*KW taps, each through a strided copy of its view.
# "tournament", for 2x2 windows side by side, plays the two taps of each window row, then the
# two rows' winners: 3 comparisons and 3 maxima in all (the taps take 3 of each plus 6 passes
# for the running arg-max), and copies each window's left taps as the low halves of uint64
# pairs (float32), faster than a strided copy. Measured against "taps" (1 thread, float32,
# shared machine, interleaved, medians of several runs): 0.86-0.96x on LeNet's 32x16x28x28
# and 32x32x10x10, 0.92-1.07x on N=64 C=32 32x32.
# "running" takes running maxima at stride 1 over the flat planes, first along the width
# (KW - 1 passes), then along the height (KH - 1 passes, a shift of one row), every pass
# contiguous, and picks the windows at the stride once at the end: 2 strided copies instead
# of KH*KW, for KH + KW - 2 passes over the whole input instead of KH*KW over the output. It
# pays where those passes are under twice the taps' volume (input / output = SH*SW).
# Measured, "running" against "taps" (as above, N=64 C=32 32x32 unless said): 2x2/1 0.43x,
# 3x3/1 0.27x, 2x2 stride (1, 2) 0.65x, 3x3/2 0.80x (0.86x on LeNet's 16x28x28); even at
# 2x3/(2, 3) and 1x2/(1, 2); 2x2/2 0.93x here but 1.2x on 16x28x28; 4x4/4 1.5x. It works on
# blocks of planes of about _POOL_BLOCK elements so that its scratch arrays stay small
# (whole-input scratch measured up to 1.7x slower on 8 MiB inputs).
_POOL_BLOCK = 1 << 18


def _argmax_route(k: tuple[int, int], s: tuple[int, int]) -> str:
    """``"tournament"`` for 2x2 windows side by side; ``"running"`` where its contiguous passes
    cost less than the taps' strided copies; else ``"taps"``."""
    if k == s == (2, 2):
        return "tournament"
    if _argmax_dtype(k) != np.uint8 or k[1] == 1:  # one tap wide: its tap views are whole rows, cheap to copy
        return "taps"
    passes = k[0] + k[1] - 2
    return "running" if passes * s[0] * s[1] < 2 * k[0] * k[1] else "taps"


def _max_pool_argmax(xp, k, s, out_hw, route: str | None = None,
                     block: int = _POOL_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    taps = [(i, j) for i in range(k[0]) for j in range(k[1])]
    route = route or _argmax_route(k, s)
    if route == "tournament":
        y, arg = _tournament_max_argmax(xp, out_hw)
    elif route == "running":
        y, arg = _running_max_argmax(xp, k, s, out_hw, block)
    else:
        y, arg = _taps_max_argmax(xp, taps, s, out_hw, _argmax_dtype(k))
    if _has_nan(y):  # rare: NaN windows take their first NaN, as np.argmax does
        nan_windows = np.isnan(y)
        for t in range(len(taps) - 1, -1, -1):
            hit = np.isnan(core.strided_window(xp, *taps[t], s, out_hw)) & nan_windows
            np.copyto(arg, t, where=hit)
    return y, arg


def _tournament_max_argmax(xp, out_hw) -> tuple[np.ndarray, np.ndarray]:
    """The "tournament" route (2x2 windows, stride 2): see the comment above :func:`_argmax_route`."""
    shape = xp.shape[:2] + out_hw
    y, left, right = (np.empty(shape, dtype=xp.dtype) for _ in range(3))
    _copy_left_tap(y, xp, 0, out_hw)
    np.copyto(right, core.strided_window(xp, 0, 1, (2, 2), out_hw))
    # Strictly greater: on ties the first tap in row-major order wins.
    arg = np.greater(right, y).view(np.uint8)  # tap 1 beats tap 0
    np.maximum(y, right, out=y)
    _copy_left_tap(left, xp, 1, out_hw)
    np.copyto(right, core.strided_window(xp, 1, 1, (2, 2), out_hw))
    second = np.greater(right, left).view(np.uint8)  # tap 3 beats tap 2
    np.maximum(left, right, out=left)
    lower = np.greater(left, y).view(np.uint8)  # the second row beats the first
    np.maximum(y, left, out=y)
    second += np.uint8(2)  # the second row's tap, taken where it won: a max, as it is the larger
    second *= lower
    np.maximum(arg, second, out=arg)
    return y, arg


def _copy_left_tap(out, xp, i: int, out_hw) -> None:
    """``out[...] = xp[:, :, i::2, 0::2]`` cut to ``out_hw``: for a contiguous float32 input
    of even width, as the low halves of its uint64 pairs (one cast of whole rows)."""
    if xp.dtype == np.float32 and xp.flags.c_contiguous and xp.shape[3] % 2 == 0 and sys.byteorder == "little":
        pairs = xp.view(np.uint64)
        np.copyto(out.view(np.uint32), pairs[:, :, i:i + 2 * out_hw[0] - 1:2, :out_hw[1]], casting="unsafe")
    else:
        np.copyto(out, core.strided_window(xp, i, 0, (2, 2), out_hw))


def _taps_max_argmax(xp, taps, s, out_hw, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    y = core.strided_window(xp, 0, 0, s, out_hw).copy()
    arg = np.zeros(y.shape, dtype=dtype)
    window = np.empty_like(y)  # each tap's view, copied once so the three ops below read it contiguously
    better = np.empty(y.shape, dtype=bool)
    flag = better.view(np.uint8)  # 0/1 as an integer: the multiply needs no bool cast
    tap = np.empty(y.shape, dtype=dtype)
    for t, (i, j) in enumerate(taps[1:], 1):
        np.copyto(window, core.strided_window(xp, i, j, s, out_hw))
        np.greater(window, y, out=better)  # strictly: the first maximum keeps its tap
        # arg = t where better. Taps come in increasing order, so the last tap that beat the
        # running maximum is the largest such t: a max measured 10x faster than a masked copy.
        np.multiply(flag, dtype.type(t), out=tap)
        np.maximum(arg, tap, out=arg)
        np.maximum(y, window, out=y)
    return y, arg


def _running_max_argmax(xp, k, s, out_hw, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The "running" route: see the comment above :func:`_argmax_route`. Values that straddle
    two rows or two planes are computed too but never picked (no window reaches them)."""
    (kh, kw), (n, c, hp, wp) = k, xp.shape
    planes = np.ascontiguousarray(xp).reshape(n * c, hp * wp)
    count = min(n * c, max(1, block // (hp * wp)))  # planes per block
    size = count * hp * wp
    y = np.empty((n * c,) + out_hw, dtype=xp.dtype)
    arg = np.empty((n * c,) + out_hw, dtype=np.uint8)
    scratch = _RunningScratch(size, xp.dtype)
    for p0 in range(0, n * c, count):
        flat = planes[p0:p0 + count].reshape(-1)
        m, m_tap = _running_argmax(flat, None, kw, 1, 1, scratch.width, scratch.width_tap, scratch)
        m, m_tap = _running_argmax(m[:flat.size], m_tap, kh, wp, kw, scratch.height, scratch.height_tap, scratch)
        grid = (-1, hp, wp)
        np.copyto(y[p0:p0 + count], core.strided_window(m[:flat.size].reshape(grid), 0, 0, s, out_hw))
        if m_tap is None:  # a 1x1 window
            arg[p0:p0 + count] = 0
        else:
            np.copyto(arg[p0:p0 + count], core.strided_window(m_tap[:flat.size].reshape(grid), 0, 0, s, out_hw))
    return y.reshape(n, c, *out_hw), arg.reshape(n, c, *out_hw)


class _RunningScratch:
    """Scratch arrays of one block, allocated once per call and reused by every block."""

    def __init__(self, size: int, dtype: np.dtype):
        self.width, self.height = np.empty(size, dtype=dtype), np.empty(size, dtype=dtype)
        self.width_tap, self.height_tap = np.empty(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)
        self.better, self.tap = np.empty(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)


def _running_argmax(src, src_tap, k: int, step: int, scale: int, out, out_tap, scratch: _RunningScratch):
    """Running maximum of ``k`` taps ``step`` apart: ``out[r] = max_t src[r + t*step]`` for the
    first ``len(src) - (k-1)*step`` elements, and ``out_tap[r] = t*scale + src_tap[r + t*step]``
    of the first ``t`` holding it. ``src_tap`` None (the first pass) counts as 0 with ``scale``
    1. Returns ``(src, src_tap)`` unchanged for ``k == 1``, else ``(out, out_tap)``."""
    if k == 1:
        return src, src_tap
    n = src.size - (k - 1) * step
    better, tap = scratch.better[:n], scratch.tap[:n]
    cur, cur_tap = src[:n], out_tap[:n]
    for t in range(1, k):
        nxt = src[t * step:t * step + n]
        # Strictly greater: the first maximum keeps its tap. The candidate t*scale + src_tap
        # is larger than every earlier one (src_tap < scale), so the tap of the last t that
        # beat the running maximum is a plain maximum.
        if t == 1 and src_tap is None:  # the flag is the tap
            np.greater(nxt, cur, out=out_tap[:n].view(bool))
        else:
            np.greater(nxt, cur, out=better.view(bool))
            if src_tap is None:
                np.multiply(better, np.uint8(t), out=tap)
            else:
                np.add(src_tap[t * step:t * step + n], np.uint8(t * scale), out=tap)
                np.multiply(tap, better, out=tap)
            np.maximum(src_tap[:n] if t == 1 else cur_tap, tap, out=out_tap[:n])
        np.maximum(cur, nxt, out=out[:n])
        cur = out[:n]
    return out, out_tap


def max_pool2d_backward(dy: np.ndarray, x: np.ndarray, kernel_size: IntOrPair,
                        stride: IntOrPair | None = None, padding: IntOrPair = 0,
                        argmax: np.ndarray | None = None) -> np.ndarray:
    """Gradient of :func:`max_pool2d`: each error goes to its window's arg-max.

    Ties go to the first maximum in row-major window order (as ``np.argmax``).
    Overlapping windows accumulate their errors. Only the arg-max receives an error,
    even an inf or NaN one (every other input gets exactly 0).

    Parameters
    ----------
    dy : ndarray, shape (N, C, OH, OW)
    x : ndarray, shape (N, C, H, W), the forward input
    argmax : ndarray, shape (N, C, OH, OW), optional
        From :func:`max_pool2d_with_argmax` on the same ``x`` and geometry; without it the
        arg-max is found again from ``x``.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    """
    k, s, pads, out_hw = _args.pool_args(x, kernel_size, stride, padding)
    _pool_dy(dy, x, out_hw)
    if argmax is None:
        argmax = _max_pool_argmax(core.pad2d(x, pads, -np.inf), k, s, out_hw)[1]
    else:
        if not isinstance(argmax, np.ndarray):
            raise TypeError(f"argmax must be the array from max_pool2d_with_argmax, got {type(argmax).__name__}")
        _args.check_shape(argmax, "argmax", dy.shape)
        if argmax.dtype != _argmax_dtype(k):
            raise TypeError(f"argmax must be the {_argmax_dtype(k)} array from max_pool2d_with_argmax, "
                            f"got {argmax.dtype}")
    padded = x.shape[:2] + (x.shape[2] + sum(pads[0]), x.shape[3] + sum(pads[1]))
    return _crop(_max_pool_dx(dy, argmax, padded, k, s, out_hw), pads, x.shape)


def _dx_route(k: tuple[int, int], s: tuple[int, int], argmax: np.ndarray) -> str:
    """``"rows"`` for windows side by side (stride == kernel) at least two taps wide, with a
    uint8 arg-max; else ``"taps"`` (one tap wide, its tap views are whole rows already: the
    "rows" route measured 1.2x slower there)."""
    return "rows" if k == s and k[1] > 1 and argmax.dtype == np.uint8 else "taps"


def _max_pool_dx(dy, argmax, padded, k, s, out_hw, route: str | None = None,
                 block: int = _POOL_BLOCK) -> np.ndarray:
    """The padded input's gradient, shape ``padded``."""
    # Windows that tile the padded input exactly write every element: no zero fill needed.
    tiled = k == s and padded[2:] == (out_hw[0] * k[0], out_hw[1] * k[1])
    dxp = np.empty(padded, dtype=dy.dtype) if tiled else np.zeros(padded, dtype=dy.dtype)
    if (route or _dx_route(k, s, argmax)) == "rows":
        _rows_dx(dxp, dy, argmax, k, out_hw, block)
    else:
        _taps_dx(dxp, dy, argmax, k, s, out_hw)
    return dxp


def _taps_dx(dxp, dy, argmax, k, s, out_hw) -> None:
    overlapping = k[0] > s[0] or k[1] > s[1]
    finite = _all_finite(dy)  # 0 * inf is nan: mask by selection then
    zero = dy.dtype.type(0)
    hit = np.empty(dy.shape, dtype=bool)
    part = np.empty(dy.shape, dtype=dy.dtype) if overlapping or not finite else None
    for t in range(k[0] * k[1]):
        np.equal(argmax, t, out=hit)
        dst = core.strided_window(dxp, t // k[1], t % k[1], s, out_hw)
        # A multiply by the mask measured ~8x faster than a masked copy (``where=``), and
        # writing its result straight into the strided view 1.1x faster than a contiguous
        # product copied there.
        if finite and not overlapping:  # each pixel lies in one tap's view only: write
            np.multiply(dy, hit, out=dst)
            continue
        if finite:
            np.multiply(dy, hit, out=part)
        else:
            part[...] = np.where(hit, dy, zero)
        if overlapping:  # a pixel may be the arg-max of several windows: accumulate
            with np.errstate(invalid="ignore"):  # inf and -inf errors meeting give nan, as they should
                dst += part
        else:
            dst[...] = part


def _rows_dx(dxp, dy, argmax, k, out_hw, block: int) -> None:
    """The "rows" route (windows that tile): each tap's error by a left shift of ``dy``'s bits.

    Tap ``(i, j)`` gets ``dy`` where ``argmax == i*KW + j``: shifting the bits left by
    ``B * (argmax - i*KW - j)`` (B the bits of one element) keeps them where that is 0 and
    clears them elsewhere (numpy's shift by B or more gives 0, and an unsigned difference below
    0 wraps to a huge shift). ``dy`` is laid out KW times side by side, so each window row
    ``i`` of ``dx`` is one write (KH writes in all, instead of KH*KW into strided views). For
    float32 windows two taps wide, a window row's two taps are one uint64: the shift by
    ``32 * (argmax - 2i)`` puts ``dy`` in the first, the second or neither. Bits move, nothing
    multiplies: an inf or NaN error routes exactly, with no finite check. Measured against the
    "taps" route (1 thread, float32, shared machine, interleaved, medians of several runs):
    0.6-0.75x on 2x2/2 with N=64 C=32 32x32, 0.75-0.87x on LeNet's 32x16x28x28 and
    32x32x10x10, 0.63x on 4x4/4, 0.86x on 3x3/3.
    """
    (kh, kw), (n, c, hp, wp), (oh, ow) = k, dxp.shape, out_hw
    bits = np.dtype(f"u{dy.itemsize}")
    packed = dy.itemsize == 4 and kw == 2 and wp % 2 == 0 and sys.byteorder == "little"
    word = np.dtype(np.uint64) if packed else bits
    shift = 32 if packed else 8 * dy.itemsize  # clears one element, or moves it by one tap
    cols = ow if packed else ow * kw
    rows = dxp[:, :, :oh * kh, :ow * kw].view(word).view()
    rows.shape = (n * c, oh, kh, cols)  # raises rather than copy
    values, taps = dy.reshape(n * c, oh, ow).view(bits), argmax.reshape(n * c, oh, ow)
    count = min(n * c, max(1, block // (hp * wp)))  # planes per block
    shape = (count, oh, ow) if packed else (count, oh, ow, kw)
    spread, amount = np.empty(shape, dtype=word), np.empty(shape, dtype=word)
    for p0 in range(0, n * c, count):
        m = min(count, n * c - p0)
        e, a = spread[:m], amount[:m]
        if packed:
            np.copyto(e, values[p0:p0 + m])  # zero-extended: dy in the first tap's half
            np.left_shift(taps[p0:p0 + m], 5, out=a, dtype=word)  # 32 * argmax
        else:
            for j in range(kw):
                e[..., j] = values[p0:p0 + m]
                np.subtract(taps[p0:p0 + m], j, out=a[..., j], dtype=word)
            np.multiply(a, shift, out=a)
            e, a = e.reshape(m, oh, cols), a.reshape(m, oh, cols)
        for i in range(kh):
            if i:
                np.subtract(a, kw * shift, out=a)
            np.left_shift(e, a, out=rows[p0:p0 + m, :, i, :])


def _crop(xp: np.ndarray, pads, shape) -> np.ndarray:
    (pt, _), (pl, _) = pads
    return xp[:, :, pt:pt + shape[2], pl:pl + shape[3]] if xp.shape != shape else xp


def avg_pool2d(x: np.ndarray, kernel_size: IntOrPair, stride: IntOrPair | None = None,
               padding: IntOrPair = 0) -> np.ndarray:
    """Mean pooling; padded zeros count in the mean (PyTorch's ``count_include_pad=True``).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
    """
    k, s, pads, out_hw = _args.pool_args(x, kernel_size, stride, padding)
    y = _window_reduce(core.pad2d(x, pads, 0.0), k, s, out_hw, np.add)
    y *= x.dtype.type(1.0 / (k[0] * k[1]))
    return y


def avg_pool2d_backward(dy: np.ndarray, x: np.ndarray, kernel_size: IntOrPair,
                        stride: IntOrPair | None = None, padding: IntOrPair = 0) -> np.ndarray:
    """Gradient of :func:`avg_pool2d`: each error is spread evenly over its window.

    For ``stride == kernel`` and no padding this is the tutorial's Kronecker product
    ``kron(dy, ones((KH, KW))) / (KH*KW)``; overlapping windows accumulate.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    """
    k, s, pads, out_hw = _args.pool_args(x, kernel_size, stride, padding)
    _pool_dy(dy, x, out_hw)
    share = dy * x.dtype.type(1.0 / (k[0] * k[1]))
    hp, wp = x.shape[2] + sum(pads[0]), x.shape[3] + sum(pads[1])
    # The window sum is separable, so is its adjoint: spread along the height, then the width.
    rows = _spread_along(share, x.shape[:2] + (hp, out_hw[1]), 2, k[0], s[0], out_hw[0])
    dxp = _spread_along(rows, x.shape[:2] + (hp, wp), 3, k[1], s[1], out_hw[1])
    return _crop(dxp, pads, x.shape)


# --------------------------------------------------------------------------- activations

def _act_args(x: np.ndarray, dy: np.ndarray | None = None) -> None:
    if not isinstance(x, np.ndarray) or x.dtype not in _args.FLOAT_DTYPES:
        raise TypeError(f"x must be a float32 or float64 ndarray, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if dy is not None:
        if not isinstance(dy, np.ndarray) or dy.dtype not in _args.FLOAT_DTYPES:
            raise TypeError(f"dy must be a float32 or float64 ndarray, got "
                            f"{getattr(dy, 'dtype', type(dy).__name__)}")
        _args.check_shape(dy, "dy", x.shape)
        _args.check_same_dtype(dy=dy, x=x)


def relu(x: np.ndarray) -> np.ndarray:
    """``max(0, x)``, elementwise; any shape."""
    _act_args(x)
    return np.maximum(x, 0)


def relu_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``dy`` where ``x > 0``, else 0; the gradient at 0 is taken as 0."""
    _act_args(x, dy)
    # A multiply by the bool mask measured fastest (LeNet's 32x16x28x28 float32, 1 thread:
    # 0.22 ms; a float mask 0.31, np.where 1.9, copyto(where=) 2.4); the finiteness check
    # is a BLAS dot (0.04 ms; out.sum() took 0.11).
    with np.errstate(invalid="ignore", over="ignore"):  # the rare non-finite case is redone below
        out = np.multiply(dy, x > 0)
    if not _all_finite(out):  # inf or nan in dy where x <= 0 left nan (0 * inf): select instead
        out = np.where(x > 0, dy, x.dtype.type(0))
    return out


def leaky_relu(x: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """``x`` where positive, ``negative_slope * x`` elsewhere."""
    _act_args(x)
    slope = _args.real(negative_slope, "negative_slope")
    return np.where(x > 0, x, x * x.dtype.type(slope))


def leaky_relu_backward(dy: np.ndarray, x: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """``dy`` where ``x > 0``, ``negative_slope * dy`` elsewhere."""
    _act_args(x, dy)
    slope = _args.real(negative_slope, "negative_slope")
    return np.where(x > 0, dy, dy * x.dtype.type(slope))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, stable for large ``|x|`` (never exponentiates a positive number)."""
    _act_args(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def sigmoid_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``dy * s * (1 - s)`` with ``s = sigmoid(x)``."""
    _act_args(x, dy)
    sx = sigmoid(x)
    return dy * sx * (1 - sx)


def tanh(x: np.ndarray) -> np.ndarray:
    """Hyperbolic tangent, elementwise."""
    _act_args(x)
    return np.tanh(x)


def tanh_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``dy * (1 - tanh(x)**2)``."""
    _act_args(x, dy)
    t = np.tanh(x)
    return dy * (1 - t * t)


def identity(x: np.ndarray) -> np.ndarray:
    """Returns a copy of ``x`` (so callers may modify the result freely)."""
    _act_args(x)
    return x.copy()


def identity_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Returns a copy of ``dy``."""
    _act_args(x, dy)
    return dy.copy()


# --------------------------------------------------------------------------- softmax and losses

def _shifted_exp(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` less its max along ``axis`` (so large logits do not overflow), its exp, and the
    exp's sums (dims kept): the one stable core of softmax, log-softmax and the cross-entropy."""
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return shifted, e, e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x - logsumexp(x)`` along ``axis``, shifted by the max so large logits do not overflow."""
    _act_args(x)
    shifted, _, sums = _shifted_exp(x, axis)
    return shifted - np.log(sums)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    _act_args(x)
    _, e, sums = _shifted_exp(x, axis)
    return e / sums


def _ce_args(logits: np.ndarray, labels: np.ndarray) -> None:
    _args.check_array(logits, "logits", 2, "(N, K)")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer ndarray of shape (N,), got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    _args.check_shape(labels, "labels", logits.shape[:1])
    k = logits.shape[1]
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got values from {labels.min()} to {labels.max()}")


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``softmax(logits)`` against integer class ``labels``.

    Parameters
    ----------
    logits : ndarray, shape (N, K)
    labels : int ndarray, shape (N,), values in [0, K)

    Returns
    -------
    float, the loss averaged over the batch.
    """
    return _softmax_cross_entropy_parts(logits, labels)[0]


def softmax_cross_entropy_backward(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Gradient of :func:`softmax_cross_entropy`: ``(softmax(logits) - onehot) / N``.

    Returns
    -------
    dlogits : ndarray, shape (N, K), dtype of ``logits``.
    """
    _, parts = _softmax_cross_entropy_parts(logits, labels)
    return _softmax_cross_entropy_grad(parts, labels)


def _softmax_cross_entropy_parts(logits: np.ndarray, labels: np.ndarray
                                 ) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """The loss and what its gradient needs, ``(exp(shifted), its row sums)``, from one softmax.

    The same core as :func:`log_softmax` and :func:`softmax` (:func:`_shifted_exp`, so the
    same bits): loss ``-mean(shifted[i, y_i] - log(sum_j exp(shifted[i, j])))``.
    ``CrossEntropyLoss`` keeps the parts for its ``backward`` instead of a second softmax.
    """
    _ce_args(logits, labels)
    shifted, e, sums = _shifted_exp(logits, 1)
    picked = shifted[np.arange(len(labels)), labels] - np.log(sums[:, 0])
    return float(-picked.mean()), (e, sums)


def _softmax_cross_entropy_grad(parts: tuple[np.ndarray, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """``(softmax - onehot) / N`` from :func:`_softmax_cross_entropy_parts`'s parts (left unchanged)."""
    e, sums = parts
    g = e / sums
    g[np.arange(len(labels)), labels] -= 1
    g /= len(labels)
    return g


def mse_loss(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error over all elements."""
    _act_args(pred)
    _act_args(target)
    _args.check_shape(target, "target", pred.shape)
    return float(np.mean((pred - target) ** 2))


def mse_loss_backward(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Gradient of :func:`mse_loss`: ``2 * (pred - target) / size``, dtype of ``pred``."""
    _act_args(pred, target)
    return (pred - target) * pred.dtype.type(2.0 / pred.size)


# --------------------------------------------------------------------------- linear and dropout

def _linear_args(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> None:
    _args.check_array(x, "x", 2, "(N, in_features)")
    _args.check_array(weight, "weight", 2, "(out_features, in_features)")
    if bias is not None:
        _args.check_array(bias, "bias", 1, "(out_features,)")
        _args.check_shape(bias, "bias", weight.shape[:1])
    _args.check_same_dtype(x=x, weight=weight, bias=bias)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features (shape {x.shape}) but weight expects "
                         f"{weight.shape[1]} (shape {weight.shape})")


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Fully connected layer ``x @ weight.T + bias``.

    Parameters
    ----------
    x : ndarray, shape (N, in)
    weight : ndarray, shape (out, in)
    bias : ndarray, shape (out,), optional

    Returns
    -------
    ndarray, shape (N, out)
    """
    _linear_args(x, weight, bias)
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                    input_grad: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of :func:`linear`; ``input_grad=False`` skips ``dx`` (None).

    Returns
    -------
    dx : (N, in) or None, dweight : (out, in), dbias : (out,)
    """
    _linear_args(x, weight, None)
    _args.check_array(dy, "dy", 2, "(N, out_features)")
    _args.check_shape(dy, "dy", (x.shape[0], weight.shape[0]))
    _args.check_same_dtype(dy=dy, x=x)
    return (dy @ weight if input_grad else None), dy.T @ x, dy.sum(axis=0)


def dropout(x: np.ndarray, p: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by ``1/(1-p)``.

    Returns
    -------
    y : ndarray, shape of ``x``
    mask : ndarray, shape of ``x``, the scaled keep mask (``0`` or ``1/(1-p)``), for backward.
    """
    _act_args(x)
    p = _args.probability(p, "p")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    keep = rng.random(x.shape) >= p  # float64 draws: the masks of a seed never change
    mask = keep.astype(x.dtype)
    mask *= x.dtype.type(1.0 / (1.0 - p))  # in place: no temporary (the draw costs ~8x the rest)
    return x * mask, mask


def dropout_backward(dy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``dy * mask`` with the mask returned by :func:`dropout`."""
    _act_args(mask, dy)
    return dy * mask


# --------------------------------------------------------------------------- normalization and global pooling
#
# Batch norm works on the (N, C, L) view of its input (L = H*W, or 1 for (N, C)) and
# walks it a block of images at a time, so the centred temporary it needs lives in the
# cache instead of being written to memory. Passes over the activation (memory traffic;
# the block temporaries stay in cache): forward in training reads x twice (statistics,
# then normalize) and writes y once; backward reads x and dy twice each (the sums, then
# dx) and writes dx once. In eval mode forward is one read and one write.
# Per-channel sums are taken per (image, channel) row in x's dtype (at most H*W terms)
# and added over the images in float64.

class BatchNormStats(NamedTuple):
    """What a batch-norm forward normalized with, for its backward.

    ``mean`` and ``inv_std`` (float64, shape (C,)) are the subtracted mean and the factor
    ``1 / sqrt(var + eps)``. ``batch`` is True when they are the batch's own statistics
    (they then depend on ``x``, and backward differentiates through them) and False when
    they came from the running estimates (constants).
    """

    mean: np.ndarray
    inv_std: np.ndarray
    batch: bool


# Images per block: about this many bytes of activation, so the block's temporary stays in
# cache (measured on (128, 16, 32, 32) float32: 1 MiB blocks 2.7 ms vs 6.0 ms unblocked for
# centring + squares).
BATCH_NORM_BLOCK_BYTES = 1 << 20


def _bn_blocks(x3: np.ndarray) -> list[slice]:
    per_image = max(1, x3[0].nbytes)
    step = max(1, BATCH_NORM_BLOCK_BYTES // per_image)
    return [slice(i, min(i + step, x3.shape[0])) for i in range(0, x3.shape[0], step)]


def _channel_vector(a: object, name: str, c: int, x: np.ndarray) -> None:
    if a is None:
        return
    _args.check_array(a, name, 1, "(C,)")
    _args.check_shape(a, name, (c,))
    _args.check_same_dtype(x=x, **{name: a})


def _bn_args(x, weight, bias, running_mean, running_var, training, momentum, eps) -> tuple[float, float]:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy ndarray, got {type(x).__name__}")
    if x.ndim not in (2, 4):
        raise ValueError(f"x must be 2-D (N, C) or 4-D (N, C, H, W), got shape {x.shape}")
    _args.check_array(x, "x", x.ndim, "(N, C) or (N, C, H, W)")
    if min(x.shape) < 1:
        raise ValueError(f"empty arrays are not supported: x {x.shape}")
    c = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _channel_vector(a, name, c, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None), got "
                         f"running_mean={'None' if running_mean is None else 'an array'}, "
                         f"running_var={'None' if running_var is None else 'an array'}")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    momentum = _args.real(momentum, "momentum", 0.0, 1.0)
    eps = _args.real(eps, "eps", 0.0, low_open=True, finite=True)
    if training and running_mean is not None:
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            if not a.flags.writeable:
                raise ValueError(f"{name} must be writeable: training updates it in place")
    if training or running_mean is None:
        m = x.size // c
        if m < 2:
            raise ValueError(f"batch norm with batch statistics needs more than 1 value per channel, "
                             f"got x of shape {x.shape}")
    return momentum, eps


def _channels_view(x: np.ndarray) -> np.ndarray:
    """(N, C, L) view (or copy, for inputs that are not C-contiguous per image)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _bn_batch_stats(x3: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, biased variance and ``1/sqrt(var + eps)`` per channel, float64.

    One read of ``x`` from memory: each block's mean and centred sum of squares are taken
    while the block is in cache (two passes over the block), and the blocks are combined
    with Chan et al.'s pairwise update, so a mean far from zero costs no accuracy.
    """
    c = x3.shape[1]
    count, mean, m2 = 0, np.zeros(c), np.zeros(c)
    blocks = _bn_blocks(x3)
    tmp = np.empty((blocks[0].stop,) + x3.shape[1:], dtype=x3.dtype)
    for sl in blocks:
        xb = x3[sl]
        n_b = xb.shape[0] * xb.shape[2]
        mean_b = np.add.reduce(xb, axis=2).sum(axis=0, dtype=np.float64) / n_b
        xc = np.subtract(xb, mean_b.astype(x3.dtype)[:, None], out=tmp[:sl.stop - sl.start])
        m2_b = np.einsum("ncl,ncl->nc", xc, xc).sum(axis=0, dtype=np.float64)
        # xc was centred on the float32-rounded mean; correct for the rounding offset.
        offset = np.add.reduce(xc, axis=2).sum(axis=0, dtype=np.float64) / n_b
        m2_b -= n_b * offset * offset
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta * delta * (count * n_b / total)
        count = total
    var = np.maximum(m2 / count, 0.0)
    return mean, var, 1.0 / np.sqrt(var + eps)


def batch_norm_with_stats(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
                          running_mean: np.ndarray | None, running_var: np.ndarray | None,
                          training: bool, momentum: float = 0.1,
                          eps: float = 1e-5) -> tuple[np.ndarray, BatchNormStats]:
    """Batch normalization, returning also the statistics its backward needs.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel (axis 1), with
    PyTorch's semantics (``torch.nn.functional.batch_norm``):

    - ``training=True`` (or no running estimates): ``mean`` and ``var`` are the batch's,
      over N (and H, W), with the *biased* variance (divided by the count ``M``);
    - in training the running estimates are updated **in place**:
      ``running = (1 - momentum) * running + momentum * batch_stat``, with the *unbiased*
      variance (``var * M / (M - 1)``) going into ``running_var``;
    - ``training=False``: normalize with ``running_mean`` and ``running_var``, which are
      left untouched.

    ``x``, ``weight`` and ``bias`` are never modified.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W) or (N, C)
    weight, bias : ndarray, shape (C,), or None (no scale, no shift)
    running_mean, running_var : ndarray, shape (C,), dtype of ``x``, or both None
        (always batch statistics, no update)
    training : bool
    momentum : float in [0, 1]
    eps : float > 0

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    stats : BatchNormStats, for :func:`batch_norm_backward`
    """
    momentum, eps = _bn_args(x, weight, bias, running_mean, running_var, training, momentum, eps)
    x3 = _channels_view(x)
    c = x3.shape[1]
    if training or running_mean is None:
        mean, var, inv_std = _bn_batch_stats(x3, eps)
        if training and running_mean is not None:
            m = x3.shape[0] * x3.shape[2]
            running_mean *= 1.0 - momentum
            running_mean += (momentum * mean).astype(running_mean.dtype)
            running_var *= 1.0 - momentum
            running_var += (momentum * var * (m / (m - 1))).astype(running_var.dtype)
        stats = BatchNormStats(mean, inv_std, True)
    else:
        mean = running_mean.astype(np.float64)
        stats = BatchNormStats(mean, 1.0 / np.sqrt(running_var.astype(np.float64) + eps), False)
    scale = stats.inv_std * (1.0 if weight is None else weight.astype(np.float64))
    shift = (0.0 if bias is None else bias.astype(np.float64)) - mean * scale
    scale_x = scale.astype(x.dtype).reshape(c, 1)
    shift_x = np.broadcast_to(shift, (c,)).astype(x.dtype).reshape(c, 1)
    y = np.empty(x3.shape, dtype=x.dtype)
    for sl in _bn_blocks(x3):
        yb = np.multiply(x3[sl], scale_x, out=y[sl])
        yb += shift_x
    return y.reshape(x.shape), stats


def batch_norm(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
               running_mean: np.ndarray | None, running_var: np.ndarray | None, training: bool,
               momentum: float = 0.1, eps: float = 1e-5) -> np.ndarray:
    """Batch normalization; see :func:`batch_norm_with_stats` (same semantics, running
    estimates updated in place in training).

    Returns
    -------
    y : ndarray, shape and dtype of ``x``
    """
    return batch_norm_with_stats(x, weight, bias, running_mean, running_var, training, momentum, eps)[0]


def batch_norm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray | None, stats: BatchNormStats,
                        *, input_grad: bool = True
                        ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of :func:`batch_norm` with respect to ``x``, ``weight`` and ``bias``.

    With batch statistics, the fused formula (``x_hat = (x - mean) * inv_std``, ``M``
    values per channel, sums over N, H, W)::

        dx = weight * inv_std * (dy - sum(dy) / M - x_hat * sum(dy * x_hat) / M)

    With running statistics (eval mode) they are constants: ``dx = weight * inv_std * dy``.
    Always ``dweight = sum(dy * x_hat)`` and ``dbias = sum(dy)``.

    Parameters
    ----------
    dy : ndarray, shape of ``x``
    x : ndarray, (N, C, H, W) or (N, C), the forward input
    weight : ndarray (C,) or None, as in the forward call
    stats : BatchNormStats from :func:`batch_norm_with_stats` on the same ``x``
    input_grad : False skips ``dx`` (None)

    Returns
    -------
    dx : ndarray, shape of ``x`` (or None with ``input_grad=False``)
    dweight, dbias : ndarray, shape (C,), dtype of ``x`` (what the affine parameters
        would receive; ignore them when there are none)
    """
    if not isinstance(x, np.ndarray) or x.ndim not in (2, 4):
        raise ValueError(f"x must be 2-D (N, C) or 4-D (N, C, H, W), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    _args.check_array(x, "x", x.ndim, "(N, C) or (N, C, H, W)")
    _args.check_array(dy, "dy", x.ndim, "(shape of x)")
    _args.check_shape(dy, "dy", x.shape)
    _args.check_same_dtype(dy=dy, x=x)
    c = x.shape[1]
    _channel_vector(weight, "weight", c, x)
    if not isinstance(stats, BatchNormStats) or np.shape(stats.mean) != (c,) or np.shape(stats.inv_std) != (c,):
        raise ValueError(f"stats must be the BatchNormStats returned by batch_norm_with_stats for this x "
                         f"({c} channels), got {type(stats).__name__}")
    x3, dy3 = _channels_view(x), _channels_view(dy)
    m = x3.shape[0] * x3.shape[2]
    mean_x = stats.mean.astype(x.dtype)[:, None]
    blocks = _bn_blocks(x3)
    tmp = np.empty((blocks[0].stop,) + x3.shape[1:], dtype=x.dtype)
    sum_dy = np.zeros(c, dtype=np.float64)
    sum_dy_xc = np.zeros(c, dtype=np.float64)
    for sl in blocks:  # pass 1: sum(dy) and sum(dy * (x - mean))
        xc = np.subtract(x3[sl], mean_x, out=tmp[:sl.stop - sl.start])
        sum_dy += np.add.reduce(dy3[sl], axis=2).sum(axis=0, dtype=np.float64)
        sum_dy_xc += np.einsum("ncl,ncl->nc", dy3[sl], xc).sum(axis=0, dtype=np.float64)
    dweight = (sum_dy_xc * stats.inv_std).astype(x.dtype)
    dbias = sum_dy.astype(x.dtype)
    if not input_grad:
        return None, dweight, dbias
    scale = stats.inv_std * (1.0 if weight is None else weight.astype(np.float64))
    scale_x = np.broadcast_to(scale, (c,)).astype(x.dtype).reshape(c, 1)
    dx = np.empty(x3.shape, dtype=x.dtype)
    if not stats.batch:
        for sl in blocks:
            np.multiply(dy3[sl], scale_x, out=dx[sl])
        return dx.reshape(x.shape), dweight, dbias
    # dx = scale * (dy - sum_dy/M - (x - mean) * inv_std^2 * sum_dy_xc / M)
    k_x = (stats.inv_std ** 2 * sum_dy_xc / m).astype(x.dtype).reshape(c, 1)
    mean_dy_x = (sum_dy / m).astype(x.dtype).reshape(c, 1)
    for sl in blocks:  # pass 2: dx
        db = np.subtract(x3[sl], mean_x, out=dx[sl])
        db *= k_x
        np.subtract(dy3[sl], db, out=db)
        db -= mean_dy_x
        db *= scale_x
    return dx.reshape(x.shape), dweight, dbias


def _adaptive_size(output_size: IntOrPair) -> tuple[int, int]:
    return _args.pair(output_size, "output_size", 1)


def _adaptive_matrix(size: int, out: int, dtype: np.dtype) -> np.ndarray:
    """(out, size) averaging matrix: row i averages ``[floor(i*size/out), ceil((i+1)*size/out))``,
    PyTorch's adaptive windows (equal, disjoint windows when ``out`` divides ``size``)."""
    mat = np.zeros((out, size), dtype=dtype)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def _adaptive_args(x: np.ndarray, output_size: IntOrPair) -> tuple[int, int]:
    _args.check_array(x, "x", 4, "(N, C, H, W)")
    if min(x.shape) < 1:
        raise ValueError(f"empty arrays are not supported: x {x.shape}")
    return _adaptive_size(output_size)


def adaptive_avg_pool2d(x: np.ndarray, output_size: IntOrPair) -> np.ndarray:
    """Average pooling to a fixed output size, as ``torch.nn.functional.adaptive_avg_pool2d``.

    Output row ``i`` averages input rows ``floor(i*H/OH)`` to ``ceil((i+1)*H/OH) - 1`` (likewise
    columns), so any output size works; when it divides the input this is plain mean pooling
    with kernel and stride ``H/OH``, and ``output_size=1`` is global average pooling.
    Computed as ``A_h @ x @ A_w.T`` with the (OH, H) and (OW, W) averaging matrices.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    output_size : int or (OH, OW), >= 1

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW), dtype of ``x``
    """
    oh, ow = _adaptive_args(x, output_size)
    h, w = x.shape[2:]
    if (oh, ow) == (1, 1):  # global pooling: one mean per plane
        return x.mean(axis=(2, 3), keepdims=True, dtype=np.float64).astype(x.dtype)
    return _adaptive_matrix(h, oh, x.dtype) @ x @ _adaptive_matrix(w, ow, x.dtype).T


def adaptive_avg_pool2d_backward(dy: np.ndarray, x: np.ndarray, output_size: IntOrPair) -> np.ndarray:
    """Gradient of :func:`adaptive_avg_pool2d`: each error shared evenly by its window
    (``A_h.T @ dy @ A_w``); overlapping windows (sizes that do not divide) accumulate.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``x``
    """
    oh, ow = _adaptive_args(x, output_size)
    _pool_dy(dy, x, (oh, ow))
    h, w = x.shape[2:]
    if (oh, ow) == (1, 1):
        return np.broadcast_to(dy * x.dtype.type(1.0 / (h * w)), x.shape).copy()
    return _adaptive_matrix(h, oh, x.dtype).T @ dy @ _adaptive_matrix(w, ow, x.dtype)
