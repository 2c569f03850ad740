"""Batch norm and adaptive average pooling against the loop reference, numerical gradients
and PyTorch's documented semantics."""

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convnet.functional as F
from convnet import reference as R
from convnet.gradcheck import check_backward
from strategies import readonly, tol

PROPS = settings(max_examples=60, deadline=None)


@dataclass(frozen=True)
class BNCase:
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    training: bool
    momentum: float
    eps: float

    def running(self):
        """Fresh writeable copies of the running estimates (the op updates them in place)."""
        if self.running_mean is None:
            return None, None
        return self.running_mean.copy(), self.running_var.copy()


@st.composite
def bn_cases(draw, dtypes=(np.float64, np.float32), max_n: int = 4, max_hw: int = 5) -> BNCase:
    four_d = draw(st.booleans())
    n, c = draw(st.integers(1, max_n)), draw(st.integers(1, 3))
    shape = (n, c) + ((draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))) if four_d else ())
    training = draw(st.booleans())
    tracked = draw(st.booleans())
    if (training or not tracked) and int(np.prod(shape)) // c < 2:
        shape = (n + 1,) + shape[1:]  # batch statistics need two values per channel
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0.0, 3.0]))  # a mean far from 0 tests the centring
    affine = draw(st.booleans())
    x = rng.standard_normal(shape) * draw(st.sampled_from([0.5, 1.0, 4.0])) + offset
    return BNCase(
        x=readonly(x.astype(dtype)), dy=readonly(rng.standard_normal(shape).astype(dtype)),
        weight=readonly(rng.uniform(0.5, 2.0, c).astype(dtype)) if affine else None,
        bias=readonly(rng.standard_normal(c).astype(dtype)) if affine else None,
        running_mean=rng.standard_normal(c).astype(dtype) if tracked else None,
        running_var=rng.uniform(0.5, 2.0, c).astype(dtype) if tracked else None,
        training=training, momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.37])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
    )


def forward(case, rm, rv, impl=F):
    return impl.batch_norm(case.x, case.weight, case.bias, rm, rv, case.training, case.momentum, case.eps)


# ----------------------------------------------------------------------------- batch norm

@PROPS
@given(bn_cases())
def test_batch_norm_matches_reference_with_running_updates(case):
    rm, rv = case.running()
    rm_ref, rv_ref = case.running()
    y = forward(case, rm, rv)
    want = forward(case, rm_ref, rv_ref, impl=R)
    assert y.dtype == case.x.dtype and y.shape == case.x.shape
    np.testing.assert_allclose(y, want, **tol(y.dtype))
    if rm is not None:
        assert rm.dtype == case.x.dtype and rv.dtype == case.x.dtype
        np.testing.assert_allclose(rm, rm_ref, **tol(y.dtype))
        np.testing.assert_allclose(rv, rv_ref, **tol(y.dtype))
        if not case.training:  # eval mode never touches them
            np.testing.assert_array_equal(rm, case.running_mean)
            np.testing.assert_array_equal(rv, case.running_var)


def dx_tol(case, stats) -> dict:
    """``tol``, widened for ill-conditioned channels: dx subtracts two nearly equal terms when
    a channel's spread is small next to its values (2 values 0.04 apart near 3.4 gave 1.5e-4
    in float32), so its rounding error grows with ``max|x| / std`` times ``inv_std * max|dy|``."""
    t = tol(case.x.dtype)
    eps = np.finfo(case.x.dtype).eps
    spread = np.max(np.abs(case.x)) * np.max(stats.inv_std)  # max|x| / min std
    bound = 10 * eps * spread * np.max(stats.inv_std) * np.max(np.abs(case.dy))
    return {"rtol": t["rtol"], "atol": max(t["atol"], float(bound))}


@PROPS
@given(bn_cases(), st.booleans())
def test_batch_norm_backward_matches_reference(case, input_grad):
    rm, rv = case.running()
    _, stats = F.batch_norm_with_stats(case.x, case.weight, case.bias, rm, rv, case.training,
                                       case.momentum, case.eps)
    rm, rv = case.running()  # the reference differentiates at the statistics forward used
    got = F.batch_norm_backward(case.dy, case.x, case.weight, stats, input_grad=input_grad)
    want = R.batch_norm_backward(case.dy, case.x, case.weight, rm, rv, case.training, case.eps)
    if input_grad:
        assert got[0].dtype == case.x.dtype
        np.testing.assert_allclose(got[0], want[0], err_msg="dx", **dx_tol(case, stats))
    else:
        assert got[0] is None
    for name, g, r in zip(("dweight", "dbias"), got[1:], want[1:]):
        assert g.dtype == case.x.dtype and g.shape == (case.x.shape[1],)
        np.testing.assert_allclose(g, r, err_msg=name, **tol(case.x.dtype))


@settings(max_examples=30, deadline=None)
@given(bn_cases(dtypes=(np.float64,), max_n=3, max_hw=3))
def test_batch_norm_gradients_match_numerical(case):
    weight = case.weight if case.weight is not None else np.ones(case.x.shape[1])
    bias = case.bias if case.bias is not None else np.zeros(case.x.shape[1])
    _, stats = F.batch_norm_with_stats(case.x, weight, bias, *case.running(), case.training,
                                       case.momentum, case.eps)
    dx, dw, db = F.batch_norm_backward(case.dy, case.x, weight, stats)

    def f(x, weight, bias):
        return F.batch_norm(x, weight, bias, *case.running(), case.training, case.momentum, case.eps)

    report = check_backward(f, {"x": case.x, "weight": weight, "bias": bias}, case.dy,
                            {"x": dx, "weight": dw, "bias": db}, rtol=1e-5, atol=1e-6)
    assert report.ok, report


def test_batch_norm_follows_pytorch_momentum_and_unbiased_running_variance():
    # One channel with values 1, 2, 3, 4: mean 2.5, biased variance 1.25, unbiased 5/3.
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(4, 1)
    rm, rv = np.zeros(1), np.ones(1)
    y = F.batch_norm(x, None, None, rm, rv, True, momentum=0.1, eps=0.0 + 1e-12)
    np.testing.assert_allclose(y[:, 0], (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25), rtol=1e-9)
    np.testing.assert_allclose(rm, [0.9 * 0 + 0.1 * 2.5])
    np.testing.assert_allclose(rv, [0.9 * 1 + 0.1 * 5 / 3])
    # Eval mode normalizes with the running estimates and leaves them alone.
    y_eval = F.batch_norm(x, np.array([2.0]), np.array([1.0]), rm, rv, False, eps=1e-5)
    np.testing.assert_allclose(y_eval[:, 0], (np.array([1, 2, 3, 4]) - 0.25) / np.sqrt(rv[0] + 1e-5) * 2 + 1)
    np.testing.assert_allclose(rm, [0.25])


def _torch():
    try:
        import torch
    except Exception:  # not installed, or a broken install: the other tests pin the semantics
        return None
    return torch


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_agrees_with_torch(rng, shape, training):
    torch = _torch()
    if torch is None:
        pytest.skip("torch not available")
    x = rng.standard_normal(shape) * 2 + 1
    c = shape[1]
    w, b = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    tx = torch.tensor(x, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training, 0.3, 1e-4)
    dy = rng.standard_normal(shape)
    ty.backward(torch.tensor(dy))
    y, stats = F.batch_norm_with_stats(x, w, b, rm, rv, training, 0.3, 1e-4)
    dx, dw, db = F.batch_norm_backward(dy, x, w, stats)
    for got, want in ((y, ty), (rm, trm), (rv, trv), (dx, tx.grad), (dw, tw.grad), (db, tb.grad)):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-9, atol=1e-9)


def test_batch_norm_is_accurate_far_from_zero():
    """Centred sums: a mean 1e4 times the spread still normalizes in float32."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((64, 2, 8, 8))).astype(np.float32)
    y = F.batch_norm(x, None, None, None, None, True)
    want = R.batch_norm(x.astype(np.float64), None, None, None, None, True)
    np.testing.assert_allclose(y, want, atol=2e-3)
    assert abs(float(y.astype(np.float64).std()) - 1.0) < 1e-3


def test_batch_norm_blocks_do_not_change_results(monkeypatch, rng):
    x = rng.standard_normal((9, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    y, stats = F.batch_norm_with_stats(x, w, b, None, None, True)
    grads = F.batch_norm_backward(dy, x, w, stats)
    monkeypatch.setattr(F, "BATCH_NORM_BLOCK_BYTES", 1)  # one image per block
    y1, stats1 = F.batch_norm_with_stats(x, w, b, None, None, True)
    np.testing.assert_allclose(y1, y, rtol=1e-12, atol=1e-12)
    for g, g1 in zip(grads, F.batch_norm_backward(dy, x, w, stats1)):
        np.testing.assert_allclose(g1, g, rtol=1e-12, atol=1e-12)


def test_batch_norm_accepts_strided_inputs(rng):
    x = rng.standard_normal((4, 6, 5, 8))[:, ::2, :, ::2]
    dy = rng.standard_normal((4, 3, 5, 4, 2))[..., 0]
    y, stats = F.batch_norm_with_stats(x, None, None, None, None, True)
    np.testing.assert_allclose(y, R.batch_norm(np.ascontiguousarray(x), None, None, None, None, True),
                               rtol=1e-10, atol=1e-10)
    for g, r in zip(F.batch_norm_backward(dy, x, None, stats),
                    R.batch_norm_backward(np.ascontiguousarray(dy), np.ascontiguousarray(x), None)):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)


X4 = np.zeros((2, 3, 4, 4))
C3 = np.zeros(3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=[[1.0, 2.0]]), TypeError, "x must be a numpy ndarray"),
    (dict(x=np.zeros((2, 3, 4))), ValueError, r"x must be 2-D \(N, C\) or 4-D"),
    (dict(x=np.zeros((2, 3), np.int64)), TypeError, "x must have dtype float32 or float64"),
    (dict(weight=np.zeros(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(bias=np.zeros(3, np.float32)), TypeError, "dtypes must match"),
    (dict(running_mean=C3, running_var=None), ValueError, "running_mean and running_var must be given together"),
    (dict(running_var=np.zeros((3, 1))), ValueError, "running_var must be 1-D"),
    (dict(training=1), TypeError, "training must be True or False"),
    (dict(momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\]"),
    (dict(momentum=None), TypeError, r"momentum must be a number in \[0, 1\], got None"),
    (dict(eps=0.0), ValueError, "eps must be a positive finite number"),
    (dict(x=np.zeros((1, 3))), ValueError, "more than 1 value per channel"),
    (dict(running_mean=readonly(C3), running_var=np.ones(3)), ValueError, "running_mean must be writeable"),
])
def test_batch_norm_rejects_bad_arguments(kwargs, error, match):
    args = dict(x=X4, weight=None, bias=None, running_mean=None, running_var=None, training=True)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        F.batch_norm(**args)


def test_batch_norm_backward_rejects_bad_arguments(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    _, stats = F.batch_norm_with_stats(x, None, None, None, None, True)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 4, 4\)"):
        F.batch_norm_backward(np.zeros((2, 3, 4, 5)), x, None, stats)
    with pytest.raises(ValueError, match="stats must be the BatchNormStats"):
        F.batch_norm_backward(np.zeros_like(x), x, None, (0, 1))
    with pytest.raises(TypeError, match="dtypes must match"):
        F.batch_norm_backward(np.zeros_like(x, np.float32), x, None, stats)


# ----------------------------------------------------------------------------- adaptive pooling

@st.composite
def adaptive_cases(draw, dtypes=(np.float64, np.float32), dividing: bool = False):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    if dividing:
        oh, ow = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        h, w = oh * draw(st.integers(1, 3)), ow * draw(st.integers(1, 3))
    else:
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        oh, ow = draw(st.integers(1, h + 2)), draw(st.integers(1, w + 2))
    size = draw(st.sampled_from([(oh, ow), oh])) if oh == ow else (oh, ow)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = readonly(rng.standard_normal((n, c, h, w)).astype(dtype))
    dy = readonly(rng.standard_normal((n, c, oh, ow)).astype(dtype))
    return x, dy, size


@PROPS
@given(adaptive_cases())
def test_adaptive_avg_pool_matches_reference(case):
    x, dy, size = case
    y = F.adaptive_avg_pool2d(x, size)
    dx = F.adaptive_avg_pool2d_backward(dy, x, size)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == dy.shape and dx.shape == x.shape
    np.testing.assert_allclose(y, R.adaptive_avg_pool2d(x, size), **tol(x.dtype))
    np.testing.assert_allclose(dx, R.adaptive_avg_pool2d_backward(dy, x, size), **tol(x.dtype))


@PROPS
@given(adaptive_cases(dividing=True))
def test_adaptive_avg_pool_is_mean_pooling_when_the_size_divides(case):
    x, dy, size = case
    oh, ow = dy.shape[2:]
    k = (x.shape[2] // oh, x.shape[3] // ow)
    np.testing.assert_allclose(F.adaptive_avg_pool2d(x, size), F.avg_pool2d(x, k), **tol(x.dtype))
    np.testing.assert_allclose(F.adaptive_avg_pool2d_backward(dy, x, size), F.avg_pool2d_backward(dy, x, k),
                               **tol(x.dtype))


@settings(max_examples=30, deadline=None)
@given(adaptive_cases(dtypes=(np.float64,)))
def test_adaptive_avg_pool_gradient_matches_numerical(case):
    x, dy, size = case
    report = check_backward(lambda x: F.adaptive_avg_pool2d(x, size), {"x": x}, dy,
                            {"x": F.adaptive_avg_pool2d_backward(dy, x, size)}, rtol=1e-6, atol=1e-7)
    assert report.ok, report


def test_global_average_pooling(rng):
    x = rng.standard_normal((3, 4, 7, 5)).astype(np.float32)
    y = F.adaptive_avg_pool2d(x, 1)
    assert y.shape == (3, 4, 1, 1) and y.dtype == np.float32
    np.testing.assert_allclose(y[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-6)


@pytest.mark.parametrize("size, error, match", [
    (0, ValueError, "output_size must be >= 1"),
    ((2, 2, 2), TypeError, "output_size must be an int or a pair"),
    (1.5, TypeError, "output_size must be an int or a pair"),
])
def test_adaptive_avg_pool_rejects_bad_sizes(size, error, match):
    with pytest.raises(error, match=match):
        F.adaptive_avg_pool2d(np.zeros((1, 1, 4, 4)), size)
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.adaptive_avg_pool2d(np.zeros((4, 4)), 1)
