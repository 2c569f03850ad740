"""The accumulating GEMM against numpy's matmul, on views, transposes and both dtypes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet import _blas


@st.composite
def gemm_case(draw):
    m, k, n = (draw(st.integers(1, 9)) for _ in range(3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def view(rows, cols):
        """A (rows, cols) operand: contiguous, a strided window, or a transposed view."""
        kind = draw(st.sampled_from(["plain", "window", "transposed"]))
        if kind == "plain":
            return rng.standard_normal((rows, cols)).astype(dtype)
        if kind == "window":
            return rng.standard_normal((rows + 2, cols + 3)).astype(dtype)[1:rows + 1, 2:cols + 2]
        return rng.standard_normal((cols, rows)).astype(dtype).T

    a, b = view(m, k), view(k, n)
    big = rng.standard_normal((m + 3, n + 2)).astype(dtype)
    c = big[1:m + 1, 1:n + 1] if draw(st.booleans()) else big[:m, :n].copy()
    beta = draw(st.sampled_from([0.0, 1.0]))
    return a, b, c, big, beta


def check(case):
    a, b, c, big, beta = case
    before_big = big.copy()
    expected = a @ b + (beta * c if beta else 0)
    is_view = np.shares_memory(c, big)
    _blas.gemm(a, b, c, beta=beta)
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)
    assert c.dtype == a.dtype
    if is_view:  # nothing outside the view was touched
        mask = np.ones(big.shape, bool)
        mask[1:1 + c.shape[0], 1:1 + c.shape[1]] = False
        np.testing.assert_array_equal(big[mask], before_big[mask])


@settings(max_examples=100, deadline=None)
@given(gemm_case())
def test_gemm_matches_matmul(case):
    check(case)


@settings(max_examples=30, deadline=None)
@given(gemm_case())
def test_fallback_without_cblas_matches_matmul(case):
    saved = dict(_blas._GEMM)
    _blas._GEMM.clear()
    try:
        check(case)
    finally:
        _blas._GEMM.update(saved)


def test_beta_zero_ignores_garbage():
    a = np.ones((3, 2), np.float32)
    b = np.ones((2, 4), np.float32)
    c = np.full((3, 4), np.nan, np.float32)
    _blas.gemm(a, b, c, beta=0.0)
    np.testing.assert_array_equal(c, 2.0)


def test_numpy_cblas_is_found_on_this_build():
    """numpy's wheels bundle OpenBLAS; finding it avoids a second BLAS thread pool."""
    info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if "openblas" not in info.get("name", ""):
        pytest.skip(f"numpy is built against {info.get('name')}, not a bundled OpenBLAS")
    assert _blas.available()
