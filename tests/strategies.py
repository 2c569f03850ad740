"""Hypothesis strategies for convolution and pooling configurations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class ConvCase:
    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    dy: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def kwargs(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


def out_len(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only copy: any in-place write by the code under test raises."""
    a = a.copy()
    a.flags.writeable = False
    return a


@st.composite
def conv_cases(draw, dtypes=(np.float64, np.float32), max_hw: int = 9, max_k: int = 4,
               max_c: int = 3, max_n: int = 2, max_f: int = 3) -> ConvCase:
    """Draw N, C, F, H, W, rectangular KH x KW, stride, padding (P >= K included), dilation, dtype."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    f = draw(st.integers(1, max_f))
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, max_k + 1)), draw(st.integers(0, max_k + 1))
    # H, W large enough that the dilated kernel fits the padded input.
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), max_hw))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), max_hw))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    oh, ow = out_len(h, kh, sh, ph, dh), out_len(w, kw, sw, pw, dw)
    return ConvCase(
        x=readonly(rng.standard_normal((n, c, h, w)).astype(dtype)),
        weight=readonly(rng.standard_normal((f, c, kh, kw)).astype(dtype)),
        bias=readonly(rng.standard_normal(f).astype(dtype)),
        dy=readonly(rng.standard_normal((n, f, oh, ow)).astype(dtype)),
        stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
    )


@dataclass(frozen=True)
class PoolCase:
    x: np.ndarray
    dy: np.ndarray
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def args(self) -> tuple:
        return (self.kernel, self.stride, self.padding)


@st.composite
def pool_cases(draw, dtypes=(np.float64, np.float32), distinct: bool = False) -> PoolCase:
    """Draw overlapping, padded, rectangular and non-dividing pooling windows.

    ``distinct=True`` draws a permutation so max pooling has no ties (for numerical gradients).
    """
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if distinct:
        x = rng.permutation(n * c * h * w).reshape(n, c, h, w) / 7.0
    elif draw(st.booleans()):
        x = rng.integers(-2, 3, (n, c, h, w)).astype(float)  # many ties
    else:
        x = rng.standard_normal((n, c, h, w))
    oh, ow = out_len(h, kh, sh, ph, 1), out_len(w, kw, sw, pw, 1)
    return PoolCase(
        x=readonly(x.astype(dtype)), dy=readonly(rng.standard_normal((n, c, oh, ow)).astype(dtype)),
        kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
    )


def tol(dtype) -> dict:
    """Comparison tolerances for results of the given dtype."""
    return {"rtol": 1e-4, "atol": 1e-4} if np.dtype(dtype) == np.float32 else {"rtol": 1e-9, "atol": 1e-9}
