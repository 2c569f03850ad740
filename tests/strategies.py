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


@dataclass(frozen=True, kw_only=True)
class GroupedCase(ConvCase):
    """A grouped conv2d (``kind="conv"``) or conv_transpose2d (``kind="transpose"``) problem.

    For a transpose, ``x`` is its input (N, C_in, H, W), ``weight`` (C_in, C_out/G, KH, KW)
    and ``dy`` has the shape of its output.
    """

    kind: str
    groups: int
    output_padding: tuple[int, int] = (0, 0)

    @property
    def kwargs(self) -> dict:
        kw = dict(super().kwargs, groups=self.groups)
        if self.kind == "transpose":
            kw["output_padding"] = self.output_padding
        return kw


@st.composite
def grouped_cases(draw, kind: str = "conv", dtypes=(np.float64, np.float32), max_groups: int = 3,
                  max_hw: int = 7, max_k: int = 3) -> GroupedCase:
    """Draw groups G and channels per group (depthwise included), with any stride, padding and dilation."""
    g = draw(st.integers(1, max_groups))
    cg, fg = draw(st.integers(1, 2)), draw(st.integers(1, 2))  # cg = fg = 1: depthwise
    n = draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "conv":
        ph, pw = draw(st.integers(0, max_k)), draw(st.integers(0, max_k))
        h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), max_hw))
        w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), max_hw))
        x_shape, w_shape, op = (n, g * cg, h, w), (g * fg, cg, kh, kw), (0, 0)
        out_shape = (n, g * fg, out_len(h, kh, sh, ph, dh), out_len(w, kw, sw, pw, dw))
        bias_len = g * fg
    else:
        h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        oph, opw = draw(st.integers(0, max(sh, dh) - 1)), draw(st.integers(0, max(sw, dw) - 1))
        full_h, full_w = (h - 1) * sh + dh * (kh - 1) + 1 + oph, (w - 1) * sw + dw * (kw - 1) + 1 + opw
        ph, pw = draw(st.integers(0, (full_h - 1) // 2)), draw(st.integers(0, (full_w - 1) // 2))
        x_shape, w_shape, op = (n, g * cg, h, w), (g * cg, fg, kh, kw), (oph, opw)
        out_shape = (n, g * fg, full_h - 2 * ph, full_w - 2 * pw)
        bias_len = g * fg
    return GroupedCase(
        kind=kind,
        x=readonly(rng.standard_normal(x_shape).astype(dtype)),
        weight=readonly(rng.standard_normal(w_shape).astype(dtype)),
        bias=readonly(rng.standard_normal(bias_len).astype(dtype)),
        dy=readonly(rng.standard_normal(out_shape).astype(dtype)),
        stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=g, output_padding=op,
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
def pool_cases(draw, dtypes=(np.float64, np.float32), distinct: bool = False, tiled: bool = False,
               special: bool = False, kernel: tuple[int, int] | None = None,
               stride_is_kernel: bool = False) -> PoolCase:
    """Draw overlapping, padded, rectangular and non-dividing pooling windows.

    ``distinct=True`` draws a permutation so max pooling has no ties (for numerical gradients).
    ``tiled=True`` makes each axis, independently and mostly, tiled: stride equal to the
    kernel and the padded size a multiple of it (with or without padding), so both the
    tiled case and the mixed one (one axis tiled, the other not) come up.
    ``special=True`` puts nan, inf or -inf at some places of ``x`` and of ``dy``.
    ``kernel`` fixes the window size; ``stride_is_kernel=True`` puts the windows side by side
    (stride equal to the kernel on both axes; sizes still free, so a remainder may be left).
    """
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kh, kw = kernel or (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    sh, sw = (kh, kw) if stride_is_kernel else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    if tiled:
        if draw(st.sampled_from([True, True, True, False])):
            sh, h = kh, draw(st.integers(1 if kh > 2 * ph else 2, 3)) * kh - 2 * ph
        if draw(st.sampled_from([True, True, True, False])):
            sw, w = kw, draw(st.integers(1 if kw > 2 * pw else 2, 3)) * kw - 2 * pw
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if distinct:
        x = rng.permutation(n * c * h * w).reshape(n, c, h, w) / 7.0
    elif draw(st.booleans()):
        x = rng.integers(-2, 3, (n, c, h, w)).astype(float)  # many ties
    else:
        x = rng.standard_normal((n, c, h, w))
    oh, ow = out_len(h, kh, sh, ph, 1), out_len(w, kw, sw, pw, 1)
    dy = rng.standard_normal((n, c, oh, ow))
    if special:
        for a in (x, dy):
            values = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=1, max_size=3))
            for v in values:
                a[rng.random(a.shape) < 0.15] = v
    return PoolCase(
        x=readonly(x.astype(dtype)), dy=readonly(dy.astype(dtype)),
        kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
    )


def tol(dtype) -> dict:
    """Comparison tolerances for results of the given dtype."""
    return {"rtol": 1e-4, "atol": 1e-4} if np.dtype(dtype) == np.float32 else {"rtol": 1e-9, "atol": 1e-9}
