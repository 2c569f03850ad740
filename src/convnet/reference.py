"""Loop reference: the tutorial's formulas written out with plain loops.

This module is the independent witness for the vectorized engine. Every
function here has the same name and signature as its counterpart in
``convnet.functional`` (minus the ``cache``/``method`` arguments of
``conv2d_backward``), but it is computed the way the tutorial explains it:
one image, one filter, one output position at a time, with a numpy
elementwise multiply of one patch with one filter followed by a sum.

It is slow on purpose and must stay simple. It never imports
``convnet.core`` or ``convnet.functional``; it shares only the argument
validation in ``convnet._args`` so that bad input is rejected with the same
messages as the vectorized API. Output geometry is recomputed here from the
tutorial's size formula rather than taken from the validator.

All arrays are NCHW, float32 or float64. The dtype of the inputs is kept
(float32 in, float32 out; sums are accumulated in that dtype) and the inputs
are never modified.
"""

from __future__ import annotations

import numpy as np

from convnet._args import (
    check_array,
    check_same_dtype,
    check_shape,
    conv_args,
    conv_transpose_args,
    pool_args,
    real,
)

IntOrPair = int | tuple[int, int]
Padding = int | tuple[int, int] | str

__all__ = [
    "conv2d",
    "conv2d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "relu",
    "relu_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
    "identity",
    "identity_backward",
    "batch_norm",
    "batch_norm_backward",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
]


# ---------------------------------------------------------------------------
# small helpers (geometry and zero padding), written out explicitly
# ---------------------------------------------------------------------------

def _out_len(size: int, pad_before: int, pad_after: int, k: int, s: int, d: int) -> int:
    """The tutorial's output-size formula ``W2 = (W1 - F + 2P) / S + 1``.

    Generalised to per-side padding, dilation (a dilated kernel spans
    ``D*(K-1) + 1`` inputs) and strides that do not divide evenly (floor).
    """
    span = d * (k - 1) + 1
    return (size + pad_before + pad_after - span) // s + 1


def _zero_pad(x: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]],
              value: float = 0.0) -> np.ndarray:
    """Surround the last two axes of ``x`` with ``value`` ("补几圈0", Zero Padding).

    Returns a new array of the same dtype; ``x`` is untouched.
    """
    (top, bottom), (left, right) = pads
    n, c, h, w = x.shape
    out = np.full((n, c, h + top + bottom, w + left + right), value, dtype=x.dtype)
    out[:, :, top:top + h, left:left + w] = x
    return out


def _pad_or_crop(a: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Zero-pad the last two axes of ``a`` by ``pads``; a negative amount crops instead.

    The conv backward pads the sensitivity map by ``D*(K-1) - P`` on each side,
    which is negative when the forward padding exceeds the dilated kernel
    (``P > D*(K-1)``): those border rows of the padded input are not part of
    ``x``, so their gradient is simply dropped.
    """
    (top, bottom), (left, right) = pads
    # Crop first (negative amounts), then pad (positive amounts).
    h, w = a.shape[-2], a.shape[-1]
    a = a[..., max(-top, 0):h - max(-bottom, 0), max(-left, 0):w - max(-right, 0)]
    return _zero_pad(a, ((max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))))


def _check_elementwise(x: object, name: str) -> np.ndarray:
    """Activation inputs may have any shape, but must be float32/float64 ndarrays."""
    ndim = x.ndim if isinstance(x, np.ndarray) else -1
    return check_array(x, name, ndim, "array")


def _check_elementwise_backward(dy: object, x: object) -> None:
    _check_elementwise(x, "x")
    _check_elementwise(dy, "dy")
    check_same_dtype(dy=dy, x=x)
    check_shape(dy, "dy", x.shape)


# ---------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------

def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
           stride: IntOrPair = 1, padding: Padding = 0, dilation: IntOrPair = 1,
           groups: int = 1) -> np.ndarray:
    """Convolution layer output, one filter and one output position at a time.

    The tutorial's formula for an input of depth D > 1 ("深度大于1的卷积计算公式"),
    without the activation ``f``::

        a[d2, i, j] = sum_{d=0}^{D-1} sum_m sum_n w[d2, d, m, n] * x[d, i*S + m, j*S + n] + w_b[d2]

    i.e. a cross-correlation of the zero-padded input with each filter, with
    the output size ``W2 = (W1 - F + 2P) / S + 1`` (floor rule). Dilation
    ``D`` samples the input every ``D`` pixels inside a window. With ``groups`` G, filter
    ``f`` sees only the channels of its group, ``[g*C/G, (g+1)*C/G)`` with ``g = f // (F/G)``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    weight : ndarray, shape (F, C/groups, KH, KW)
    bias : ndarray, shape (F,), optional
    stride, dilation : int or (int, int)
    padding : int, (int, int), "valid" or "same" ("same" needs stride 1)
    groups : int dividing C and F

    Returns
    -------
    y : ndarray, shape (N, F, OH, OW), dtype of ``x``
        ``OH = (H + P_top + P_bottom - D*(KH-1) - 1) // S + 1``, likewise ``OW``.
    """
    (sh, sw), pads, (dh, dw), _ = conv_args(x, weight, bias, stride, padding, dilation, groups)
    n_images, _, h, w = x.shape
    n_filters, group_channels, kh, kw = weight.shape
    group_filters = n_filters // groups
    (pt, pb), (pl, pr) = pads
    oh = _out_len(h, pt, pb, kh, sh, dh)
    ow = _out_len(w, pl, pr, kw, sw, dw)
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1

    xp = _zero_pad(x, pads)
    y = np.zeros((n_images, n_filters, oh, ow), dtype=x.dtype)
    for n in range(n_images):
        for f in range(n_filters):
            first = f // group_filters * group_channels  # the filter's group of channels
            for i in range(oh):
                for j in range(ow):
                    # One patch (the group's channels) times one filter, then sum.
                    patch = xp[n, first:first + group_channels, i * sh:i * sh + span_h:dh, j * sw:j * sw + span_w:dw]
                    y[n, f, i, j] = np.sum(patch * weight[f])
            if bias is not None:
                y[n, f] += bias[f]
    return y


def conv2d_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray,
                    stride: IntOrPair = 1, padding: Padding = 0,
                    dilation: IntOrPair = 1, *, groups: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``conv2d`` the tutorial's way: expand, pad, convolve with rot180(W).

    1. **Stride S**: expand the sensitivity map ``dy`` by inserting ``S-1``
       zeros between its entries, giving the sensitivity map of the same
       convolution at stride 1. When the stride does not divide evenly, the
       trailing rows/columns that no window reached stay zero.
    2. **Error term** (the tutorial's ``delta^{l-1} = sum_d delta^l_d * rot180(W_d)``,
       a full convolution): zero-pad the expanded map by ``D*(K-1) - P`` on
       each side (cropping where this is negative, i.e. ``P > D*(K-1)``) and
       cross-correlate it with the 180-degree-rotated filters. As the tutorial
       does for N filters, each filter ``f`` gives a partial sensitivity map of
       every input channel ``c`` (its channel-``c`` weights, rotated), and the
       N partial maps are added element by element::

           dx[n, c] = sum_f correlate(pad(delta[n, f]), rot180(w[f, c]))

    3. **Weight gradient** (the tutorial's ``dE/dw[i, j] = sum_m sum_n delta[m, n] * a[i+m, j+n]``):
       cross-correlate the zero-padded input with the expanded sensitivity
       map, summed over the images.
    4. **Bias gradient** (``dE/dw_b = sum_i sum_j delta[i, j]``): the sum of ``dy``.

    Parameters
    ----------
    dy : ndarray, shape (N, F, OH, OW)
        Sensitivity map (gradient of the loss with respect to the output).
    x : ndarray, shape (N, C, H, W)
    weight : ndarray, shape (F, C, KH, KW)
    stride, padding, dilation
        As in :func:`conv2d`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dweight : ndarray, shape (F, C, KH, KW)
    dbias : ndarray, shape (F,)
        All in the dtype of ``x``.
    """
    (sh, sw), pads, (dh, dw), _ = conv_args(x, weight, None, stride, padding, dilation, groups)
    check_array(dy, "dy", 4, "(N, F, OH, OW)")
    check_same_dtype(dy=dy, x=x, weight=weight)
    n_images, n_channels, h, w = x.shape
    n_filters, group_channels, kh, kw = weight.shape
    group_filters = n_filters // groups
    (pt, pb), (pl, pr) = pads
    oh = _out_len(h, pt, pb, kh, sh, dh)
    ow = _out_len(w, pl, pr, kw, sw, dw)
    check_shape(dy, "dy", (n_images, n_filters, oh, ow))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1

    # 1. Expand: the stride-1 sensitivity map has one entry per stride-1 window position.
    full_h = h + pt + pb - span_h + 1
    full_w = w + pl + pr - span_w + 1
    delta = np.zeros((n_images, n_filters, full_h, full_w), dtype=dy.dtype)
    for i in range(oh):
        for j in range(ow):
            delta[:, :, i * sh, j * sw] = dy[:, :, i, j]

    # 2. Error term: pad by D*(K-1) - P (crop if negative), correlate with rot180(W).
    delta_padded = _pad_or_crop(delta, ((span_h - 1 - pt, span_h - 1 - pb),
                                        (span_w - 1 - pl, span_w - 1 - pr)))
    flipped = weight[:, :, ::-1, ::-1]  # rot180 of each filter's channel maps
    dx = np.zeros_like(x)
    for n in range(n_images):
        for f in range(n_filters):
            first = f // group_filters * group_channels  # filter f reads only its group's channels
            for c in range(first, first + group_channels):
                # Filter f's partial sensitivity map of channel c, added to the others.
                for i in range(h):
                    for j in range(w):
                        patch = delta_padded[n, f, i:i + span_h:dh, j:j + span_w:dw]  # (KH, KW)
                        dx[n, c, i, j] += np.sum(patch * flipped[f, c - first])

    # 3. Weight gradient: correlate the padded input with the expanded map.
    xp = _zero_pad(x, pads)
    dweight = np.zeros_like(weight)
    for n in range(n_images):
        for f in range(n_filters):
            first = f // group_filters * group_channels
            for a in range(kh):
                for b in range(kw):
                    patch = xp[n, first:first + group_channels, a * dh:a * dh + full_h, b * dw:b * dw + full_w]
                    dweight[f, :, a, b] += np.sum(patch * delta[n, f], axis=(1, 2))

    # 4. Bias gradient: each filter's bias touches every output of that filter.
    dbias = np.zeros(n_filters, dtype=x.dtype)
    for f in range(n_filters):
        dbias[f] = np.sum(dy[:, f])
    return dx, dweight, dbias


def conv_transpose2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                     stride: IntOrPair = 1, padding: IntOrPair = 0, output_padding: IntOrPair = 0,
                     groups: int = 1, dilation: IntOrPair = 1) -> np.ndarray:
    """Transposed convolution, one input pixel at a time: each pixel stamps the kernel.

    Input pixel ``x[n, ci, i, j]`` adds ``x[n, ci, i, j] * w[ci, co]`` onto the output
    window at rows ``i*S + u*D`` and columns ``j*S + v*D`` of the *uncropped* output, for
    every output channel ``co`` of its group; then ``padding`` rows and columns are cut
    from each side, and ``output_padding`` extra rows and columns (zeros plus bias, or
    what the stamps reached) are kept at the bottom and right.

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W)
    weight : ndarray, shape (C_in, C_out/groups, KH, KW)
    bias : ndarray, shape (C_out,), optional
    stride, padding, output_padding, groups, dilation : as PyTorch's ``conv_transpose2d``

    Returns
    -------
    y : ndarray, shape (N, C_out, OH, OW), ``OH = (H-1)*S - 2P + D*(KH-1) + output_padding + 1``
    """
    (sh, sw), pads, (dh, dw), (oh, ow) = conv_transpose_args(x, weight, bias, stride, padding,
                                                               output_padding, groups, dilation)
    n_images, c_in, h, w = x.shape
    _, group_out, kh, kw = weight.shape
    group_in = c_in // groups
    (pt, _), (pl, _) = pads
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    # The uncropped output, large enough for every stamp and for the requested size.
    full = np.zeros((n_images, group_out * groups, max((h - 1) * sh + span_h, pt + oh),
                     max((w - 1) * sw + span_w, pl + ow)), dtype=x.dtype)
    for n in range(n_images):
        for ci in range(c_in):
            first = ci // group_in * group_out  # the group's output channels
            for i in range(h):
                for j in range(w):
                    window = full[n, first:first + group_out, i * sh:i * sh + span_h:dh, j * sw:j * sw + span_w:dw]
                    window += x[n, ci, i, j] * weight[ci]
    y = full[:, :, pt:pt + oh, pl:pl + ow].copy()
    if bias is not None:
        for co in range(y.shape[1]):
            y[:, co] += bias[co]
    return y


def conv_transpose2d_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, stride: IntOrPair = 1,
                              padding: IntOrPair = 0, output_padding: IntOrPair = 0, groups: int = 1,
                              dilation: IntOrPair = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv_transpose2d`, read off its stamps one input pixel at a time.

    Each stamp ``y[window] += x[n, ci, i, j] * w[ci]`` gives ``dx[n, ci, i, j] = sum(dy[window]
    * w[ci])`` and ``dw[ci] += x[n, ci, i, j] * dy[window]``, with ``dy`` zero-padded back to
    the uncropped output; the bias gradient sums ``dy`` over N, H, W.

    Returns
    -------
    dx : (N, C_in, H, W), dweight : (C_in, C_out/groups, KH, KW), dbias : (C_out,)
    """
    (sh, sw), pads, (dh, dw), (oh, ow) = conv_transpose_args(x, weight, None, stride, padding,
                                                               output_padding, groups, dilation)
    check_array(dy, "dy", 4, "(N, C_out, OH, OW)")
    check_same_dtype(dy=dy, x=x, weight=weight)
    n_images, c_in, h, w = x.shape
    _, group_out, kh, kw = weight.shape
    check_shape(dy, "dy", (n_images, group_out * groups, oh, ow))
    group_in = c_in // groups
    (pt, _), (pl, _) = pads
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    full = np.zeros((n_images, group_out * groups, max((h - 1) * sh + span_h, pt + oh),
                     max((w - 1) * sw + span_w, pl + ow)), dtype=dy.dtype)
    full[:, :, pt:pt + oh, pl:pl + ow] = dy
    dx = np.zeros_like(x)
    dweight = np.zeros_like(weight)
    for n in range(n_images):
        for ci in range(c_in):
            first = ci // group_in * group_out
            for i in range(h):
                for j in range(w):
                    window = full[n, first:first + group_out, i * sh:i * sh + span_h:dh, j * sw:j * sw + span_w:dw]
                    dx[n, ci, i, j] = np.sum(window * weight[ci])
                    dweight[ci] += x[n, ci, i, j] * window
    dbias = np.zeros(group_out * groups, dtype=x.dtype)
    for co in range(len(dbias)):
        dbias[co] = np.sum(dy[:, co])
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------

def _pool_backward_args(dy: np.ndarray, x: np.ndarray, kernel_size: IntOrPair,
                        stride: IntOrPair | None, padding: IntOrPair):
    kernel, strides, pads, _ = pool_args(x, kernel_size, stride, padding)
    check_array(dy, "dy", 4, "(N, C, OH, OW)")
    check_same_dtype(dy=dy, x=x)
    (pt, pb), (pl, pr) = pads
    oh = _out_len(x.shape[2], pt, pb, kernel[0], strides[0], 1)
    ow = _out_len(x.shape[3], pl, pr, kernel[1], strides[1], 1)
    check_shape(dy, "dy", (x.shape[0], x.shape[1], oh, ow))
    return kernel, strides, pads, (oh, ow)


def max_pool2d(x: np.ndarray, kernel_size: IntOrPair, stride: IntOrPair | None = None,
               padding: IntOrPair = 0) -> np.ndarray:
    """Max pooling: each output is the largest value in its window.

    The tutorial's 2x2 max pooling, ``a[i, j] = max_{m,n} x[i*S + m, j*S + n]``,
    generalised to any kernel, stride and padding. Padding is ``-inf`` so it
    never wins.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        At most half the kernel.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW), dtype of ``x``
        ``OH = (H + 2P - K) // S + 1``, likewise ``OW``.
    """
    (kh, kw), (sh, sw), pads, _ = pool_args(x, kernel_size, stride, padding)
    n_images, n_channels, h, w = x.shape
    (pt, pb), (pl, pr) = pads
    oh, ow = _out_len(h, pt, pb, kh, sh, 1), _out_len(w, pl, pr, kw, sw, 1)
    xp = _zero_pad(x, pads, value=-np.inf)
    y = np.zeros((n_images, n_channels, oh, ow), dtype=x.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(oh):
                for j in range(ow):
                    y[n, c, i, j] = np.max(xp[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw])
    return y


def max_pool2d_backward(dy: np.ndarray, x: np.ndarray, kernel_size: IntOrPair,
                        stride: IntOrPair | None = None, padding: IntOrPair = 0) -> np.ndarray:
    """Max pooling backward: the error goes, unchanged, to the window's maximum.

    The tutorial's rule: "the next layer's error term is passed unchanged to
    the neuron holding the maximum of its block; all other neurons get 0",
    i.e. ``delta^{l-1}[k] = delta^l[i, j]`` if ``x[k]`` is the max of window
    ``(i, j)``, else 0. On ties the first maximum (row-major within the
    window) takes it; where windows overlap the contributions add up.

    Parameters
    ----------
    dy : ndarray, shape (N, C, OH, OW)
    x : ndarray, shape (N, C, H, W)
        The forward input.
    kernel_size, stride, padding
        As in :func:`max_pool2d`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``x``
    """
    (kh, kw), (sh, sw), pads, (oh, ow) = _pool_backward_args(dy, x, kernel_size, stride, padding)
    n_images, n_channels, h, w = x.shape
    (pt, _), (pl, _) = pads
    xp = _zero_pad(x, pads, value=-np.inf)
    dxp = np.zeros_like(xp)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(oh):
                for j in range(ow):
                    window = xp[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    a, b = divmod(int(np.argmax(window)), kw)  # first maximum
                    dxp[n, c, i * sh + a, j * sw + b] += dy[n, c, i, j]
    return dxp[:, :, pt:pt + h, pl:pl + w].copy()


def avg_pool2d(x: np.ndarray, kernel_size: IntOrPair, stride: IntOrPair | None = None,
               padding: IntOrPair = 0) -> np.ndarray:
    """Mean pooling: each output is the average of its window.

    The tutorial's mean pooling, ``a[i, j] = (1 / K^2) sum_{m,n} x[i*S + m, j*S + n]``;
    padded positions count as zeros in the mean (the divisor is always ``KH*KW``).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    kernel_size, stride, padding
        As in :func:`max_pool2d`.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW), dtype of ``x``
    """
    (kh, kw), (sh, sw), pads, _ = pool_args(x, kernel_size, stride, padding)
    n_images, n_channels, h, w = x.shape
    (pt, pb), (pl, pr) = pads
    oh, ow = _out_len(h, pt, pb, kh, sh, 1), _out_len(w, pl, pr, kw, sw, 1)
    xp = _zero_pad(x, pads)
    y = np.zeros((n_images, n_channels, oh, ow), dtype=x.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(oh):
                for j in range(ow):
                    y[n, c, i, j] = np.sum(xp[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw]) / (kh * kw)
    return y


def avg_pool2d_backward(dy: np.ndarray, x: np.ndarray, kernel_size: IntOrPair,
                        stride: IntOrPair | None = None, padding: IntOrPair = 0) -> np.ndarray:
    """Mean pooling backward: each error is shared equally by its window.

    The tutorial's rule: "the error term is divided evenly among all neurons
    of the block"; for stride = kernel and no padding this is its Kronecker
    form ``delta^{l-1} = delta^l (x) 1_{KxK} / K^2``. Where windows overlap the
    shares add up; shares that land on padding are dropped.

    Parameters
    ----------
    dy : ndarray, shape (N, C, OH, OW)
    x : ndarray, shape (N, C, H, W)
        The forward input (only its shape and dtype are used).
    kernel_size, stride, padding
        As in :func:`avg_pool2d`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), dtype of ``x``
    """
    (kh, kw), (sh, sw), pads, (oh, ow) = _pool_backward_args(dy, x, kernel_size, stride, padding)
    n_images, n_channels, h, w = x.shape
    (pt, _), (pl, _) = pads
    dxp = _zero_pad(np.zeros_like(x), pads)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(oh):
                for j in range(ow):
                    dxp[n, c, i * sh:i * sh + kh, j * sw:j * sw + kw] += dy[n, c, i, j] / (kh * kw)
    return dxp[:, :, pt:pt + h, pl:pl + w].copy()


# ---------------------------------------------------------------------------
# activations (elementwise; any shape)
# ---------------------------------------------------------------------------

def relu(x: np.ndarray) -> np.ndarray:
    """ReLU, the tutorial's ``f(x) = max(0, x)``. Same shape and dtype as ``x``."""
    _check_elementwise(x, "x")
    return np.where(x > 0, x, np.zeros_like(x))


def relu_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ReLU derivative ``f'(x) = 1 if x > 0 else 0`` times ``dy`` (0 at ``x == 0``)."""
    _check_elementwise_backward(dy, x)
    return np.where(x > 0, dy, np.zeros_like(dy))


def leaky_relu(x: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """Leaky ReLU ``f(x) = x if x > 0 else negative_slope * x``. Same shape and dtype."""
    _check_elementwise(x, "x")
    slope = real(negative_slope, "negative_slope")
    return np.where(x > 0, x, x * slope)


def leaky_relu_backward(dy: np.ndarray, x: np.ndarray, negative_slope: float = 0.01) -> np.ndarray:
    """Leaky ReLU derivative ``f'(x) = 1 if x > 0 else negative_slope`` times ``dy``."""
    _check_elementwise_backward(dy, x)
    slope = real(negative_slope, "negative_slope")
    return np.where(x > 0, dy, dy * slope)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Sigmoid ``f(x) = 1 / (1 + exp(-x))``. Same shape and dtype as ``x``.

    Written with ``exp(-|x|)`` so that no exponential overflows.
    """
    _check_elementwise(x, "x")
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + z), z / (1 + z))


def sigmoid_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sigmoid derivative ``f'(x) = f(x) * (1 - f(x))`` times ``dy``."""
    _check_elementwise_backward(dy, x)
    s = sigmoid(x)
    return dy * s * (1 - s)


def tanh(x: np.ndarray) -> np.ndarray:
    """Hyperbolic tangent ``f(x) = (e^x - e^-x) / (e^x + e^-x)``. Same shape and dtype."""
    _check_elementwise(x, "x")
    return np.tanh(x)


def tanh_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tanh derivative ``f'(x) = 1 - f(x)^2`` times ``dy``."""
    _check_elementwise_backward(dy, x)
    t = np.tanh(x)
    return dy * (1 - t * t)


def identity(x: np.ndarray) -> np.ndarray:
    """Identity ``f(x) = x`` (a copy, so the caller's array is never aliased)."""
    _check_elementwise(x, "x")
    return x.copy()


def identity_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Identity derivative ``f'(x) = 1``: returns a copy of ``dy``."""
    _check_elementwise_backward(dy, x)
    return dy.copy()


# ---------------------------------------------------------------------------
# batch normalization (channel by channel) and adaptive average pooling
# ---------------------------------------------------------------------------

def _bn_check(x: object, weight, bias, running_mean, running_var) -> None:
    ndim = x.ndim if isinstance(x, np.ndarray) and x.ndim in (2, 4) else 4
    check_array(x, "x", ndim, "(N, C, H, W) or (N, C)")
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if a is not None:
            check_array(a, name, 1, "(C,)")
            check_shape(a, name, (x.shape[1],))
            check_same_dtype(x=x, **{name: a})


def _channel_values(x: np.ndarray, c: int) -> np.ndarray:
    """All values of channel ``c`` (over the images and positions), as a flat float64 array."""
    return np.array([v for n in range(x.shape[0]) for v in np.ravel(x[n, c])], dtype=np.float64)


def _channel_stats(x: np.ndarray, c: int) -> tuple[float, float, int]:
    """Mean and biased variance of channel ``c``, summed one value at a time."""
    values = _channel_values(x, c)
    m = len(values)
    mean = 0.0
    for v in values:
        mean += v
    mean /= m
    var = 0.0
    for v in values:
        var += (v - mean) ** 2
    return mean, var / m, m


def batch_norm(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
               running_mean: np.ndarray | None, running_var: np.ndarray | None, training: bool,
               momentum: float = 0.1, eps: float = 1e-5) -> np.ndarray:
    """Batch normalization, one channel at a time (Ioffe & Szegedy 2015, Algorithm 1).

    For each channel ``c`` with values ``x_1..x_M`` (over images and positions)::

        mu = sum(x_i) / M,   var = sum((x_i - mu)^2) / M            (biased)
        y_i = (x_i - mu) / sqrt(var + eps) * weight[c] + bias[c]

    In training (and whenever there are no running estimates) the batch's ``mu`` and
    ``var`` are used, and the running estimates are updated in place as PyTorch does:
    ``running = (1 - momentum) * running + momentum * stat`` with the unbiased variance
    ``var * M / (M - 1)``. In eval mode the running estimates are used and not changed.
    """
    _bn_check(x, weight, bias, running_mean, running_var)
    y = np.zeros_like(x)
    for c in range(x.shape[1]):
        if training or running_mean is None:
            mu, var, m = _channel_stats(x, c)
            if training and running_mean is not None:
                running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mu
                running_var[c] = (1 - momentum) * running_var[c] + momentum * var * m / (m - 1)
        else:
            mu, var = float(running_mean[c]), float(running_var[c])
        gamma = 1.0 if weight is None else float(weight[c])
        beta = 0.0 if bias is None else float(bias[c])
        for n in range(x.shape[0]):
            y[n, c] = (x[n, c] - mu) / np.sqrt(var + eps) * gamma + beta
    return y


def batch_norm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray | None,
                        running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None,
                        training: bool = True, eps: float = 1e-5
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`batch_norm` by the chain rule through each step of the forward
    pass (not the fused formula), channel by channel::

        dx_hat = dy * weight
        dvar   = sum(dx_hat * (x - mu)) * -1/2 * (var + eps)^(-3/2)
        dmu    = -sum(dx_hat) / sqrt(var + eps) + dvar * sum(-2 (x - mu)) / M
        dx     = dx_hat / sqrt(var + eps) + dvar * 2 (x - mu) / M + dmu / M

    With running statistics (``training=False`` and running estimates given) ``mu`` and
    ``var`` are constants and only the first term remains. Returns ``dx, dweight, dbias``.
    """
    _bn_check(x, weight, None, running_mean, running_var)
    check_array(dy, "dy", x.ndim, "(shape of x)")
    check_shape(dy, "dy", x.shape)
    check_same_dtype(dy=dy, x=x)
    dx = np.zeros_like(x)
    dweight = np.zeros(x.shape[1], dtype=x.dtype)
    dbias = np.zeros(x.shape[1], dtype=x.dtype)
    for c in range(x.shape[1]):
        batch = training or running_mean is None
        if batch:
            mu, var, m = _channel_stats(x, c)
        else:
            mu, var, m = float(running_mean[c]), float(running_var[c]), None
        gamma = 1.0 if weight is None else float(weight[c])
        std = np.sqrt(var + eps)
        xs = [x[n, c].astype(np.float64) for n in range(x.shape[0])]
        gs = [dy[n, c].astype(np.float64) for n in range(x.shape[0])]
        dweight[c] = sum(float(np.sum(g * (v - mu) / std)) for g, v in zip(gs, xs))
        dbias[c] = sum(float(np.sum(g)) for g in gs)
        dxhat = [g * gamma for g in gs]
        if not batch:
            for n in range(x.shape[0]):
                dx[n, c] = dxhat[n] / std
            continue
        dvar = sum(float(np.sum(d * (v - mu))) for d, v in zip(dxhat, xs)) * -0.5 * (var + eps) ** -1.5
        dmu = -sum(float(np.sum(d)) for d in dxhat) / std + dvar * sum(float(np.sum(-2 * (v - mu))) for v in xs) / m
        for n in range(x.shape[0]):
            dx[n, c] = dxhat[n] / std + dvar * 2 * (xs[n] - mu) / m + dmu / m
    return dx, dweight, dbias


def _adaptive_window(i: int, size: int, out: int) -> tuple[int, int]:
    """PyTorch's adaptive window of output ``i``: ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    return (i * size) // out, -(-((i + 1) * size) // out)


def _output_size_pair(output_size: IntOrPair) -> tuple[int, int]:
    oh, ow = (output_size, output_size) if isinstance(output_size, (int, np.integer)) else output_size
    return int(oh), int(ow)


def adaptive_avg_pool2d(x: np.ndarray, output_size: IntOrPair) -> np.ndarray:
    """Adaptive average pooling: output ``(i, j)`` is the mean of its window, one at a time.

    With an output size that divides the input the windows are the tutorial's mean pooling
    with kernel = stride = ``H / OH``; ``output_size=1`` averages each whole map.
    """
    check_array(x, "x", 4, "(N, C, H, W)")
    oh, ow = _output_size_pair(output_size)
    n_images, n_channels, h, w = x.shape
    y = np.zeros((n_images, n_channels, oh, ow), dtype=x.dtype)
    for n in range(n_images):
        for c in range(n_channels):
            for i in range(oh):
                r0, r1 = _adaptive_window(i, h, oh)
                for j in range(ow):
                    c0, c1 = _adaptive_window(j, w, ow)
                    y[n, c, i, j] = np.mean(x[n, c, r0:r1, c0:c1])
    return y


def adaptive_avg_pool2d_backward(dy: np.ndarray, x: np.ndarray, output_size: IntOrPair) -> np.ndarray:
    """Each output's error divided evenly among its window's inputs (overlaps add up)."""
    check_array(x, "x", 4, "(N, C, H, W)")
    oh, ow = _output_size_pair(output_size)
    check_array(dy, "dy", 4, "(N, C, OH, OW)")
    check_shape(dy, "dy", x.shape[:2] + (oh, ow))
    check_same_dtype(dy=dy, x=x)
    dx = np.zeros_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(oh):
                r0, r1 = _adaptive_window(i, x.shape[2], oh)
                for j in range(ow):
                    c0, c1 = _adaptive_window(j, x.shape[3], ow)
                    dx[n, c, r0:r1, c0:c1] += dy[n, c, i, j] / ((r1 - r0) * (c1 - c0))
    return dx
