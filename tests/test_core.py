"""The CNHW im2col core against independent index arithmetic."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet import _jit, core
from convnet._args import output_size
from strategies import out_len


@st.composite
def geometry(draw):
    c, n = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    hp = draw(st.integers(dh * (kh - 1) + 1, 10))
    wp = draw(st.integers(dw * (kw - 1) + 1, 10))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    oh, ow = out_len(hp, kh, sh, 0, dh), out_len(wp, kw, sw, 0, dw)
    return (c, n, hp, wp), (kh, kw), (sh, sw), (dh, dw), (oh, ow), dtype


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_im2col_matches_index_oracle(geo, seed):
    shape, k, s, d, out_hw, dtype = geo
    c, n = shape[:2]
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    cols = core.im2col(x, k, s, d, out_hw)
    assert cols.dtype == dtype and cols.strides[1] == cols.itemsize
    assert cols.shape == (k[0] * k[1] * c, n * out_hw[0] * out_hw[1])
    # Every entry, by its definition: row (u, v, ch), column (m, i, j) reads
    # x[ch, m, i*S + u*D, j*S + v*D].
    for row in range(cols.shape[0]):
        u, v, ch = row // (k[1] * c), row // c % k[1], row % c
        for col in range(cols.shape[1]):
            m, i, j = col // (out_hw[0] * out_hw[1]), col // out_hw[1] % out_hw[0], col % out_hw[1]
            assert cols[row, col] == x[ch, m, i * s[0] + u * d[0], j * s[1] + v * d[1]]


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_col2im_is_the_adjoint_of_im2col(geo, seed):
    """<im2col(x), c> == <x, col2im(c)> for every x and c: col2im is the exact transpose."""
    shape, k, s, d, out_hw, dtype = geo
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    c = rng.standard_normal((k[0] * k[1] * shape[0], shape[1] * out_hw[0] * out_hw[1]))
    lhs = np.vdot(core.im2col(x, k, s, d, out_hw), c)
    rhs = np.vdot(x, core.col2im(c, shape, k, s, d, out_hw))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
    assert core.col2im(c.astype(dtype), shape, k, s, d, out_hw).dtype == dtype


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_im2col_chwn_is_im2col_with_the_batch_innermost(geo, seed):
    """Same rows as the CNHW column matrix, columns reordered from (n, oh, ow) to (oh, ow, n)."""
    shape, k, s, d, out_hw, dtype = geo
    c, n, hp, wp = shape
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    cols = core.im2col_chwn(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), k, s, d, out_hw)
    assert cols.dtype == dtype and cols.shape == (k[0] * k[1] * c, out_hw[0] * out_hw[1] * n)
    want = core.im2col(x, k, s, d, out_hw).reshape(-1, n, *out_hw).transpose(0, 2, 3, 1).reshape(cols.shape)
    np.testing.assert_array_equal(cols, want)


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_col2im_chwn_is_the_adjoint_of_im2col_chwn(geo, seed):
    shape, k, s, d, out_hw, dtype = geo
    c, n, hp, wp = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c, hp, wp, n))
    cols = rng.standard_normal((k[0] * k[1] * c, out_hw[0] * out_hw[1] * n))
    lhs = np.vdot(core.im2col_chwn(x, k, s, d, out_hw), cols)
    rhs = np.vdot(x, core.col2im_chwn(cols, x.shape, k, s, d, out_hw))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)
    assert core.col2im_chwn(cols.astype(dtype), x.shape, k, s, d, out_hw).dtype == dtype


@pytest.mark.skipif(not _jit.available(), reason="numba not installed")
@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(0, 2**32 - 1))
def test_compiled_col2im_chwn_gives_the_numpy_bits(geo, seed):
    """The numba kernel adds the same taps in the same order as the numpy loop."""
    shape, k, s, d, out_hw, dtype = geo
    c, n, hp, wp = shape
    cols = np.random.default_rng(seed).standard_normal((k[0] * k[1] * c, out_hw[0] * out_hw[1] * n)).astype(dtype)
    before = cols.copy()
    _jit._State.ready_calls = max(_jit._State.ready_calls, _jit.WARMUP_CALLS)  # past the warm-up
    got = core.col2im_chwn(cols, (c, hp, wp, n), k, s, d, out_hw)  # compiled
    want = np.zeros((c, hp, wp, n), dtype)
    core._col2im_chwn_numpy(cols.reshape(k[0], k[1], c, out_hw[0], out_hw[1], n), want, s, d)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cols, before)


@pytest.mark.skipif(not _jit.available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_col2im_chwn_on_padded_rows(dtype, monkeypatch):
    """Column matrix and result both with row_buffer's padded row stride (rows of 1 KiB
    multiples): the compiled loop reads and writes through the whole-rows views."""
    k, c, n, out_hw, padded = (5, 5), 3, 32 if dtype == np.float32 else 16, (4, 4), (3, 8, 8)
    cols = core.row_buffer((k[0] * k[1] * c,) + out_hw + (n,), dtype)
    cols[...] = np.random.default_rng(0).standard_normal(cols.shape)
    m = core.as_matrix(cols)
    assert not m.flags.c_contiguous and core._whole_rows(m) is not None
    monkeypatch.setattr(_jit, "WARMUP_CALLS", 0)
    ran = []
    monkeypatch.setattr(_jit, "run", lambda name, *args, run=_jit.run: (ran.append(name), run(name, *args)))
    got = core.col2im_chwn(m, padded + (n,), k, (1, 1), (1, 1), out_hw)
    assert ran == ["core.col2im_chwn"]
    assert not got.flags.c_contiguous  # the result's rows are padded too
    want = np.zeros(padded + (n,), dtype)
    core._col2im_chwn_numpy(np.ascontiguousarray(cols).reshape(k + (c,) + out_hw + (n,)), want, (1, 1), (1, 1))
    np.testing.assert_array_equal(got, want)


def test_compiled_kernels_wait_for_the_warm_up_calls(monkeypatch):
    """The first WARMUP_CALLS calls take the numpy twins (a short run never imports numba),
    later ones the compiled kernels where numba is installed."""
    monkeypatch.setattr(_jit, "WARMUP_CALLS", 3)
    monkeypatch.setattr(_jit._State, "ready_calls", 0)
    assert [_jit.ready() for _ in range(5)] == [False, False, False, _jit.available(), _jit.available()]


def test_whole_rows_only_spans_memory_the_buffer_holds():
    big = np.zeros((4, 10), np.float32)
    rows = core._whole_rows(big[:, :7])
    assert rows.shape == (4, 10) and rows.flags.c_contiguous and np.shares_memory(rows, big)
    assert core._whole_rows(big[1:, 2:9]) is None  # the last row's gap would run past the buffer
    assert core._whole_rows(big[:, ::2]) is None  # rows not contiguous
    assert core._whole_rows(big).shape == big.shape and np.shares_memory(core._whole_rows(big), big)


def test_nchw_to_chwn_pads_and_moves_the_batch_last():
    x = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    out = core.nchw_to_chwn(x, ((1, 0), (2, 1)), reuse="test.chwn")
    assert out.shape == (3, 3, 7, 2) and out.dtype == np.float32
    want = np.pad(x, ((0, 0), (0, 0), (1, 0), (2, 1))).transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(out, want)
    out.fill(np.nan)  # a reused scratch array gets its border zeroed again
    np.testing.assert_array_equal(core.nchw_to_chwn(x, ((1, 0), (2, 1)), reuse="test.chwn"), want)
    core.release_scratch()


def test_gemm_chwn_into_nchw_adds_the_bias():
    rng = np.random.default_rng(0)
    wm, cols, bias = rng.standard_normal((3, 4)), rng.standard_normal((4, 2 * 5 * 6)), rng.standard_normal(3)
    out = np.empty((6, 3, 2, 5))
    core.gemm_chwn_into_nchw(wm, cols, out, bias)
    want = (wm @ cols).reshape(3, 2, 5, 6).transpose(3, 0, 1, 2) + bias.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(out, want, rtol=1e-12)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 9), f=st.integers(1, 5), k=st.integers(1, 7), ohw=st.integers(1, 6),
       padded=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gemm_into_nchw_both_ways(per_image, bias, n, f, k, ohw, padded, seed):
    """One GEMM per image or per block of images with a transpose: both equal ``wm @ cols``
    laid out NCHW (the column matrix's rows padded or not, any block split of the batch)."""
    rng = np.random.default_rng(seed)
    wm = rng.standard_normal((f, k))
    cols = core.as_matrix(core.row_buffer((k, n, ohw, 1), np.float64)) if padded else np.empty((k, n * ohw))
    cols[...] = rng.standard_normal(cols.shape)
    b = rng.standard_normal(f) if bias else None
    out = np.full((n, f, ohw, 1), np.nan)
    core.gemm_into_nchw(wm, cols, out, b, blocks=3, per_image=per_image)
    want = (wm @ cols).reshape(f, n, ohw, 1).transpose(1, 0, 2, 3) + (0 if b is None else b.reshape(1, f, 1, 1))
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def test_col2im_accumulates_overlaps():
    # 1x3 input, kernel 2, stride 1: the middle pixel belongs to both windows.
    cols = np.ones((2, 2), dtype=np.float32)
    out = core.col2im(cols, (1, 1, 1, 3), (1, 2), (1, 1), (1, 1), (1, 2))
    np.testing.assert_array_equal(out.ravel(), [1, 2, 1])
    assert out.dtype == np.float32


@settings(max_examples=40, deadline=None)
@given(geometry(), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_correlate_taps_matches_kernel_matrix_times_im2col(geo, f, seed):
    shape, k, _, d, _, dtype = geo
    out_hw = (shape[2] - d[0] * (k[0] - 1), shape[3] - d[1] * (k[1] - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    wm = rng.standard_normal((f, k[0] * k[1] * shape[0])).astype(dtype)
    got = core.correlate_taps(x, wm, k, d, out_hw)
    want = (wm @ core.im2col(x, k, (1, 1), d, out_hw)).reshape((f, shape[1]) + out_hw)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(geometry(), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_transposed_taps_matches_col2im_of_the_gemm(geo, f, seed):
    shape, k, s, d, out_hw, dtype = geo
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((f, shape[1]) + out_hw).astype(dtype)
    wm = rng.standard_normal((f, k[0] * k[1] * shape[0])).astype(dtype)
    got = core.transposed_taps(dy, wm, shape[2:], k, s, d)
    want = core.col2im(wm.T @ dy.reshape(f, -1), shape, k, s, d, out_hw)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)


def test_row_buffer_pads_aliasing_row_strides():
    a = core.row_buffer((3, 16, 16), np.float32)  # 256 floats = 1 KiB per row: padded
    assert a.shape == (3, 16, 16) and a.strides[0] > 256 * 4
    m = core.as_matrix(a)
    m[...] = 1.0  # a view: writes reach the buffer
    assert np.all(a == 1.0)
    assert core.row_buffer((2, 5), np.float64, fill=0.0).strides == (40, 8)


def test_kernel_matrices_order_rows_like_im2col():
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2)  # (F, C, KH, KW)
    wm = core.kernel_matrix(w)
    assert wm.shape == (2, 2 * 2 * 3)
    for f, u, v, c in np.ndindex(2, 2, 2, 3):
        assert wm[f, (u * 2 + v) * 3 + c] == w[f, c, u, v]
    flipped = core.flipped_kernel_matrix(w)
    assert flipped.shape == (3, 2 * 2 * 2)
    for c, u, v, f in np.ndindex(3, 2, 2, 2):
        assert flipped[c, (u * 2 + v) * 2 + f] == w[f, c, 1 - u, 1 - v]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(-3, 3), st.integers(-3, 3), st.integers(-3, 3), st.integers(-3, 3))
def test_zero_insert_matches_definition(oh, ow, sh, sw, pt, pb, pl, pr):
    dy = np.arange(1, oh * ow + 1, dtype=np.float32).reshape(1, 1, oh, ow)
    eh, ew = (oh - 1) * sh + 1, (ow - 1) * sw + 1
    if eh + pt + pb < 1 or ew + pl + pr < 1:
        return
    z = core.zero_insert(dy, (sh, sw), ((pt, pb), (pl, pr)))
    assert z.shape == (1, 1, eh + pt + pb, ew + pl + pr) and z.dtype == np.float32
    expected = np.zeros(z.shape, dtype=np.float32)
    for i in range(oh):
        for j in range(ow):
            r, c = pt + i * sh, pl + j * sw
            if 0 <= r < z.shape[2] and 0 <= c < z.shape[3]:
                expected[0, 0, r, c] = dy[0, 0, i, j]
    np.testing.assert_array_equal(z, expected)


def test_zero_insert_stride_two_example():
    dy = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    z = core.zero_insert(dy, (2, 2), ((1, 1), (1, 1)))[0, 0]
    np.testing.assert_array_equal(z, [[0, 0, 0, 0, 0], [0, 1, 0, 2, 0], [0, 0, 0, 0, 0],
                                      [0, 3, 0, 4, 0], [0, 0, 0, 0, 0]])


def test_nchw_to_cnhw_pads_and_swaps_leading_axes():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    out = core.nchw_to_cnhw(x, ((1, 0), (0, 2)))
    assert out.shape == (3, 2, 3, 4) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out[:, :, 1:, :2], x.transpose(1, 0, 2, 3))
    assert np.all(out[:, :, 0] == 0) and np.all(out[:, :, :, 2:] == 0)


def test_cnhw_to_nchw_adds_the_bias():
    y = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2)  # (F, N, OH, OW)
    out = np.empty((3, 2, 2, 2))
    core.cnhw_to_nchw(y, out, np.array([10.0, 20.0]))
    np.testing.assert_array_equal(out, y.transpose(1, 0, 2, 3) + np.array([10.0, 20.0])[:, None, None])


def test_output_size_floor_rule():
    assert output_size(5, 3, 2, (1, 1)) == 3  # the tutorial's (5 - 3 + 2)/2 + 1
    assert output_size(28, 5, 1, (2, 2)) == 28
    assert output_size(7, 2, 2, (0, 0)) == 3  # stride does not divide: last column unused
    assert output_size(9, 3, 1, (0, 0), d=3) == 3


def test_workspace_limit_rejects_bad_values_and_restores():
    old = core.get_workspace_limit()
    with pytest.raises(ValueError, match="nbytes"):
        core.set_workspace_limit(0)
    with pytest.raises(ValueError, match="nbytes"):
        with core.workspace_limit(True):
            pass
    with core.workspace_limit(1024):
        assert core.get_workspace_limit() == 1024
        with core.workspace_limit(2048):
            assert core.get_workspace_limit() == 2048
        assert core.get_workspace_limit() == 1024
    assert core.get_workspace_limit() == old


def test_workspace_limit_is_per_thread_and_restores_when_nested_out_of_order():
    """Two threads enter the context in one order and leave it in the other (the issue's case)."""
    import threading

    default = core.get_workspace_limit()
    steps = [threading.Event() for _ in range(4)]
    seen: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(name: str, limit: int, enter: int, leave: int, entered: int, left: int) -> None:
        try:
            steps[enter].wait(5)
            with core.workspace_limit(limit):
                steps[entered].set()
                steps[leave].wait(5)
                seen[name].append(core.get_workspace_limit())
            seen[name].append(core.get_workspace_limit())
            steps[left].set()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    # a enters first (0 -> 1), then b (1 -> 2); a leaves first (2 -> 3), then b (3 -> done).
    ta = threading.Thread(target=worker, args=("a", 1000, 0, 2, 1, 3))
    tb = threading.Thread(target=worker, args=("b", 2000, 1, 3, 2, 0))
    ta.start()
    tb.start()
    steps[0].set()
    ta.join(10)
    tb.join(10)
    assert not errors, errors
    assert seen == {"a": [1000, default], "b": [2000, default]}
    assert core.get_workspace_limit() == default
    # set_workspace_limit changes the process-wide default, which other threads see.
    with core.workspace_limit(4096):
        out = []
        t = threading.Thread(target=lambda: out.append(core.get_workspace_limit()))
        t.start()
        t.join()
        assert out == [default] and core.get_workspace_limit() == 4096


def test_scratch_arrays_are_reused_per_name_and_released():
    core.release_scratch()
    a = core.row_buffer((4, 3, 5), np.float32, reuse="t.a")
    b = core.row_buffer((2, 3, 5), np.float32, fill=0.0, reuse="t.a")  # smaller: same memory
    c = core.row_buffer((4, 3, 5), np.float32, reuse="t.c")
    d = core.row_buffer((4, 3, 5), np.float64, reuse="t.a")  # other dtype: its own array
    assert np.shares_memory(a, b) and not np.shares_memory(a, c) and not np.shares_memory(a, d)
    assert np.all(b == 0) and b.shape == (2, 3, 5)
    assert core.scratch_bytes() >= a.nbytes + c.nbytes + d.nbytes
    core.release_scratch()
    assert core.scratch_bytes() == 0
    assert not np.shares_memory(core.row_buffer((4, 3, 5), np.float32, reuse="t.a"), a)
    core.release_scratch()


def test_scratch_is_per_thread():
    import threading

    core.release_scratch()
    mine = core.row_buffer((8,), np.float32, reuse="t.thread")
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(core.row_buffer((8,), np.float32, reuse="t.thread")))
    t.start()
    t.join()
    assert not np.shares_memory(mine, theirs[0])
    core.release_scratch()


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7),
       st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 2), st.integers(1, 2), st.integers(0, 5), st.integers(0, 5), st.integers(0, 3),
       st.integers(0, 3), st.sampled_from([np.float32, np.float64]))
def test_im2col_from_nchw_equals_im2col_of_the_padded_copy(n, c, h, w, kh, kw, sh, sw, dh, dw,
                                                             pt, pl, pb, pr, dtype):
    """Reading NCHW directly (padding as zeroed borders, P >= K included) changes nothing."""
    pads = ((pt, pb), (pl, pr))
    oh, ow = output_size(h, kh, sh, pads[0], dh), output_size(w, kw, sw, pads[1], dw)
    if oh < 1 or ow < 1:
        return
    x = np.random.default_rng(h * 10 + w).standard_normal((n, c, h, w)).astype(dtype)
    args = ((kh, kw), (sh, sw), (dh, dw), (oh, ow))
    want = core.im2col(core.nchw_to_cnhw(x, pads), *args)
    core.row_buffer((want.size + 7,), dtype, fill=np.nan, reuse="t.nan")  # dirty scratch memory
    got = core.im2col_nchw(x, pads, *args, reuse="t.nan")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    core.release_scratch()
