"""The im2col core against independent index arithmetic."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet import core

from strategies import out_len


@st.composite
def geometry(draw):
    # Channel counts on both sides of SMALL_CHANNELS, which switches the column layout.
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2 * core.SMALL_CHANNELS))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    hp = draw(st.integers(dh * (kh - 1) + 1, 10))
    wp = draw(st.integers(dw * (kw - 1) + 1, 10))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    oh, ow = out_len(hp, kh, sh, 0, dh), out_len(wp, kw, sw, 0, dw)
    return (n, hp, wp, c), (kh, kw), (sh, sw), (dh, dw), (oh, ow), dtype


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_im2col_matches_index_oracle(geo, seed):
    shape, k, s, d, out_hw, dtype = geo
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    cols = core.im2col(x, k, s, d, out_hw)
    assert cols.dtype == dtype
    assert cols.shape == (shape[0] * out_hw[0] * out_hw[1], k[0] * k[1] * shape[3])
    blocks = cols.reshape(shape[0], out_hw[0], out_hw[1], k[0], k[1], shape[3])
    # Every entry, by its definition: window (i, j), tap (u, v) reads x[i*S + u*D, j*S + v*D].
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            for u in range(k[0]):
                for v in range(k[1]):
                    np.testing.assert_array_equal(
                        blocks[:, i, j, u, v, :], x[:, i * s[0] + u * d[0], j * s[1] + v * d[1], :])


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_col2im_is_the_adjoint_of_im2col(geo, seed):
    """<im2col(x), c> == <x, col2im(c)> for every x and c: col2im is the exact transpose."""
    shape, k, s, d, out_hw, dtype = geo
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    c = rng.standard_normal((shape[0] * out_hw[0] * out_hw[1], k[0] * k[1] * shape[3]))
    lhs = np.vdot(core.im2col(x, k, s, d, out_hw), c)
    rhs = np.vdot(x, core.col2im(c, shape, k, s, d, out_hw))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
    assert core.col2im(c.astype(dtype), shape, k, s, d, out_hw).dtype == dtype


def test_col2im_accumulates_overlaps():
    # 1x3 input, kernel 2, stride 1: the middle pixel belongs to both windows.
    cols = np.ones((2, 2), dtype=np.float32)
    out = core.col2im(cols, (1, 1, 3, 1), (1, 2), (1, 1), (1, 1), (1, 2))
    np.testing.assert_array_equal(out.ravel(), [1, 2, 1])
    assert out.dtype == np.float32


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(-3, 3), st.integers(-3, 3), st.integers(-3, 3), st.integers(-3, 3))
def test_zero_insert_matches_definition(oh, ow, sh, sw, pt, pb, pl, pr):
    dy = np.arange(1, oh * ow + 1, dtype=np.float32).reshape(1, oh, ow, 1)
    eh, ew = (oh - 1) * sh + 1, (ow - 1) * sw + 1
    if eh + pt + pb < 1 or ew + pl + pr < 1:
        return
    z = core.zero_insert(dy, (sh, sw), ((pt, pb), (pl, pr)))
    assert z.shape == (1, eh + pt + pb, ew + pl + pr, 1) and z.dtype == np.float32
    expected = np.zeros(z.shape, dtype=np.float32)
    for i in range(oh):
        for j in range(ow):
            r, c = pt + i * sh, pl + j * sw
            if 0 <= r < z.shape[1] and 0 <= c < z.shape[2]:
                expected[0, r, c, 0] = dy[0, i, j, 0]
    np.testing.assert_array_equal(z, expected)


def test_zero_insert_stride_two_example():
    dy = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    z = core.zero_insert(dy, (2, 2), ((1, 1), (1, 1)))[0, :, :, 0]
    np.testing.assert_array_equal(z, [[0, 0, 0, 0, 0], [0, 1, 0, 2, 0], [0, 0, 0, 0, 0],
                                      [0, 3, 0, 4, 0], [0, 0, 0, 0, 0]])


def test_pad_nchw_to_nhwc_pads_and_transposes():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    out = core.pad_nchw_to_nhwc(x, ((1, 0), (0, 2)), value=-np.inf)
    assert out.shape == (2, 3, 4, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 1:, :2, :], x.transpose(0, 2, 3, 1))
    assert np.all(out[:, 0] == -np.inf) and np.all(out[:, :, 2:] == -np.inf)


def test_output_size_floor_rule():
    assert core.output_size(5, 3, 2, (1, 1)) == 3  # the tutorial's (5 - 3 + 2)/2 + 1
    assert core.output_size(28, 5, 1, (2, 2)) == 28
    assert core.output_size(7, 2, 2, (0, 0)) == 3  # stride does not divide: last column unused
    assert core.output_size(9, 3, 1, (0, 0), d=3) == 3


def test_workspace_limit_rejects_bad_values_and_restores():
    old = core.get_workspace_limit()
    with pytest.raises(ValueError, match="nbytes"):
        core.set_workspace_limit(0)
    with core.workspace_limit(1024):
        assert core.get_workspace_limit() == 1024
        assert [(s.start, s.stop) for s in core.chunks(5, 400)] == [(0, 2), (2, 4), (4, 5)]
        assert [(s.start, s.stop) for s in core.chunks(3, 5000)] == [(0, 1), (1, 2), (2, 3)]
    assert core.get_workspace_limit() == old
