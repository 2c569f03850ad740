"""Bad input: a clear error naming the argument and its value, before any work."""

import numpy as np
import pytest

import convnet.functional as F
from convnet import reference

X = np.zeros((2, 3, 8, 8))
W = np.zeros((4, 3, 3, 3))
MODULES = pytest.mark.parametrize("mod", [F, reference], ids=["functional", "reference"])

CONV_BAD = [
    # (args, kwargs, exception, message pattern)
    ((np.zeros((3, 8, 8)), W), {}, ValueError, r"x must be 4-D .*\(3, 8, 8\)"),
    ((X, np.zeros((4, 3, 3))), {}, ValueError, r"weight must be 4-D"),
    ((X, np.zeros((4, 2, 3, 3))), {}, ValueError, r"channel mismatch.*C=3.*C=2"),
    ((X, np.zeros((4, 3, 11, 3))), {}, ValueError, r"kernel height extent 11.*padded input height 8"),
    ((X, np.zeros((4, 3, 3, 3))), {"dilation": 4}, ValueError, r"kernel height extent 9.*dilation=4"),
    ((X, W), {"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
    ((X, W), {"stride": (1, -2)}, ValueError, r"stride must be >= 1, got \(1, -2\)"),
    ((X, W), {"dilation": 0}, ValueError, r"dilation must be >= 1, got 0"),
    ((X, W), {"padding": -1}, ValueError, r"padding must be >= 0, got -1"),
    ((X, W), {"padding": "same", "stride": 2}, ValueError, r"padding='same' requires stride 1"),
    ((X, W), {"padding": "full"}, ValueError, r"padding must be .*'full'"),
    ((X, W), {"stride": 1.5}, TypeError, r"stride must be an int or a pair of ints, got 1.5"),
    ((X, W), {"stride": (1, 2, 3)}, TypeError, r"stride must be an int or a pair"),
    ((X.astype(np.int64), W), {}, TypeError, r"x must have dtype float32 or float64, got int64"),
    ((X.astype(np.complex128), W), {}, TypeError, r"x must have dtype float32 or float64, got complex128"),
    ((X.astype(np.float32), W), {}, TypeError, r"dtypes must match.*x=float32.*weight=float64"),
    ((X.tolist(), W), {}, TypeError, r"x must be a numpy ndarray, got list"),
    ((X, W, np.zeros(5)), {}, ValueError, r"bias must have shape \(4,\), got \(5,\)"),
    ((X, W), {"padding": 10**18}, ValueError, r"padding=1000000000000000000\).*more than this machine's memory"),
    ((X, W), {"padding": (0, 10**9)}, ValueError, r"output would have shape \(2, 4, 6, 2000000006\).*padding="),
]


@MODULES
@pytest.mark.parametrize("args, kwargs, exc, pattern", CONV_BAD)
def test_conv2d_rejects(mod, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mod.conv2d(*args, **kwargs)


@MODULES
def test_conv2d_backward_rejects_bad_dy(mod):
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 4, 6, 6\), got \(2, 4, 5, 5\)"):
        mod.conv2d_backward(np.zeros((2, 4, 5, 5)), X, W)
    with pytest.raises(TypeError, match=r"dtypes must match.*dy=float32"):
        mod.conv2d_backward(np.zeros((2, 4, 6, 6), np.float32), X, W)
    with pytest.raises(ValueError, match=r"dy must be 4-D"):
        mod.conv2d_backward(np.zeros((2, 4, 6)), X, W)


def test_conv2d_backward_rejects_unknown_method_and_algo():
    with pytest.raises(ValueError, match=r"method must be .*'fft'"):
        F.conv2d_backward(np.zeros((2, 4, 6, 6)), X, W, method="fft")
    with pytest.raises(ValueError, match=r"algo must be .*'winograd'"):
        F.conv2d(X, W, algo="winograd")
    with pytest.raises(ValueError, match=r"algo='taps' needs stride 1, got stride=\(2, 2\)"):
        F.conv2d(X, W, stride=2, algo="taps")


def test_leaky_relu_slope_is_validated():
    with pytest.raises(TypeError, match=r"negative_slope must be a real number, got 'a'"):
        F.leaky_relu(np.zeros(3), "a")
    with pytest.raises(TypeError, match=r"negative_slope must be a real number"):
        F.leaky_relu_backward(np.zeros(3), np.zeros(3), None)


POOL_BAD = [
    ((np.zeros((8, 8)), 2), {}, ValueError, r"x must be 4-D"),
    ((X, 0), {}, ValueError, r"kernel_size must be >= 1, got 0"),
    ((X, 2), {"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
    ((X, 2), {"padding": -1}, ValueError, r"padding must be >= 0, got -1"),
    ((X, 2), {"padding": 2}, ValueError, r"padding must be at most half of kernel_size, got padding=2"),
    ((X, 9), {}, ValueError, r"kernel height extent 9.*padded input height 8"),
    ((X.astype(np.int32), 2), {}, TypeError, r"x must have dtype float32 or float64, got int32"),
]


@MODULES
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("args, kwargs, exc, pattern", POOL_BAD)
def test_pool_rejects(mod, op, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        getattr(mod, op)(*args, **kwargs)


@MODULES
@pytest.mark.parametrize("op", ["max_pool2d_backward", "avg_pool2d_backward"])
def test_pool_backward_rejects_bad_dy(mod, op):
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 4, 4\), got \(2, 3, 3, 3\)"):
        getattr(mod, op)(np.zeros((2, 3, 3, 3)), X, 2)
    with pytest.raises(TypeError, match=r"dtypes must match"):
        getattr(mod, op)(np.zeros((2, 3, 4, 4), np.float32), X, 2)


def test_activation_and_loss_inputs():
    with pytest.raises(TypeError, match="x must be a float32 or float64 ndarray, got int64"):
        F.relu(np.arange(3))
    with pytest.raises(ValueError, match=r"dy must have shape \(3,\)"):
        F.relu_backward(np.zeros(4), np.zeros(3))
    with pytest.raises(TypeError, match="labels must be an integer ndarray"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values from 0 to 3"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"x has 4 features .* weight expects 3"):
        F.linear(np.zeros((2, 4)), np.zeros((5, 3)))


def test_errors_are_raised_before_any_work(monkeypatch):
    """Validation happens first: the core is never reached with bad arguments."""
    from convnet import core

    def boom(*a, **k):
        raise AssertionError("core called before validation")

    monkeypatch.setattr(core, "im2col", boom)
    monkeypatch.setattr(core, "pad2d", boom)
    with pytest.raises(ValueError, match="stride"):
        F.conv2d(X, W, stride=0)
    with pytest.raises(ValueError, match="dy must have shape"):
        F.conv2d_backward(np.zeros((1, 1, 1, 1)), X, W)
    with pytest.raises(ValueError, match="padding"):
        F.max_pool2d(X, 2, padding=3)
