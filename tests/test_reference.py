"""Tests of the loop reference (convnet.reference) against the tutorial and independent witnesses."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

import golden
from convnet import reference as R
from convnet._args import padding_pads
from convnet.gradcheck import check_backward

SETTINGS = settings(max_examples=30, deadline=None)
REFERENCE_PATH = Path(R.__file__)


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


# ---------------------------------------------------------------------------
# golden values from the tutorial
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_tutorial_example(dtype):
    x = golden.CONV_X[None].astype(dtype)
    w = golden.CONV_W.astype(dtype)
    b = golden.CONV_B.astype(dtype)
    y = R.conv2d(x, w, b, stride=golden.CONV_STRIDE, padding=golden.CONV_PADDING)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, golden.CONV_Y[None])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooling_tutorial_example(dtype):
    x = golden.POOL_X[None].astype(dtype)
    k, s = golden.POOL_KERNEL, golden.POOL_STRIDE
    np.testing.assert_array_equal(R.max_pool2d(x, k, s), golden.MAX_POOL_Y[None])
    np.testing.assert_array_equal(R.avg_pool2d(x, k, s), golden.AVG_POOL_Y[None])
    dy = golden.MAX_POOL_DY[None].astype(dtype)
    np.testing.assert_array_equal(R.max_pool2d_backward(dy, x, k, s), golden.MAX_POOL_DX[None])
    np.testing.assert_array_equal(R.avg_pool2d_backward(dy, x, k, s), golden.AVG_POOL_DX[None])


def test_conv2d_backward_hand_example():
    """Section 3.1.1: 3x3 input, 2x2 filter, stride 1; one-hot errors pick out W and the patch."""
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    w = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    dy = np.zeros((1, 1, 2, 2))
    dy[0, 0, 0, 0] = 1.0
    dx, dw, db = R.conv2d_backward(dy, x, w)
    np.testing.assert_array_equal(dx[0, 0], [[1, 2, 0], [3, 4, 0], [0, 0, 0]])
    np.testing.assert_array_equal(dw[0, 0], x[0, 0, :2, :2])
    np.testing.assert_array_equal(db, [1.0])
    dy = np.zeros((1, 1, 2, 2))
    dy[0, 0, 1, 1] = 2.0
    dx, dw, db = R.conv2d_backward(dy, x, w)
    np.testing.assert_array_equal(dx[0, 0], [[0, 0, 0], [0, 2, 4], [0, 6, 8]])
    np.testing.assert_array_equal(dw[0, 0], 2 * x[0, 0, 1:, 1:])
    np.testing.assert_array_equal(db, [2.0])


# ---------------------------------------------------------------------------
# conv2d forward against scipy.signal.correlate
# ---------------------------------------------------------------------------

@st.composite
def conv_cases(draw, max_n=2, max_c=3, max_f=3, max_k=4, max_s=3, max_d=3, max_p=5, max_extra=5,
               dtypes=(np.float32, np.float64)):
    """A random but valid conv2d problem: arrays plus arguments in every accepted form."""
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    sh, sw = draw(st.integers(1, max_s)), draw(st.integers(1, max_s))
    dh, dw = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    paddings = [st.integers(0, max_p), st.tuples(st.integers(0, max_p), st.integers(0, max_p)),
                st.just("valid")]
    if (sh, sw) == (1, 1):
        paddings.append(st.just("same"))
    padding = draw(st.one_of(*paddings))
    (pt, pb), (pl, pr) = padding_pads(padding, (kh, kw), (sh, sw), (dh, dw))
    min_h = max(1, dh * (kh - 1) + 1 - pt - pb)
    min_w = max(1, dw * (kw - 1) + 1 - pl - pr)
    h = draw(st.integers(min_h, min_h + max_extra))
    w = draw(st.integers(min_w, min_w + max_extra))
    n, c, f = draw(st.integers(1, max_n)), draw(st.integers(1, max_c)), draw(st.integers(1, max_f))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    case = {
        "x": rng.standard_normal((n, c, h, w)).astype(dtype),
        "weight": rng.standard_normal((f, c, kh, kw)).astype(dtype),
        "bias": rng.standard_normal(f).astype(dtype) if draw(st.booleans()) else None,
        "stride": sh if sh == sw and draw(st.booleans()) else (sh, sw),
        "padding": padding,
        "dilation": dh if dh == dw and draw(st.booleans()) else (dh, dw),
    }
    return case, ((pt, pb), (pl, pr)), (sh, sw), (dh, dw)


def scipy_conv2d(x, weight, bias, pads, stride, dilation):
    """Witness: scipy's N-d correlation on the explicitly padded input and dilated filters."""
    x, weight = x.astype(np.float64), weight.astype(np.float64)
    f, c, kh, kw = weight.shape
    (dh, dw), (sh, sw) = dilation, stride
    xp = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
    dilated = np.zeros((f, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    dilated[:, :, ::dh, ::dw] = weight
    # correlate over (C, H, W) with a (C, KH', KW') filter: "valid" leaves one channel, the sum.
    y = np.array([[signal.correlate(xp[i], dilated[j], mode="valid", method="direct")[0]
                   for j in range(f)] for i in range(x.shape[0])])
    y = y[:, :, ::sh, ::sw]
    if bias is not None:
        y = y + bias.astype(np.float64)[None, :, None, None]
    return y


@SETTINGS
@given(conv_cases())
def test_conv2d_matches_scipy_correlate(problem):
    case, pads, stride, dilation = problem
    before = {k: v.copy() for k, v in case.items() if isinstance(v, np.ndarray)}
    y = R.conv2d(**case)
    expected = scipy_conv2d(case["x"], case["weight"], case["bias"], pads, stride, dilation)
    assert y.dtype == case["x"].dtype
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, **_tol(case["x"].dtype))
    for k, v in before.items():
        np.testing.assert_array_equal(case[k], v)


# ---------------------------------------------------------------------------
# conv2d_backward against numerical gradients
# ---------------------------------------------------------------------------

def _check_conv_backward(x, weight, bias, stride, padding, dilation, seed=0):
    y = R.conv2d(x, weight, bias, stride, padding, dilation)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    before = (dy.copy(), x.copy(), weight.copy())
    dx, dw, db = R.conv2d_backward(dy, x, weight, stride, padding, dilation)
    for got, orig in zip((dy, x, weight), before):
        np.testing.assert_array_equal(got, orig)
    assert dx.shape == x.shape and dw.shape == weight.shape and db.shape == (weight.shape[0],)
    report = check_backward(
        lambda x, weight, bias: R.conv2d(x, weight, bias, stride, padding, dilation),
        {"x": x, "weight": weight, "bias": bias}, dy, {"x": dx, "weight": dw, "bias": db},
        rtol=1e-6, atol=1e-6)
    assert report.ok, str(report)
    return dx, dw, db


@settings(max_examples=25, deadline=None)
@given(conv_cases(max_n=2, max_c=2, max_f=2, max_k=3, max_s=3, max_d=2, max_p=4, max_extra=3,
                  dtypes=(np.float64,)))
def test_conv2d_backward_matches_numerical_gradient(problem):
    case, _, _, _ = problem
    bias = case["bias"] if case["bias"] is not None else np.zeros(case["weight"].shape[0])
    _check_conv_backward(case["x"], case["weight"], bias, case["stride"], case["padding"], case["dilation"])


@pytest.mark.parametrize("kernel, stride, padding, dilation, size", [
    ((1, 1), 1, 2, 1, (3, 3)),        # P > D*(K-1) = 0: the sensitivity map is cropped
    ((3, 2), 1, (4, 3), 1, (2, 3)),    # P >= K on both axes
    ((2, 3), (2, 3), 3, (2, 1), (4, 5)),  # P > D*(K-1) with stride and dilation
    ((2, 2), 1, "same", (1, 3), (5, 4)),  # odd D*(K-1): uneven "same" pads (0, 1), (1, 2)
    ((3, 3), 2, 0, 1, (2 * 2 + 3 + 1, 6)),  # non-dividing stride: trailing row unreached
])
def test_conv2d_backward_edge_geometries(kernel, stride, padding, dilation, size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2) + size)
    weight = rng.standard_normal((3, 2) + kernel)
    _check_conv_backward(x, weight, rng.standard_normal(3), stride, padding, dilation)


def test_conv2d_backward_unreached_rows_get_zero_gradient():
    # H=6, K=2, S=3: windows cover rows 0-1 and 3-4; rows 2 and 5 feed no output.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 6, 7))
    weight = rng.standard_normal((2, 2, 2, 2))
    dy = rng.standard_normal((1, 2, 2, 2))
    dx, _, _ = R.conv2d_backward(dy, x, weight, stride=3)
    assert np.all(dx[:, :, [2, 5], :] == 0)
    assert np.all(dx[:, :, :, [2, 5, 6]] == 0)
    assert np.all(dx[:, :, [0, 1, 3, 4], :][:, :, :, [0, 1, 3, 4]] != 0)


def test_conv2d_backward_float32_matches_float64():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6))
    weight = rng.standard_normal((4, 3, 3, 2))
    args = dict(stride=(2, 3), padding=(2, 1), dilation=(1, 2))
    dy = rng.standard_normal(R.conv2d(x, weight, **args).shape)
    assert dy.shape == (2, 4, 5, 2)  # (7 + 4 - 3) // 2 + 1, (6 + 2 - 3) // 3 + 1
    g64 = R.conv2d_backward(dy, x, weight, **args)
    g32 = R.conv2d_backward(dy.astype(np.float32), x.astype(np.float32), weight.astype(np.float32), **args)
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------

@st.composite
def pool_cases(draw, max_k=3, max_extra=4):
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    sh, sw = draw(st.integers(1, max_k + 1)), draw(st.integers(1, max_k + 1))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + max_extra))
    w = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + max_extra))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    stride = draw(st.sampled_from([None, (sh, sw)]))
    return (n, c, h, w), (kh, kw), stride, (ph, pw), draw(st.integers(0, 2**32 - 1))


def _distinct(shape, seed):
    """Values at least 0.5 apart, so a nudge of eps never changes which element is the max."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.5 - 3.0).astype(np.float64)


def _windows(x, kernel, stride, pads, fill):
    xp = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1]]


@SETTINGS
@given(pool_cases())
def test_pool_forward_matches_sliding_windows(problem):
    shape, kernel, stride, padding, seed = problem
    x = np.random.default_rng(seed).standard_normal(shape)
    s = kernel if stride is None else stride
    pads = ((padding[0],) * 2, (padding[1],) * 2)
    np.testing.assert_array_equal(R.max_pool2d(x, kernel, stride, padding),
                                  _windows(x, kernel, s, pads, -np.inf).max(axis=(-2, -1)))
    np.testing.assert_allclose(R.avg_pool2d(x, kernel, stride, padding),
                               _windows(x, kernel, s, pads, 0.0).sum(axis=(-2, -1)) / (kernel[0] * kernel[1]),
                               rtol=1e-12, atol=1e-12)


@SETTINGS
@given(pool_cases())
def test_pool_backward_matches_numerical_gradient(problem):
    shape, kernel, stride, padding, seed = problem
    x = _distinct(shape, seed)
    y = R.max_pool2d(x, kernel, stride, padding)
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape)
    for forward, backward in ((R.max_pool2d, R.max_pool2d_backward), (R.avg_pool2d, R.avg_pool2d_backward)):
        dx = backward(dy, x, kernel, stride, padding)
        report = check_backward(lambda x, forward=forward: forward(x, kernel, stride, padding), [x], dy, [dx],
                                rtol=1e-6, atol=1e-6)
        assert report.ok, f"{forward.__name__}:\n{report}"


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2), st.integers(0, 2), st.integers(0, 2**32 - 1))
def test_avg_pool_backward_is_tutorial_kronecker_form(kh, kw, bh, bw, rh, rw, seed):
    """Stride = kernel, no padding: delta^{l-1} = kron(delta^l, ones(KH, KW)) / (KH*KW)."""
    rh, rw = rh % kh, rw % kw  # leftover rows/cols that no window covers
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, bh * kh + rh, bw * kw + rw))
    dy = rng.standard_normal((2, 2, bh, bw))
    dx = R.avg_pool2d_backward(dy, x, (kh, kw))
    expected = np.zeros_like(x)
    expected[:, :, :bh * kh, :bw * kw] = np.kron(dy, np.ones((1, 1, kh, kw))) / (kh * kw)
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-15)


def test_max_pool_backward_ties_go_to_first_maximum():
    x = np.zeros((1, 1, 2, 3))
    dy = np.array([[[[5.0, 7.0]]]])
    dx = R.max_pool2d_backward(dy, x, 2, 1)
    # windows (cols 0-1) and (cols 1-2) both take their top-left element
    np.testing.assert_array_equal(dx[0, 0], [[5, 7, 0], [0, 0, 0]])


def test_max_pool_backward_accumulates_over_overlapping_windows():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 9.0  # in all four 2x2 windows at stride 1
    dy = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    dx = R.max_pool2d_backward(dy, x, 2, 1)
    expected = np.zeros((3, 3))
    expected[1, 1] = 10.0
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_max_pool_padding_never_wins():
    x = -np.ones((1, 1, 2, 2), dtype=np.float32) * 5
    y = R.max_pool2d(x, 2, 1, 1)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, -5 * np.ones((1, 1, 3, 3)))


def test_avg_pool_padding_counts_as_zero():
    x = np.ones((1, 1, 2, 2))
    y = R.avg_pool2d(x, 2, 2, 1)
    np.testing.assert_array_equal(y[0, 0], [[0.25, 0.25], [0.25, 0.25]])
    dx = R.avg_pool2d_backward(np.ones_like(y), x, 2, 2, 1)
    np.testing.assert_array_equal(dx[0, 0], 0.25 * np.ones((2, 2)))


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------

ACTIVATIONS = {
    "relu": (R.relu, R.relu_backward, lambda v: max(v, 0.0), lambda v: 1.0 if v > 0 else 0.0),
    "leaky_relu": (R.leaky_relu, R.leaky_relu_backward, lambda v: v if v > 0 else 0.01 * v,
                   lambda v: 1.0 if v > 0 else 0.01),
    "sigmoid": (R.sigmoid, R.sigmoid_backward, lambda v: 1 / (1 + np.exp(-v)),
                lambda v: np.exp(-v) / (1 + np.exp(-v)) ** 2),
    "tanh": (R.tanh, R.tanh_backward, np.tanh, lambda v: 1 - np.tanh(v) ** 2),
    "identity": (R.identity, R.identity_backward, lambda v: v, lambda v: 1.0),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_scalar_formulas_and_numerical_gradient(name):
    forward, backward, f, df = ACTIVATIONS[name]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4))
    x[np.abs(x) < 0.05] = 0.5  # stay clear of the kinks at 0
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(forward(x), np.vectorize(f)(x), rtol=1e-12, atol=1e-15)
    dx = backward(dy, x)
    np.testing.assert_allclose(dx, dy * np.vectorize(df)(x), rtol=1e-12, atol=1e-15)
    report = check_backward(forward, [x], dy, [dx], rtol=1e-6, atol=1e-8)
    assert report.ok, str(report)


def test_relu_gradient_is_zero_at_zero():
    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(R.relu_backward(np.ones(3), x), [0, 0, 1])
    np.testing.assert_array_equal(R.leaky_relu_backward(np.ones(3), x, 0.1), [0.1, 0.1, 1])


def test_leaky_relu_slope_argument():
    x = np.array([-2.0, 3.0], dtype=np.float32)
    y = R.leaky_relu(x, np.float64(0.5))  # a numpy float64 slope must not upcast
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [-1.0, 3.0])


def test_sigmoid_extremes_without_overflow():
    x = np.array([-1000.0, 0.0, 1000.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = R.sigmoid(x)
        dx = R.sigmoid_backward(np.ones_like(x), x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(dx, [0.0, 0.25, 0.0])


# ---------------------------------------------------------------------------
# dtype preservation and inputs left untouched, for every function
# ---------------------------------------------------------------------------

def _all_calls(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 2)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    dy_conv = rng.standard_normal((2, 4, 3, 3)).astype(dtype)  # stride 2, padding 1
    dy_pool = rng.standard_normal((2, 3, 4, 3)).astype(dtype)  # kernel 2, stride 2, padding 1
    dy_act = rng.standard_normal(x.shape).astype(dtype)
    calls = [
        ("conv2d", R.conv2d, (x, w, b, 2, 1)),
        ("conv2d_backward", R.conv2d_backward, (dy_conv, x, w, 2, 1)),
        ("max_pool2d", R.max_pool2d, (x, 2, 2, 1)),
        ("max_pool2d_backward", R.max_pool2d_backward, (dy_pool, x, 2, 2, 1)),
        ("avg_pool2d", R.avg_pool2d, (x, 2, 2, 1)),
        ("avg_pool2d_backward", R.avg_pool2d_backward, (dy_pool, x, 2, 2, 1)),
    ]
    for name, (forward, backward, _, _) in ACTIVATIONS.items():
        calls.append((name, forward, (x,)))
        calls.append((name + "_backward", backward, (dy_act, x)))
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_function_preserves_dtype_and_inputs(dtype):
    for name, fn, args in _all_calls(dtype):
        before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            assert o.dtype == dtype, name
            assert not any(o is a or np.shares_memory(o, a) for a in args if isinstance(a, np.ndarray)), name
        for a, b in zip(args, before):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b, err_msg=name)


# ---------------------------------------------------------------------------
# bad input: clear errors naming the argument
# ---------------------------------------------------------------------------

_x = np.zeros((1, 2, 5, 5))
_w = np.zeros((3, 2, 3, 3))
_x32 = _x.astype(np.float32)
_dy = np.zeros((1, 3, 3, 3))

BAD_INPUTS = [
    ("x wrong ndim", lambda: R.conv2d(_x[0], _w), ValueError, r"^x must be 4-D"),
    ("weight wrong ndim", lambda: R.conv2d(_x, _w[0]), ValueError, r"^weight must be 4-D"),
    ("x not an array", lambda: R.conv2d(_x.tolist(), _w), TypeError, r"^x must be a numpy ndarray"),
    ("channel mismatch", lambda: R.conv2d(_x, np.zeros((3, 1, 3, 3))), ValueError, r"channel mismatch"),
    ("bias shape", lambda: R.conv2d(_x, _w, np.zeros(2)), ValueError, r"^bias must have shape"),
    ("kernel too big", lambda: R.conv2d(_x, np.zeros((3, 2, 6, 3))), ValueError, r"kernel height"),
    ("dilated kernel too big", lambda: R.conv2d(_x, _w, dilation=(1, 3)), ValueError, r"kernel width"),
    ("stride 0", lambda: R.conv2d(_x, _w, stride=0), ValueError, r"^stride must be >= 1"),
    ("stride float", lambda: R.conv2d(_x, _w, stride=1.0), TypeError, r"^stride must be an int"),
    ("dilation 0", lambda: R.conv2d(_x, _w, dilation=(1, 0)), ValueError, r"^dilation must be >= 1"),
    ("negative padding", lambda: R.conv2d(_x, _w, padding=-1), ValueError, r"^padding must be >= 0"),
    ("unknown padding", lambda: R.conv2d(_x, _w, padding="full"), ValueError, r"^padding must be"),
    ("same with stride", lambda: R.conv2d(_x, _w, stride=2, padding="same"), ValueError, r"padding='same'"),
    ("integer x", lambda: R.conv2d(_x.astype(np.int64), _w), TypeError, r"^x must have dtype"),
    ("integer weight", lambda: R.conv2d(_x, _w.astype(np.int32)), TypeError, r"^weight must have dtype"),
    ("mixed dtypes", lambda: R.conv2d(_x32, _w), TypeError, r"x=float32, weight=float64"),
    ("mixed bias dtype", lambda: R.conv2d(_x, _w, np.zeros(3, np.float32)), TypeError, r"bias=float32"),
    ("dy wrong shape", lambda: R.conv2d_backward(_dy[:, :2], _x, _w), ValueError, r"^dy must have shape"),
    ("dy wrong ndim", lambda: R.conv2d_backward(_dy[0], _x, _w), ValueError, r"^dy must be 4-D"),
    ("dy mixed dtype", lambda: R.conv2d_backward(_dy.astype(np.float32), _x, _w), TypeError, r"dy=float32"),
    ("dy integer", lambda: R.conv2d_backward(_dy.astype(int), _x, _w), TypeError, r"^dy must have dtype"),
    ("backward stride 0", lambda: R.conv2d_backward(_dy, _x, _w, stride=0), ValueError, r"^stride"),
    ("pool x ndim", lambda: R.max_pool2d(_x[0], 2), ValueError, r"^x must be 4-D"),
    ("pool kernel 0", lambda: R.avg_pool2d(_x, 0), ValueError, r"^kernel_size must be >= 1"),
    ("pool kernel too big", lambda: R.max_pool2d(_x, 6), ValueError, r"kernel height"),
    ("pool stride 0", lambda: R.max_pool2d(_x, 2, 0), ValueError, r"^stride must be >= 1"),
    ("pool padding > half", lambda: R.avg_pool2d(_x, 2, 2, 2), ValueError, r"^padding must be at most half"),
    ("pool negative padding", lambda: R.max_pool2d(_x, 2, 2, -1), ValueError, r"^padding must be >= 0"),
    ("pool string padding", lambda: R.max_pool2d(_x, 2, 2, "same"), TypeError, r"^padding for pooling"),
    ("pool integer x", lambda: R.max_pool2d(_x.astype(int), 2), TypeError, r"^x must have dtype"),
    ("pool dy shape", lambda: R.max_pool2d_backward(np.zeros((1, 2, 3, 3)), _x, 2), ValueError,
     r"^dy must have shape \(1, 2, 2, 2\)"),
    ("pool dy dtype", lambda: R.avg_pool2d_backward(np.zeros((1, 2, 2, 2), np.float32), _x, 2), TypeError,
     r"dy=float32"),
    ("act integer x", lambda: R.relu(np.arange(3)), TypeError, r"^x must have dtype"),
    ("act list x", lambda: R.tanh([1.0]), TypeError, r"^x must be a numpy ndarray"),
    ("act dy shape", lambda: R.sigmoid_backward(np.zeros(3), np.zeros(4)), ValueError, r"^dy must have shape"),
    ("act dy dtype", lambda: R.relu_backward(np.zeros(3, np.float32), np.zeros(3)), TypeError, r"dy=float32"),
    ("act slope", lambda: R.leaky_relu(np.zeros(3), "0.1"), TypeError, r"^negative_slope"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------
# independence from the vectorized engine
# ---------------------------------------------------------------------------

def test_reference_source_imports_only_numpy_and_args():
    tree = ast.parse(REFERENCE_PATH.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "typing", "numpy", "convnet._args"}, imported


def test_reference_runs_with_core_and_functional_blocked():
    """Import convnet.reference in a fresh interpreter where convnet.core/functional cannot load."""
    code = f"""
import sys, types
pkg = types.ModuleType("convnet")
pkg.__path__ = [{str(REFERENCE_PATH.parent)!r}]  # skip convnet/__init__, whatever it imports
sys.modules["convnet"] = pkg
sys.modules["convnet.core"] = None        # any import of these now raises ImportError
sys.modules["convnet.functional"] = None
import numpy as np
import convnet.reference as R
y = R.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))
assert y.shape == (1, 1, 2, 2) and (y == 4).all()
loaded = sorted(m for m in sys.modules if m.startswith("convnet") and sys.modules[m] is not None)
print(",".join(loaded))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "convnet,convnet._args,convnet.reference"
