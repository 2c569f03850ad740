"""The vectorized ops against three independent witnesses: the loop reference,
scipy.signal.correlate, and numerical gradients."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import correlate

import convnet.functional as F
from convnet import _args, _conv, core, reference
from convnet.gradcheck import check_backward
from guards import traced_peak_below
from strategies import conv_cases, pool_cases, readonly, tol

PROPS = settings(max_examples=100, deadline=None)


# ----------------------------------------------------------------------------- golden

def test_tutorial_conv_example(golden_conv):
    x, w, b, expected = golden_conv
    y = F.conv2d(x[None], w, b, stride=2, padding=1)
    np.testing.assert_array_equal(y[0], expected)


def test_tutorial_max_pool_example(golden_pool):
    x, expected = golden_pool
    np.testing.assert_array_equal(F.max_pool2d(x[None], 2, 2)[0], expected)


# ----------------------------------------------------------------------------- conv

def scipy_conv(case):
    """Forward by scipy: pad, dilate the filter, correlate per channel, sum, subsample."""
    x, w = case.x.astype(np.float64), case.weight.astype(np.float64)
    (ph, pw), (sh, sw), (dh, dw) = case.padding, case.stride, case.dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    f, c, kh, kw = w.shape
    wd = np.zeros((f, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    wd[:, :, ::dh, ::dw] = w
    out = np.empty(case.dy.shape)
    for n in range(x.shape[0]):
        for fi in range(f):
            acc = sum(correlate(xp[n, ci], wd[fi, ci], mode="valid") for ci in range(c))
            out[n, fi] = acc[::sh, ::sw][: out.shape[2], : out.shape[3]] + case.bias[fi]
    return out


def algos_for(case) -> list[str]:
    """Every correlation algorithm that applies to the case ("taps" needs stride 1)."""
    return ["im2col", "taps"] if case.stride == (1, 1) else ["im2col"]


ALGO = st.sampled_from(["im2col", "taps"])


def pick(algo: str, case) -> str:
    return algo if algo in algos_for(case) else "im2col"


@PROPS
@given(conv_cases(), ALGO)
def test_conv_forward_matches_scipy_and_reference(case, algo):
    y = F.conv2d(case.x, case.weight, case.bias, **case.kwargs, algo=pick(algo, case))
    assert y.dtype == case.x.dtype and y.shape == case.dy.shape
    np.testing.assert_allclose(y, scipy_conv(case), **tol(y.dtype))
    np.testing.assert_allclose(y, reference.conv2d(case.x, case.weight, case.bias, **case.kwargs),
                               **tol(y.dtype))


@PROPS
@given(st.one_of(conv_cases(), conv_cases(max_c=12, max_f=12, max_hw=7)),  # wider layers
       st.sampled_from(["auto", "zero_insert", "col2im"]), ALGO)
def test_conv_backward_matches_reference(case, method, algo):
    got = F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, method=method, algo=algo)
    want = reference.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    for name, g, r, a in zip(("dx", "dweight", "dbias"), got, want, (case.x, case.weight, case.bias)):
        assert g.dtype == case.x.dtype, name
        assert g.shape == a.shape, name
        np.testing.assert_allclose(g, r, err_msg=name, **tol(g.dtype))


@PROPS
@given(conv_cases(), ALGO)
def test_zero_insertion_route_equals_col2im_route(case, algo):
    kw = dict(case.kwargs, algo=pick(algo, case))
    a = F.conv2d_backward(case.dy, case.x, case.weight, **kw, method="zero_insert")
    b = F.conv2d_backward(case.dy, case.x, case.weight, **kw, method="col2im")
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, **tol(u.dtype))


@settings(max_examples=25, deadline=None)
@given(conv_cases(dtypes=(np.float64,), max_hw=6, max_k=3, max_c=2), ALGO)
def test_conv_gradients_match_numerical(case, algo):
    kw = dict(case.kwargs, algo=pick(algo, case))
    dx, dw, db = F.conv2d_backward(case.dy, case.x, case.weight, **kw)
    report = check_backward(
        lambda x, weight, bias: F.conv2d(x, weight, bias, **kw),
        {"x": case.x, "weight": case.weight, "bias": case.bias}, case.dy,
        {"x": dx, "weight": dw, "bias": db}, rtol=1e-5, atol=1e-6)
    assert report.ok, report


@PROPS
@given(conv_cases())
def test_cached_backward_equals_uncached(case):
    """What layers do (both planned by "auto"): the cache only saves the rebuild, bit for bit."""
    y, cache = F.conv2d_with_cache(case.x, case.weight, case.bias, **case.kwargs)
    assert cache is not None
    for u, v in zip(F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, cache=cache),
                    F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)):
        np.testing.assert_array_equal(u, v)


@PROPS
@given(conv_cases(), ALGO)
def test_cached_backward_of_a_chosen_algorithm_matches_uncached(case, algo):
    """A forward forced onto another algorithm may keep its columns in another layout (CHWN
    vs CNHW), so the filter gradient sums in another order: equal up to rounding."""
    algo = pick(algo, case)
    y, cache = F.conv2d_with_cache(case.x, case.weight, case.bias, **case.kwargs, algo=algo)
    assert cache is not None and cache.algo == algo
    for u, v in zip(F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, cache=cache),
                    F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)):
        np.testing.assert_allclose(u, v, **tol(u.dtype))


@pytest.mark.parametrize("method", ["col2im", "zero_insert"])
@pytest.mark.parametrize("layout", ["cnhw", "chwn"])
@settings(max_examples=60, deadline=None)
@given(case=conv_cases(max_hw=8, max_c=3, max_f=3))
def test_both_im2col_layouts_match_the_loop_reference(layout, method, case):
    """The plan puts the batch innermost (CHWN) on narrow outputs; force each layout everywhere."""
    table = _conv.THRESHOLDS._replace(chwn_max_width=10**6 if layout == "chwn" else 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_conv, "THRESHOLDS", table)
        y, cache = F.conv2d_with_cache(case.x, case.weight, case.bias, **case.kwargs, algo="im2col")
        got = [F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, cache=c, method=method,
                                 algo="im2col") for c in (cache, None)]
    assert cache.layout == (layout if case.stride == (1, 1) else "cnhw")
    np.testing.assert_allclose(y, reference.conv2d(case.x, case.weight, case.bias, **case.kwargs), **tol(y.dtype))
    want = reference.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    for grads in got:
        for g, r, name in zip(grads, want, ("dx", "dw", "db")):
            assert g.dtype == case.x.dtype
            np.testing.assert_allclose(g, r, err_msg=name, **tol(g.dtype))


@pytest.mark.parametrize("method, dx_algo", [("zero_insert", "taps"), ("col2im", "taps"), ("zero_insert", "im2col")])
def test_a_chwn_cache_serves_a_backward_planned_in_cnhw(rng, method, dx_algo):
    """The filter gradient follows the cache's layout, the input gradient the backward's plan."""
    x = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    y, cache = F.conv2d_with_cache(x, w, None, padding=1)
    assert cache.layout == "chwn"
    dy = rng.standard_normal(y.shape).astype(np.float32)
    got = F.conv2d_backward(dy, x, w, padding=1, cache=cache, method=method, algo=dx_algo)
    for g, r, name in zip(got, reference.conv2d_backward(dy, x, w, padding=1), ("dx", "dw", "db")):
        np.testing.assert_allclose(g, r, err_msg=name, **tol(g.dtype))


@PROPS
@given(conv_cases(max_c=20, max_f=20, max_hw=7))
def test_taps_and_im2col_agree_at_the_auto_threshold(case):
    """Channel counts around the plan's taps_min_channels exercise both choices of "auto"."""
    algos = algos_for(case)
    outs = [F.conv2d(case.x, case.weight, case.bias, **case.kwargs, algo=a) for a in algos]
    grads = [F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, algo=a) for a in algos]
    auto = F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    for y, g in zip(outs[1:], grads[1:]):
        np.testing.assert_allclose(y, outs[0], **tol(y.dtype))
        for u, v in zip(g, grads[0]):
            np.testing.assert_allclose(u, v, **tol(u.dtype))
    for u, v in zip(auto, grads[0]):
        np.testing.assert_allclose(u, v, **tol(u.dtype))


@settings(max_examples=60, deadline=None)
@given(st.one_of(conv_cases(), conv_cases(max_c=12, max_f=12, max_hw=7)),
       st.sampled_from(["zero_insert", "col2im"]))
def test_input_gradient_algorithms_agree(case, method):
    """Both algorithms of each input-gradient route (at any stride) against the loop reference."""
    want = reference.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    for algo in ("im2col", "taps"):
        got = F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, method=method, algo=algo)
        for name, g, r in zip(("dx", "dweight", "dbias"), got, want):
            np.testing.assert_allclose(g, r, err_msg=f"{algo} {name}", **tol(g.dtype))


def one_image_workspace(case) -> int:
    """The largest workspace one image of ``case`` needs, over every algorithm, route and layout."""
    g = F._conv_geometry(case.x, case.weight, None, case.stride, case.padding, case.dilation)
    return max(max(_conv._workspace(g, a, m, d, lay)) for a in _conv.ALGOS for m in _conv.METHODS
               for d in _conv.ALGOS for lay in _conv.LAYOUTS)


@settings(max_examples=30, deadline=None)
@given(conv_cases(max_n=5), st.sampled_from(["zero_insert", "col2im"]), ALGO)
def test_chunked_batches_give_identical_results(case, method, algo):
    """A workspace limit of one image forces one image per chunk; results must not change."""
    kw = dict(case.kwargs, algo=pick(algo, case))
    y = F.conv2d(case.x, case.weight, case.bias, **kw)
    grads = F.conv2d_backward(case.dy, case.x, case.weight, **kw, method=method)
    with core.workspace_limit(one_image_workspace(case)):
        y_c, cache = F.conv2d_with_cache(case.x, case.weight, case.bias, **kw)
        grads_c = F.conv2d_backward(case.dy, case.x, case.weight, **kw, method=method)
    # BLAS may pick another kernel for a smaller matrix, so equality is up to rounding.
    np.testing.assert_allclose(y, y_c, **tol(y.dtype))
    for g, g_c in zip(grads, grads_c):
        np.testing.assert_allclose(g, g_c, **tol(y.dtype))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 4, 3, 1, 1), (2, 20, 8, 8, 18, 3, 1, 1), (2, 4, 9, 9, 5, 3, 2, 1)])
def test_results_never_share_scratch_memory(rng, shape):
    """Outputs of one call survive the next call, which reuses the scratch arrays."""
    n, c, h, w, f, k, s, p = shape
    x, wt = rng.standard_normal((n, c, h, w)), rng.standard_normal((f, c, k, k))
    y, cache = F.conv2d_with_cache(x, wt, None, s, p)
    dy = rng.standard_normal(y.shape)
    first = [a.copy() for a in (y, *F.conv2d_backward(dy, x, wt, s, p, cache=cache))]
    y2, cache2 = F.conv2d_with_cache(2 * x, 3 * wt, None, s, p)
    F.conv2d_backward(5 * dy, 2 * x, 3 * wt, s, p, cache=cache2)
    F.conv2d(x + 1, wt, None, s, p)
    again = [y, *F.conv2d_backward(dy, x, wt, s, p, cache=cache)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y2, 6 * y, rtol=1e-12, atol=1e-12)


@PROPS
@given(conv_cases())
def test_skipping_the_input_gradient_keeps_the_others(case):
    dx, dw, db = F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs)
    none, dw2, db2 = F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, input_grad=False)
    assert none is None
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(db, db2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3000), st.sampled_from([0, 1, 32]), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))
def test_row_sums_by_gemv_equal_numpy_sums(rows, cols, pad, dtype, seed):
    """The bias gradient's row sums (one GEMV with ones) against float64 sums, also on rows
    strided as core.row_buffer pads them; the error bound is that of any summation order."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((rows, cols + pad)).astype(dtype)[:, :cols]
    got = _conv._row_sums(m)
    want = m.astype(np.float64).sum(axis=1)
    assert got.dtype == dtype and got.shape == (rows,)
    eps = np.finfo(dtype).eps
    bound = 2 * cols * eps * np.abs(m).astype(np.float64).sum(axis=1) + np.finfo(dtype).tiny
    assert np.all(np.abs(got - want) <= bound)


@PROPS
@given(st.one_of(conv_cases(max_n=5), conv_cases(max_c=12, max_f=12, max_hw=7)), ALGO,
       st.sampled_from([None, "cached", "one image"]))
def test_conv_bias_gradient_is_the_sum_of_dy(case, algo, how):
    """Whatever the layout, algorithm, cache or chunking, the bias gradient is
    ``dy.sum(axis=(0, 2, 3))`` up to the rounding of another summation order."""
    kw = dict(case.kwargs, algo=pick(algo, case))
    if how == "cached":
        _, cache = F.conv2d_with_cache(case.x, case.weight, case.bias, **kw)
        db = F.conv2d_backward(case.dy, case.x, case.weight, **case.kwargs, cache=cache)[2]
    elif how == "one image":
        with core.workspace_limit(one_image_workspace(case)):
            db = F.conv2d_backward(case.dy, case.x, case.weight, **kw)[2]
    else:
        db = F.conv2d_backward(case.dy, case.x, case.weight, **kw)[2]
    want = case.dy.astype(np.float64).sum(axis=(0, 2, 3))
    terms = case.dy[:, 0].size
    bound = 2 * terms * np.finfo(case.dy.dtype).eps * np.abs(case.dy).astype(np.float64).sum(axis=(0, 2, 3))
    assert db.dtype == case.dy.dtype and db.shape == case.bias.shape
    assert np.all(np.abs(db - want) <= bound)


@pytest.mark.parametrize("channels", [1, 3, 20])
@pytest.mark.parametrize("order", ["C", "F"])
def test_strided_and_fortran_ordered_inputs(rng, channels, order):
    """Views (every other row, a column window, flipped filters) give the reference's results."""
    x = np.asarray(rng.standard_normal((3, channels, 14, 9))[:, :, ::2, 1:8], order=order)
    w = np.asarray(rng.standard_normal((4, channels, 3, 3)), order=order)[:, :, ::-1, :]
    b = rng.standard_normal(8)[::2]
    y, cache = F.conv2d_with_cache(x, w, b, 1, 1)
    dy = rng.standard_normal(y.shape + (2,))[..., 0]
    plain = [np.ascontiguousarray(a) for a in (dy, x, w, b)]
    np.testing.assert_allclose(y, reference.conv2d(plain[1], plain[2], plain[3], 1, 1), rtol=1e-10, atol=1e-10)
    for g, r in zip(F.conv2d_backward(dy, x, w, 1, 1, cache=cache), reference.conv2d_backward(*plain[:3], 1, 1)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)
    for fwd, bwd, _, _ in POOLS:
        np.testing.assert_array_equal(bwd(fwd(x, 2), x, 2), bwd(fwd(plain[1], 2), plain[1], 2))


def test_stale_cache_is_rejected(rng):
    x = rng.standard_normal((2, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    _, cache = F.conv2d_with_cache(x, w, padding=1)
    dy = np.ones((2, 4, 6, 6))
    with pytest.raises(ValueError, match="cache"):
        F.conv2d_backward(dy, x, w, padding=0, cache=cache)


@pytest.mark.parametrize("algo", ["im2col", "taps"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cache_of_another_input_is_rejected(rng, algo, dtype):
    xa, xb = (rng.standard_normal((2, 3, 8, 8)).astype(dtype) for _ in range(2))
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    ya, cache = F.conv2d_with_cache(xa, w, padding=1, algo=algo)
    dy = rng.standard_normal(ya.shape).astype(dtype)
    with pytest.raises(ValueError, match="another x"):
        F.conv2d_backward(dy, xb, w, padding=1, cache=cache)
    # Two images swapped: the same values, in other places.
    with pytest.raises(ValueError, match="another x"):
        F.conv2d_backward(dy, xa[::-1].copy(), w, padding=1, cache=cache)
    # An equal copy is the same input: accepted, with the same gradients.
    for g, r in zip(F.conv2d_backward(dy, xa.copy(), w, padding=1, cache=cache),
                    F.conv2d_backward(dy, xa, w, padding=1, cache=cache)):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("edit", ["scale", "one value", "last value", "next batch"])
def test_cache_of_an_input_edited_in_place_is_rejected(rng, edit):
    x = rng.standard_normal((3, 2, 7, 5)).astype(np.float32)  # an odd number of values
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    y, cache = F.conv2d_with_cache(x, w, padding=1)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    if edit == "scale":
        x *= 2
    elif edit == "one value":
        x[1, 1, 3, 2] += 1e-3
    elif edit == "last value":
        x[-1, -1, -1, -1] = 0.5
    else:
        x[...] = rng.standard_normal(x.shape)
    with pytest.raises(ValueError, match="changed in place"):
        F.conv2d_backward(dy, x, w, padding=1, cache=cache)


def test_conv_layer_rejects_its_cache_after_the_input_changed(rng):
    from convnet import layers as L
    conv = L.Conv2d(2, 3, 3, rng=0)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    y = conv.forward(x)
    x += 1
    with pytest.raises(ValueError, match="changed in place"):
        conv.backward(np.ones_like(y))


def test_one_image_over_the_workspace_limit_is_refused_before_allocating():
    # The case: one (512, 1024, 1024) image, 3x3, whose column matrix is 18 GiB;
    # a broadcast view, so the test itself allocates nothing.
    x = np.broadcast_to(np.float32(1), (1, 512, 1024, 1024))
    w = np.zeros((8, 512, 3, 3), dtype=np.float32)
    with traced_peak_below(64 * 2**20):  # the (1, 8, 1024, 1024) dy below is 32 MiB; nothing of the conv's
        for call in (lambda: F.conv2d(x, w, padding=1, algo="im2col"),
                     lambda: F.conv2d(x, w, padding=1),
                     lambda: F.conv2d_with_cache(x, w, padding=1),
                     lambda: F.conv2d_backward(np.zeros((1, 8, 1024, 1024), np.float32), x, w, padding=1)):
            with pytest.raises(core.WorkspaceLimitError, match=r"workspace limit of 256 MiB") as err:
                call()
            assert isinstance(err.value, MemoryError)
    with core.workspace_limit(2**10):
        with pytest.raises(core.WorkspaceLimitError, match=r"for one image.*limit of 1 KiB \(1024 bytes\)"):
            F.conv2d(np.ones((2, 3, 16, 16)), np.ones((4, 3, 3, 3)))


def test_a_batch_over_the_limit_is_chunked_and_keeps_no_cache(rng):
    x, w = rng.standard_normal((4, 3, 9, 9)), rng.standard_normal((5, 3, 3, 3))
    case_limit = 81 * 27 * 8 * 2  # two images of the largest temporary, about
    y, cache = F.conv2d_with_cache(x, w, padding=1, algo="im2col")
    with core.workspace_limit(case_limit):
        y_c, cache_c = F.conv2d_with_cache(x, w, padding=1, algo="im2col")
    assert cache is not None and cache_c is None
    np.testing.assert_allclose(y_c, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algo", ["im2col", "taps"])
@pytest.mark.parametrize("k, p", [((3, 3), "same"), ((2, 4), "same"), ((5, 2), "valid")])
def test_string_padding(rng, k, p, algo):
    x = rng.standard_normal((1, 2, 7, 6))
    w = rng.standard_normal((3, 2) + k)
    y = F.conv2d(x, w, padding=p, algo=algo)
    np.testing.assert_allclose(y, reference.conv2d(x, w, padding=p), rtol=1e-10, atol=1e-10)
    if p == "same":
        assert y.shape[2:] == x.shape[2:]
    dy = rng.standard_normal(y.shape)
    for g, r in zip(F.conv2d_backward(dy, x, w, padding=p, algo=algo),
                    reference.conv2d_backward(dy, x, w, padding=p)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


def test_rows_no_window_reaches_get_zero_gradient(rng):
    # H=7, K=2, S=3: windows start at 0 and 3; rows 2, 5 and 6 are never read.
    x = rng.standard_normal((1, 1, 7, 7))
    w = rng.standard_normal((1, 1, 2, 2))
    dy = np.ones((1, 1, 2, 2))
    for method in ("zero_insert", "col2im"):
        dx = F.conv2d_backward(dy, x, w, stride=3, method=method)[0]
        assert np.all(dx[0, 0, [2, 5, 6], :] == 0) and np.all(dx[0, 0, :, [2, 5, 6]] == 0)
        assert np.count_nonzero(dx) == 16


# ----------------------------------------------------------------------------- pooling

POOLS = [(F.max_pool2d, F.max_pool2d_backward, reference.max_pool2d, reference.max_pool2d_backward),
         (F.avg_pool2d, F.avg_pool2d_backward, reference.avg_pool2d, reference.avg_pool2d_backward)]


# Windows drawn freely, and mostly tiling each axis (stride == kernel, sizes dividing), the
# case with its own fast paths (no zero fill, writes instead of accumulation).
POOL_CASES = st.one_of(pool_cases(), pool_cases(tiled=True))


@PROPS
@given(POOL_CASES, st.sampled_from(POOLS))
def test_pooling_matches_reference(case, ops):
    fwd, bwd, rfwd, rbwd = ops
    y = fwd(case.x, *case.args)
    dx = bwd(case.dy, case.x, *case.args)
    assert y.dtype == dx.dtype == case.x.dtype and dx.shape == case.x.shape
    np.testing.assert_allclose(y, rfwd(case.x, *case.args), **tol(y.dtype))
    np.testing.assert_allclose(dx, rbwd(case.dy, case.x, *case.args), **tol(y.dtype))


@settings(max_examples=30, deadline=None)
@given(st.one_of(pool_cases(dtypes=(np.float64,), distinct=True),
                 pool_cases(dtypes=(np.float64,), distinct=True, tiled=True)), st.sampled_from(POOLS))
def test_pooling_gradients_match_numerical(case, ops):
    fwd, bwd = ops[:2]
    dx = bwd(case.dy, case.x, *case.args)
    report = check_backward(lambda x: fwd(x, *case.args), {"x": case.x}, case.dy, {"x": dx},
                            rtol=1e-5, atol=1e-6)
    assert report.ok, report


def _window_argmax(x, kernel, stride, padding):
    """np.argmax of every flattened window of the -inf padded input: the witness of the arg-max."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    oh, ow = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
    out = np.empty(x.shape[:2] + (oh, ow), dtype=np.int64)
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = window.reshape(x.shape[:2] + (-1,)).argmax(axis=-1)
    return out


@PROPS
@given(POOL_CASES)
def test_max_pool_argmax_is_the_first_maximum_and_routes_as_recomputing(case):
    y, argmax = F.max_pool2d_with_argmax(case.x, *case.args)
    assert argmax.dtype == np.uint8 and argmax.shape == y.shape
    np.testing.assert_array_equal(y, F.max_pool2d(case.x, *case.args))
    np.testing.assert_array_equal(argmax, _window_argmax(case.x, *case.args))
    dx = F.max_pool2d_backward(case.dy, case.x, *case.args, argmax=argmax)
    np.testing.assert_array_equal(dx, F.max_pool2d_backward(case.dy, case.x, *case.args))
    np.testing.assert_allclose(dx, reference.max_pool2d_backward(case.dy, case.x, *case.args),
                               **tol(case.x.dtype))


@PROPS
@given(st.one_of(pool_cases(special=True), pool_cases(tiled=True, special=True)))
def test_pooling_with_nan_and_inf_matches_reference(case):
    """nan, inf and -inf in x and dy: a window holding a nan has max nan and routes to its first
    nan; a non-finite error reaches only the arg-max (0 * inf never leaks a nan elsewhere)."""
    y, argmax = F.max_pool2d_with_argmax(case.x, *case.args)
    np.testing.assert_array_equal(y, reference.max_pool2d(case.x, *case.args))
    np.testing.assert_array_equal(F.max_pool2d(case.x, *case.args), y)
    np.testing.assert_array_equal(argmax, _window_argmax(case.x, *case.args))
    with np.errstate(invalid="ignore"):  # inf - inf where windows overlap, and in window sums
        want = reference.max_pool2d_backward(case.dy, case.x, *case.args)
        for dx in (F.max_pool2d_backward(case.dy, case.x, *case.args, argmax=argmax),
                   F.max_pool2d_backward(case.dy, case.x, *case.args)):
            assert dx.dtype == case.x.dtype
            np.testing.assert_allclose(dx, want, **tol(case.x.dtype))  # nan where the witness has nan
        np.testing.assert_allclose(F.avg_pool2d(case.x, *case.args), reference.avg_pool2d(case.x, *case.args),
                                   **tol(case.x.dtype))
        np.testing.assert_allclose(F.avg_pool2d_backward(case.dy, case.x, *case.args),
                                   reference.avg_pool2d_backward(case.dy, case.x, *case.args), **tol(case.x.dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_of_more_than_256_taps_keeps_an_int32_argmax(rng, dtype):
    x = rng.standard_normal((2, 2, 18, 17)).astype(dtype)
    x[0, 0, 16, 3] = np.nan  # the nan window's first nan, past tap 255
    x[0, 0, 17, 0] = np.nan
    x[1, 1] = 1.0  # all ties: tap 0
    y, argmax = F.max_pool2d_with_argmax(x, 17, 1)
    assert argmax.dtype == np.int32
    np.testing.assert_array_equal(argmax, _window_argmax(x, (17, 17), (1, 1), (0, 0)))
    assert argmax[0, 0, 0, 0] == 16 * 17 + 3 and argmax[0, 0, 1, 0] == 15 * 17 + 3
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(F.max_pool2d_backward(dy, x, 17, 1, argmax=argmax),
                               reference.max_pool2d_backward(dy, x, 17, 1), **tol(dtype))


@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), ((1, 2), (1, 3), 0), (2, 2, 0), (2, 2, 1)])
def test_pooling_results_are_fresh_arrays(rng, kernel, stride, padding):
    """Even a 1x1 window, whose sum or maximum is its input, returns new memory."""
    x = readonly(rng.standard_normal((2, 3, 6, 6)))
    y, argmax = F.max_pool2d_with_argmax(x, kernel, stride, padding)
    dy = readonly(rng.standard_normal(y.shape))
    results = [y, argmax, F.max_pool2d(x, kernel, stride, padding), F.avg_pool2d(x, kernel, stride, padding),
               F.max_pool2d_backward(dy, x, kernel, stride, padding, argmax=argmax),
               F.max_pool2d_backward(dy, x, kernel, stride, padding),
               F.avg_pool2d_backward(dy, x, kernel, stride, padding)]
    for i, r in enumerate(results):
        assert r.flags.writeable
        assert not np.shares_memory(r, x) and not np.shares_memory(r, dy)
        assert r is argmax or not np.shares_memory(r, argmax)
        assert not any(np.shares_memory(r, other) for other in results[i + 1:])


def test_max_pool_argmax_of_nan_windows_is_the_first_nan():
    x = np.array([[[[1.0, np.nan, 3.0, np.nan], [np.nan, 0.0, 2.0, 5.0]]]])
    y, argmax = F.max_pool2d_with_argmax(x, 2)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(argmax, _window_argmax(x, (2, 2), (2, 2), (0, 0)))  # [[1, 1]]
    dx = F.max_pool2d_backward(np.ones_like(y), x, 2, argmax=argmax)
    np.testing.assert_array_equal(dx, reference.max_pool2d_backward(np.ones_like(y), x, 2))


# Every drawn geometry through each route, whatever the chooser would pick for it, with blocks
# of 1 to 4 planes (the last block maybe shorter) or the default (the whole batch here): both
# fast routes work block by block. Ties (integer draws), nan, inf and -inf in x and dy, float32
# and float64, read-only inputs.
PLANES_PER_BLOCK = st.sampled_from([1, 2, 3, 4, None])
ROUTE_CASES = st.one_of(pool_cases(), pool_cases(tiled=True), pool_cases(special=True),
                        pool_cases(tiled=True, special=True), pool_cases(kernel=(2, 2), stride_is_kernel=True),
                        pool_cases(kernel=(2, 2), stride_is_kernel=True, special=True))
SIDE_BY_SIDE_CASES = st.one_of(pool_cases(stride_is_kernel=True), pool_cases(stride_is_kernel=True, special=True),
                               pool_cases(kernel=(2, 2), stride_is_kernel=True),
                               pool_cases(kernel=(2, 2), stride_is_kernel=True, special=True))


def _padded(case, planes_per_block=None):
    """The -inf padded input, geometry, and a block size of ``planes_per_block`` planes."""
    k, s, pads, out_hw = _args.pool_args(case.x, *case.args)
    xp = core.pad2d(case.x, pads, -np.inf)
    block = F._POOL_BLOCK if planes_per_block is None else planes_per_block * xp.shape[2] * xp.shape[3]
    return xp, k, s, pads, out_hw, block


@PROPS
@given(ROUTE_CASES, st.sampled_from(["running", "taps"]), PLANES_PER_BLOCK)
def test_every_max_pool_argmax_route_matches_the_reference(case, route, planes_per_block):
    xp, k, s, _, out_hw, block = _padded(case, planes_per_block)
    y, argmax = F._max_pool_argmax(xp, k, s, out_hw, route=route, block=block)
    assert y.dtype == case.x.dtype and argmax.dtype == np.uint8
    np.testing.assert_array_equal(y, reference.max_pool2d(case.x, *case.args))
    np.testing.assert_array_equal(argmax, _window_argmax(case.x, *case.args))


@PROPS
@given(st.one_of(pool_cases(kernel=(2, 2), stride_is_kernel=True),
                 pool_cases(kernel=(2, 2), stride_is_kernel=True, special=True)), st.booleans())
def test_tournament_max_pool_argmax_matches_the_reference(case, contiguous):
    """2x2 windows side by side through the "tournament" route, from a contiguous input (float32
    of even width: the left taps as uint64 low halves) and from a strided one."""
    xp, k, s, _, out_hw, _ = _padded(case)
    if not contiguous:
        wider = np.zeros(xp.shape[:3] + (xp.shape[3] + 1,), dtype=xp.dtype)
        wider[..., :-1] = xp
        xp = readonly(wider)[..., :-1]
    y, argmax = F._max_pool_argmax(xp, k, s, out_hw, route="tournament")
    assert y.dtype == case.x.dtype and argmax.dtype == np.uint8
    np.testing.assert_array_equal(y, reference.max_pool2d(case.x, *case.args))
    np.testing.assert_array_equal(argmax, _window_argmax(case.x, *case.args))


@PROPS
@given(SIDE_BY_SIDE_CASES, st.sampled_from(["rows", "taps"]), PLANES_PER_BLOCK)
def test_every_max_pool_backward_route_matches_the_reference(case, route, planes_per_block):
    """Windows side by side (no accumulation): each route's dx is the reference's exactly,
    an inf or nan error only at its window's arg-max."""
    xp, k, s, pads, out_hw, block = _padded(case, planes_per_block)
    argmax = readonly(F._max_pool_argmax(xp, k, s, out_hw)[1])
    dx = F._crop(F._max_pool_dx(case.dy, argmax, xp.shape, k, s, out_hw, route=route, block=block),
                 pads, case.x.shape)
    assert dx.dtype == case.x.dtype and dx.shape == case.x.shape
    np.testing.assert_array_equal(dx, reference.max_pool2d_backward(case.dy, case.x, *case.args))


def test_max_pool_routes_are_chosen_by_geometry():
    assert F._argmax_route((3, 3), (2, 2)) == F._argmax_route((3, 3), (1, 1)) == "running"
    assert F._argmax_route((2, 2), (1, 2)) == "running"
    assert F._argmax_route((2, 2), (2, 2)) == "tournament"
    assert F._argmax_route((2, 3), (2, 3)) == "taps"
    assert F._argmax_route((4, 4), (4, 4)) == "taps"  # the output is 1/16 of the input
    assert F._argmax_route((2, 1), (2, 1)) == "taps"  # its tap views are whole rows
    assert F._argmax_route((17, 17), (1, 1)) == "taps"  # int32 arg-max
    u8, i32 = np.zeros(1, np.uint8), np.zeros(1, np.int32)
    assert F._dx_route((2, 2), (2, 2), u8) == F._dx_route((3, 2), (3, 2), u8) == "rows"
    assert F._dx_route((2, 2), (1, 1), u8) == F._dx_route((2, 2), (3, 3), u8) == "taps"
    assert F._dx_route((2, 1), (2, 1), u8) == "taps"  # one tap wide: its views are whole rows
    assert F._dx_route((17, 17), (17, 17), i32) == "taps"


@pytest.mark.parametrize("bits", [np.uint32, np.uint64])
def test_numpy_shifts_of_the_full_width_or_more_give_zero(bits):
    """What the "rows" backward route relies on to clear the taps that are not the arg-max."""
    width = 8 * np.dtype(bits).itemsize
    ones = np.full(4, np.iinfo(bits).max, dtype=bits)
    amounts = np.array([width, width + 1, 2 * width, np.iinfo(bits).max - 31], dtype=bits)
    np.testing.assert_array_equal(np.left_shift(ones, amounts), 0)
    assert np.left_shift(ones[:1], np.zeros(1, bits))[0] == ones[0]


def test_max_pool_backward_rejects_a_foreign_argmax():
    x = np.zeros((1, 2, 4, 4))
    y, argmax = F.max_pool2d_with_argmax(x, 2)
    with pytest.raises(ValueError, match="argmax"):
        F.max_pool2d_backward(np.ones_like(y), x, 2, argmax=argmax[:, :1])
    with pytest.raises(TypeError, match="argmax must be the uint8 array"):
        F.max_pool2d_backward(np.ones_like(y), x, 2, argmax=argmax.astype(np.int64))
    with pytest.raises(TypeError, match="argmax"):
        F.max_pool2d_backward(np.ones_like(y), x, 2, argmax=[[0]])


SPECIALS = [0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 1e-40, np.inf, -np.inf, np.nan]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1),
       st.booleans())
def test_relu_backward_is_exactly_the_selection(size, dtype, seed, transposed):
    """``dy`` where ``x > 0``, else exactly 0, whatever dy holds there (inf, nan, values whose
    squares overflow) and whatever x is (nan, -0.0, denormals); any memory layout."""
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array(SPECIALS), (size, 3)).astype(dtype)
    dy = rng.choice(np.array(SPECIALS), (size, 3)).astype(dtype)
    if transposed:
        x, dy = x.T, dy.T
    x, dy = readonly(x), readonly(dy)
    dx = F.relu_backward(dy, x)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_array_equal(dx, reference.relu_backward(dy, x))
    assert not np.any(np.isnan(dx[~(x > 0)]))


@pytest.mark.parametrize("dy_value", [np.inf, np.nan, 1.0])
def test_relu_backward_is_zero_where_x_is_not_positive(dy_value):
    x = np.array([-1.0, 0.0, 2.0, -0.0, 3.0], np.float32)
    dy = np.array([dy_value, dy_value, 4.0, dy_value, dy_value], np.float32)
    dx = F.relu_backward(dy, x)
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(dx, [0, 0, 4, 0, dy_value])


def test_padded_max_pool_pads_with_minus_infinity():
    x = -np.ones((1, 1, 2, 2))
    y = F.max_pool2d(x, 2, stride=1, padding=1)
    assert np.all(y == -1), "zero padding would have won over the negative inputs"
    dx = F.max_pool2d_backward(np.ones_like(y), x, 2, stride=1, padding=1)
    assert dx.sum() == y.size  # every error lands on a real pixel


def test_overlapping_max_pool_accumulates_and_breaks_ties_first():
    x = np.array([[[[1.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    dx = F.max_pool2d_backward(np.ones((1, 1, 1, 3)), x, (2, 2), stride=1)
    # The 5 is the max of the first two windows; the third window [1, 0; 0, 0] has one max.
    np.testing.assert_array_equal(dx[0, 0], [[0, 2, 1, 0], [0, 0, 0, 0]])
    ties = F.max_pool2d_backward(np.ones((1, 1, 1, 1)), np.zeros((1, 1, 2, 2)), 2)
    np.testing.assert_array_equal(ties[0, 0], [[1, 0], [0, 0]])


def test_max_pool_errors_inf_and_minus_inf_meeting_give_nan_without_a_warning():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0  # the arg-max of all four overlapping windows
    dy = np.array([[[[np.inf, -np.inf], [1.0, 1.0]]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx = F.max_pool2d_backward(dy, x, 2, 1)
    assert np.isnan(dx[0, 0, 1, 1]) and np.count_nonzero(dx) == 1


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_routes_non_finite_errors_only_to_the_arg_max(stride):
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y = F.max_pool2d(x, 2, stride)
    dy = np.full(y.shape, np.inf)
    dy[0, 0, 0, 0] = np.nan
    dx = F.max_pool2d_backward(dy, x, 2, stride)
    winners = F.max_pool2d_backward(np.ones_like(y), x, 2, stride) > 0
    assert np.all(dx[~winners] == 0)
    assert np.isnan(dx[0, 0, 1, 1]) and np.all(np.isinf(dx[winners & ~np.isnan(dx)]))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([np.float32, np.float64]))
def test_mean_pool_backward_is_the_kronecker_form(k, c, oh, ow, dtype):
    rng = np.random.default_rng(k * 100 + c * 10 + oh)
    x = rng.standard_normal((1, c, oh * k, ow * k)).astype(dtype)
    dy = rng.standard_normal((1, c, oh, ow)).astype(dtype)
    dx = F.avg_pool2d_backward(dy, x, k)
    expected = np.stack([np.kron(dy[0, i], np.ones((k, k))) / k**2 for i in range(c)])
    np.testing.assert_allclose(dx[0], expected, **tol(dtype))


# ----------------------------------------------------------------------------- activations and losses

ACTS = [(F.relu, F.relu_backward, reference.relu), (F.leaky_relu, F.leaky_relu_backward, reference.leaky_relu),
        (F.sigmoid, F.sigmoid_backward, reference.sigmoid), (F.tanh, F.tanh_backward, reference.tanh),
        (F.identity, F.identity_backward, reference.identity)]


@pytest.mark.parametrize("fwd, bwd, ref", ACTS, ids=lambda f: getattr(f, "__name__", ""))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations(rng, fwd, bwd, ref, dtype):
    x = readonly((rng.standard_normal((3, 4, 5)) * 3).astype(dtype))
    x = readonly(np.where(np.abs(x) < 1e-3, 0.5, x).astype(dtype))  # keep clear of ReLU's kink
    dy = readonly(rng.standard_normal(x.shape).astype(dtype))
    y, dx = fwd(x), bwd(dy, x)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, ref(x), **tol(dtype))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    report = check_backward(fwd, {"x": x64}, dy64, {"x": bwd(dy64, x64)}, rtol=1e-5, atol=1e-7)
    assert report.ok, report


def test_sigmoid_and_softmax_are_stable_for_large_inputs():
    big = np.array([[1000.0, -1000.0, 0.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        s = F.sigmoid(big)
        p = F.softmax(big)
        loss = F.softmax_cross_entropy(big, np.array([1]))
    np.testing.assert_allclose(s, [[1, 0, 0.5]])
    np.testing.assert_allclose(p, [[1, 0, 0]], atol=1e-30)
    assert loss == pytest.approx(2000.0)
    assert p.dtype == np.float32


def test_softmax_cross_entropy_gradient(rng):
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    g = F.softmax_cross_entropy_backward(logits, labels)
    from convnet.gradcheck import check_gradient
    report = check_gradient(lambda z: F.softmax_cross_entropy(z, labels), {"z": logits}, {"z": g})
    assert report.ok, report
    np.testing.assert_allclose(F.softmax(logits).sum(axis=1), 1.0)
    np.testing.assert_allclose(np.exp(F.log_softmax(logits)), F.softmax(logits))


def test_linear_and_mse_gradients(rng):
    x, w, b = rng.standard_normal((4, 3)), rng.standard_normal((2, 3)), rng.standard_normal(2)
    dy = rng.standard_normal((4, 2))
    dx, dw, db = F.linear_backward(dy, x, w)
    report = check_backward(F.linear, {"x": x, "weight": w, "bias": b}, dy, {"x": dx, "weight": dw, "bias": db})
    assert report.ok, report
    t = rng.standard_normal((4, 2))
    from convnet.gradcheck import check_gradient
    report = check_gradient(lambda p: F.mse_loss(p, t), {"p": dy}, {"p": F.mse_loss_backward(dy, t)})
    assert report.ok, report


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=4), st.floats(0.0, 0.95),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))
def test_dropout_masks_are_pinned_to_the_seed(shape, p, dtype, seed):
    """The mask of a seed is the float64 draw ``random(shape) >= p``, scaled: fixed across
    versions, so a resumed training run draws what the uninterrupted one drew."""
    x = readonly(np.random.default_rng(seed + 1).standard_normal(shape).astype(dtype))
    gen = np.random.default_rng(seed)
    y, mask = F.dropout(x, p, gen)
    keep = np.random.default_rng(seed).random(shape) >= p
    scale = dtype(1.0 / (1.0 - p))
    assert y.dtype == mask.dtype == dtype
    np.testing.assert_array_equal(mask, np.where(keep, scale, dtype(0)))
    np.testing.assert_array_equal(y, x * np.where(keep, scale, dtype(0)))
    # the generator moved on exactly as far as one draw of the shape
    ref = np.random.default_rng(seed)
    ref.random(shape)
    assert gen.random() == ref.random()


def test_dropout_mask_and_scaling(rng):
    x = np.ones((200, 50), dtype=np.float32)
    y, mask = F.dropout(x, 0.25, np.random.default_rng(1))
    assert y.dtype == np.float32
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(F.dropout_backward(x, mask), y)
    with pytest.raises(ValueError, match="p must"):
        F.dropout(x, 1.0, rng)
