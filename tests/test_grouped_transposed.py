"""Grouped (and depthwise) convolution and transposed convolution against their loop
twins in convnet.reference, numerical gradients, the adjoint identity and PyTorch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convnet.functional as F
from convnet import reference
from convnet.gradcheck import check_backward
from strategies import grouped_cases, tol

PROPS = settings(max_examples=60, deadline=None)
FEW = settings(max_examples=20, deadline=None)


def assert_close(got, want, name=""):
    assert got.dtype == want.dtype, name
    np.testing.assert_allclose(got, want, err_msg=name, **tol(got.dtype))


# ----------------------------------------------------------------------------- grouped conv2d

@PROPS
@given(grouped_cases(), st.sampled_from(["auto", "zero_insert", "col2im"]))
def test_grouped_conv_matches_the_loop_twin(case, method):
    kw = case.kwargs
    y = F.conv2d(case.x, case.weight, case.bias, **kw)
    assert_close(y, reference.conv2d(case.x, case.weight, case.bias, **kw), "y")
    y2, cache = F.conv2d_with_cache(case.x, case.weight, case.bias, **kw)
    np.testing.assert_array_equal(y, y2)
    groups = kw.pop("groups")
    want = reference.conv2d_backward(case.dy, case.x, case.weight, **kw, groups=groups)
    for c in (cache, None):
        got = F.conv2d_backward(case.dy, case.x, case.weight, **kw, cache=c, method=method, groups=groups)
        for name, g, r in zip(("dx", "dweight", "dbias"), got, want):
            assert g.shape == r.shape, name
            assert_close(g, r, name)


@FEW
@given(grouped_cases(dtypes=(np.float64,), max_hw=5))
def test_grouped_conv_gradients_match_numerical(case):
    kw = case.kwargs
    groups = kw.pop("groups")
    dx, dw, db = F.conv2d_backward(case.dy, case.x, case.weight, **kw, groups=groups)
    report = check_backward(lambda x, weight, bias: F.conv2d(x, weight, bias, **kw, groups=groups),
                            {"x": case.x, "weight": case.weight, "bias": case.bias}, case.dy,
                            {"x": dx, "weight": dw, "bias": db}, rtol=1e-5, atol=1e-6)
    assert report.ok, report


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_is_one_filter_bank_per_channel(rng, stride, multiplier):
    """groups=C: output channel f is input channel f // multiplier correlated with its own filters."""
    c = 5
    x = rng.standard_normal((2, c, 9, 8))
    w = rng.standard_normal((c * multiplier, 1, 3, 3))
    y = F.conv2d(x, w, None, stride, 1, 1, c)
    for f in range(c * multiplier):
        alone = F.conv2d(x[:, f // multiplier:f // multiplier + 1], w[f:f + 1], None, stride, 1)
        np.testing.assert_allclose(y[:, f:f + 1], alone, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for g, r in zip(F.conv2d_backward(dy, x, w, stride, 1, groups=c),
                    reference.conv2d_backward(dy, x, w, stride, 1, groups=c)):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": 4}, r"groups=4 must divide both C \(the input channels\)=6 and F \(the filters\)=9"),
    ({"groups": 3, "weight": (8, 2, 3, 3)}, r"groups=3 must divide both .*C.*=6 and F.*=8"),
    ({"groups": 2, "weight": (8, 2, 3, 3)}, r"with groups=2 weight must have C/groups=3 channels, got 2"),
    ({"groups": 0}, r"groups must be a positive int, got 0"),
])
def test_bad_groups_are_rejected_naming_both_counts(kwargs, message):
    x = np.zeros((1, 6, 5, 5))
    w = np.zeros(kwargs.pop("weight", (9, 2, 3, 3)))
    for call in (lambda: F.conv2d(x, w, **kwargs), lambda: reference.conv2d(x, w, **kwargs)):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=message):
        F.conv2d_backward(np.zeros((1, w.shape[0], 3, 3)), x, w, **kwargs)


def test_taps_does_not_take_groups():
    x, w = np.zeros((1, 4, 5, 5)), np.zeros((4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"algo='taps' does not take groups > 1"):
        F.conv2d(x, w, groups=2, algo="taps")
    with pytest.raises(ValueError, match=r"algo='taps' does not take groups > 1"):
        F.conv2d_backward(np.zeros((1, 4, 3, 3)), x, w, groups=2, algo="taps")


# ----------------------------------------------------------------------------- conv_transpose2d

@PROPS
@given(grouped_cases("transpose"))
def test_conv_transpose_matches_the_loop_twin(case):
    y = F.conv_transpose2d(case.x, case.weight, case.bias, **case.kwargs)
    assert y.shape == case.dy.shape
    assert_close(y, reference.conv_transpose2d(case.x, case.weight, case.bias, **case.kwargs), "y")
    got = F.conv_transpose2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    want = reference.conv_transpose2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    for name, g, r, a in zip(("dx", "dweight", "dbias"), got, want, (case.x, case.weight, case.bias)):
        assert g.shape == a.shape, name
        assert_close(g, r, name)
    none, dw, db = F.conv_transpose2d_backward(case.dy, case.x, case.weight, **case.kwargs, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw, got[1])


@FEW
@given(grouped_cases("transpose", dtypes=(np.float64,)))
def test_conv_transpose_gradients_match_numerical(case):
    kw = case.kwargs
    dx, dw, db = F.conv_transpose2d_backward(case.dy, case.x, case.weight, **kw)
    report = check_backward(lambda x, weight, bias: F.conv_transpose2d(x, weight, bias, **kw),
                            {"x": case.x, "weight": case.weight, "bias": case.bias}, case.dy,
                            {"x": dx, "weight": dw, "bias": db}, rtol=1e-5, atol=1e-6)
    assert report.ok, report


@PROPS
@given(grouped_cases("transpose", dtypes=(np.float64,)))
def test_conv_transpose_is_the_adjoint_of_conv2d(case):
    """<conv2d(z, w), x> == <z, conv_transpose2d(x, w)> for every z of the transpose's output shape.

    With ``output_padding >= stride`` (allowed when the dilation is larger), conv2d of z has
    more windows than x has pixels; the transpose is the adjoint of conv2d cut to x's size.
    """
    kw = dict(case.kwargs)
    kw.pop("output_padding")
    z = np.random.default_rng(7).standard_normal(case.dy.shape)
    h, w = case.x.shape[2:]
    lhs = np.vdot(F.conv2d(z, case.weight, None, **kw)[:, :, :h, :w], case.x)
    rhs = np.vdot(z, F.conv_transpose2d(case.x, case.weight, None, **case.kwargs))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_forward_is_conv2d_input_gradient(rng, groups):
    """One code path: the transpose of x equals conv2d_backward's dx with dy = x."""
    w = rng.standard_normal((4, 6 // groups, 3, 3))  # conv2d weight (F=4, C/G, KH, KW), C = 6
    z = rng.standard_normal((2, 6, 11, 11))  # conv2d input, stride 2, padding 1: output 6x6
    x = rng.standard_normal(F.conv2d(z, w, None, 2, 1, groups=groups).shape)  # conv2d's dy
    for method in ("zero_insert", "col2im"):
        dx = F.conv2d_backward(x, z, w, 2, 1, method=method, groups=groups)[0]
        np.testing.assert_allclose(F.conv_transpose2d(x, w, None, 2, 1, 0, groups), dx, rtol=1e-12, atol=1e-12)


def test_conv_transpose_keeps_dtype_and_never_modifies_inputs(rng):
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 4, 3, 3)).astype(dtype)
        w = rng.standard_normal((4, 3, 2, 2)).astype(dtype)
        b = rng.standard_normal(6).astype(dtype)
        before = [a.copy() for a in (x, w, b)]
        for a in (x, w, b):
            a.flags.writeable = False
        y = F.conv_transpose2d(x, w, b, 2, 0, 1, 2)
        assert y.dtype == dtype and y.shape == (2, 6, 7, 7)
        grads = F.conv_transpose2d_backward(np.ones_like(y), x, w, 2, 0, 1, 2)
        assert all(g.dtype == dtype for g in grads)
        for a, b0 in zip((x, w, b), before):
            np.testing.assert_array_equal(a, b0)


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"output_padding": 2, "stride": 2}, ValueError, r"output_padding must be smaller than stride or dilation"),
    ({"output_padding": 1}, ValueError, r"output_padding must be smaller"),
    ({"padding": "same"}, TypeError, r"padding of a transposed convolution must be an int or a pair"),
    ({"padding": 4}, ValueError, r"padding=4 leaves no output height"),
    ({"groups": 3}, ValueError, r"groups=3 must divide C_in=4"),
    ({"weight": (5, 3, 2, 2)}, ValueError, r"channel mismatch: x has C_in=4 .* expects C_in=5"),
    ({"bias": 5}, ValueError, r"bias must have shape \(3,\) \(C_out\), got \(5,\)"),
    ({"padding": 10**18}, ValueError, r"padding=10+ leaves no output"),
    ({"stride": 10**12}, ValueError, r"output would have shape .*more than this machine's memory"),
])
def test_conv_transpose_rejects_bad_arguments(kwargs, exc, message):
    x = np.zeros((1, 4, 3, 3))
    w = np.zeros(kwargs.pop("weight", (4, 3, 2, 2)))
    b = np.zeros(kwargs.pop("bias")) if "bias" in kwargs else None
    for mod in (F, reference):
        with pytest.raises(exc, match=message):
            mod.conv_transpose2d(x, w, b, **kwargs)


# ----------------------------------------------------------------------------- against PyTorch

@pytest.mark.parametrize("stride, padding, output_padding, groups, dilation", [
    (1, 0, 0, 1, 1), (2, 1, 1, 1, 1), (3, 2, 2, 2, 1), (2, 0, 0, 4, 1), (1, 1, 1, 2, 2), ((2, 1), (1, 0), (1, 0), 1, 1),
])
def test_conv_transpose_and_grouped_conv_match_torch(rng, stride, padding, output_padding, groups, dilation):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    x = rng.standard_normal((2, 4, 5, 6))
    w = rng.standard_normal((4, 6 // groups if 6 % groups == 0 else 2, 3, 3))
    b = rng.standard_normal(w.shape[1] * groups)
    args = (stride, padding, output_padding, groups, dilation)
    y = F.conv_transpose2d(x, w, b, *args)
    xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    yt = tf.conv_transpose2d(xt, wt, bt, *args)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    for g, t in zip(F.conv_transpose2d_backward(dy, x, w, *args), torch.autograd.grad(yt, (xt, wt, bt),
                                                                                      torch.from_numpy(dy))):
        np.testing.assert_allclose(g, t.numpy(), rtol=1e-12, atol=1e-12)
    # grouped conv2d, same groups: x (2, 4, 5, 6) with weight (F=6, 4/groups, 3, 3)
    wc = rng.standard_normal((6 if groups != 4 else 8, 4 // groups, 3, 3))
    yc = F.conv2d(x, wc, None, stride, padding, dilation, groups)
    xt, wct = (torch.from_numpy(a).requires_grad_() for a in (x, wc))
    yct = tf.conv2d(xt, wct, None, stride, padding, dilation, groups)
    np.testing.assert_allclose(yc, yct.detach().numpy(), rtol=1e-12, atol=1e-12)
    dyc = rng.standard_normal(yc.shape)
    got = F.conv2d_backward(dyc, x, wc, stride, padding, dilation, groups=groups)[:2]
    for g, t in zip(got, torch.autograd.grad(yct, (xt, wct), torch.from_numpy(dyc))):
        np.testing.assert_allclose(g, t.numpy(), rtol=1e-12, atol=1e-12)
