"""The compiled Winograd F(4x4, 3x3) path against the loop reference and numerical gradients.

Tolerances come from the algorithm's worst-case rounding bound (see ``bound``), not from
what was observed; one deterministic case also pins the accuracy the README states.
Shapes stay small: every dtype compiles each kernel once per process (numba caches the
machine code on disk, so later runs load it).
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convnet.functional as F
from convnet import _blas, _conv, _jit, core, reference
from convnet import _winograd as W
from convnet.gradcheck import check_backward
from strategies import readonly

# numba is the `fast` extra; the test extra installs it, so CI runs every test here.
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def amplification() -> tuple[float, float]:
    """Worst-case growth of one output of the forward and of the weight gradient.

    Forward: every term of ``A^T [(G g G^T) * (B^T d B)] A`` at output (i, j) is at most
    ``a_i a_j max|g| max|d|`` with ``a = |A^T| (|G| 1 * |B^T| 1)``; the direct sum of 9
    products would give 9. Weight gradient: ``G^T [(A dY A^T) * (B^T d B)] G`` likewise,
    with ``|G|^T (|A| 1 * |B^T| 1)``.
    """
    ones3, ones4, ones6 = np.ones(3), np.ones(4), np.ones(6)
    a = np.abs(W.AT) @ ((np.abs(W.G) @ ones3) * (np.abs(W.BT) @ ones6))
    g = np.abs(W.G).T @ ((np.abs(W.AT).T @ ones4) * (np.abs(W.BT) @ ones6))
    return float(a.max() ** 2), float(g.max() ** 2)


FWD_GROWTH, DW_GROWTH = amplification()


def bound(dtype, terms: int, growth: float, *scales: float) -> float:
    """Rounding bound of a sum of ``terms`` transformed products: each passes through at most
    ``terms + 12`` roundings (3 per transform stage, the rest in the GEMM's sum)."""
    u = np.finfo(dtype).eps / 2
    steps = terms + 12
    return steps * u / (1 - steps * u) * terms * growth * float(np.prod(scales))


def amax(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


@st.composite
def cases(draw, dtypes=(np.float64, np.float32), max_hw=11, max_c=3):
    """N, C, F, H, W (odd and tiny included), paddings 0-4 per side, dtype, with or without bias."""
    n, c, f = draw(st.integers(1, 2)), draw(st.integers(1, max_c)), draw(st.integers(1, 3))
    pads = tuple(draw(st.integers(0, 4)) for _ in range(4))  # top, bottom, left, right
    h = draw(st.integers(max(1, 3 - pads[0] - pads[1]), max_hw))
    w = draw(st.integers(max(1, 3 - pads[2] - pads[3]), max_hw))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, 3, 3)).astype(dtype)
    bias = rng.standard_normal(f).astype(dtype) if draw(st.booleans()) else None
    out_hw = (h + pads[0] + pads[1] - 2, w + pads[2] + pads[3] - 2)
    dy = rng.standard_normal((n, f) + out_hw).astype(dtype)
    return readonly(x), readonly(wt), bias, readonly(dy), pads


def reference_pair(x, wt, bias, dy, pads):
    """Loop-reference forward and gradients for per-side pads (it takes symmetric ones):
    pad ``x`` by the difference and crop ``dx``."""
    top, bottom, left, right = pads
    ph, pw = min(top, bottom), min(left, right)
    extra = ((top - ph, bottom - ph), (left - pw, right - pw))
    xp = np.pad(x, ((0, 0), (0, 0)) + extra)
    y = reference.conv2d(xp, wt, bias, padding=(ph, pw))
    dxp, dw, _ = reference.conv2d_backward(dy, xp, wt, padding=(ph, pw))
    h, w = x.shape[2:]
    return y, dxp[:, :, extra[0][0]:extra[0][0] + h, extra[1][0]:extra[1][0] + w], dw


def winograd(x, wt, bias, pads_before, out_hw, keep=False):
    """The module's forward, allocating its output."""
    y = np.empty((x.shape[0], wt.shape[0]) + tuple(out_hw), dtype=x.dtype)
    return y, W.forward(x, wt, bias, pads_before, y, keep)


def winograd_backward(dy, x, wt, pads_before, tiles=None, input_grad=True):
    dx = None
    if input_grad:
        dx = np.empty(x.shape, dtype=x.dtype)
        W.input_gradient(dy, wt, pads_before, dx)
    return dx, W.weight_gradient(dy, x, wt, pads_before, tiles)


def check_against_reference(x, wt, bias, dy, pads, keep: bool):
    top, _, left, _ = pads
    out_hw = dy.shape[2:]
    y, tiles = winograd(x, wt, bias, (top, left), out_hw, keep=keep)
    dx, dw = winograd_backward(dy, x, wt, (top, left), tiles)
    y_ref, dx_ref, dw_ref = reference_pair(x, wt, bias, dy, pads)
    n, c = x.shape[:2]
    f = wt.shape[0]
    b = 0.0 if bias is None else amax(bias)
    tiles_per_image = -(-out_hw[0] // 4) * -(-out_hw[1] // 4)
    for name, got, want, limit in (
            ("y", y, y_ref, bound(x.dtype, c, FWD_GROWTH, amax(x), amax(wt)) + 4 * np.finfo(x.dtype).eps * b),
            ("dx", dx, dx_ref, bound(x.dtype, f, FWD_GROWTH, amax(dy), amax(wt))),
            ("dw", dw, dw_ref, bound(x.dtype, n * tiles_per_image, DW_GROWTH, amax(dy), amax(x)))):
        assert got.dtype == x.dtype and got.shape == want.shape, name
        err = amax(got.astype(np.float64) - want.astype(np.float64))
        assert err <= limit, f"{name}: error {err:.3g} above the bound {limit:.3g}"


@needs_numba
@settings(max_examples=60, deadline=None)
@given(cases(), st.booleans())
def test_forward_and_gradients_match_the_loop_reference(case, keep):
    check_against_reference(*case, keep=keep)


@needs_numba
@settings(max_examples=10, deadline=None)
@given(cases(dtypes=(np.float64,), max_hw=5, max_c=2))
def test_gradients_match_numerical(case):
    x, wt, bias, dy, pads = case
    top, _, left, _ = pads
    out_hw = dy.shape[2:]
    dx, dw = winograd_backward(dy, x, wt, (top, left))
    report = check_backward(lambda x, weight: winograd(x, weight, None, (top, left), out_hw)[0],
                            {"x": x, "weight": wt}, dy, {"x": dx, "weight": dw}, rtol=1e-5, atol=1e-6)
    assert report.ok, report


@pytest.mark.parametrize("hw, pads", [((1, 1), (1, 1, 1, 1)), ((2, 7), (0, 1, 3, 0)), ((5, 3), (4, 4, 0, 0)),
                                      ((13, 6), (0, 0, 0, 0))])
@needs_numba
def test_odd_sizes_and_large_padding(hw, pads):
    """Outputs smaller than a tile, one ragged tile edge, padding wider than the kernel."""
    rng = np.random.default_rng(sum(hw) + sum(pads))
    x = rng.standard_normal((2, 3) + hw)
    wt = rng.standard_normal((2, 3, 3, 3))
    out_hw = (hw[0] + pads[0] + pads[1] - 2, hw[1] + pads[2] + pads[3] - 2)
    check_against_reference(x, wt, rng.standard_normal(2), rng.standard_normal((2, 2) + out_hw), pads, keep=True)


@needs_numba
def test_float32_accuracy_is_as_documented():
    """The README's figures: on a 32-channel layer the forward and input gradient stay within
    2e-5 of the largest output (about 5e-6 measured), the weight gradient within 5e-5. The
    witness is the exact im2col algorithm in float64 (the loop reference agrees with it to
    1e-10 elsewhere, and is slow at this size)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 32, 16, 16))
    wt = rng.standard_normal((16, 32, 3, 3)) / np.sqrt(32 * 9)
    dy = rng.standard_normal((2, 16, 16, 16))
    exact_y = F.conv2d(x, wt, None, padding=1, algo="im2col")
    exact_dx, exact_dw, _ = F.conv2d_backward(dy, x, wt, padding=1, method="col2im", algo="im2col")
    f32 = [a.astype(np.float32) for a in (x, wt, dy)]
    y, tiles = winograd(f32[0], f32[1], None, (1, 1), (16, 16), keep=True)
    dx, dw = winograd_backward(f32[2], f32[0], f32[1], (1, 1), tiles)
    for name, got, want, limit in (("y", y, exact_y, 2e-5), ("dx", dx, exact_dx, 2e-5), ("dw", dw, exact_dw, 5e-5)):
        rel = amax(got - want) / amax(want)
        assert rel <= limit, f"{name}: relative error {rel:.2e}"
        assert rel > 1e-8, f"{name}: suspiciously exact for float32 ({rel:.1e})"


@needs_numba
def test_inputs_are_not_modified_and_views_work():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 12, 18))[:, :, ::2, 1:16:2]  # a strided view
    wt = np.asfortranarray(rng.standard_normal((4, 3, 3, 3)))
    dy = rng.standard_normal((2, 4, 6, 8, 2))[..., 1]
    copies = [a.copy() for a in (x, wt, dy)]
    y, tiles = winograd(x, wt, None, (1, 1), (6, 8), keep=True)
    dx, dw = winograd_backward(dy, x, wt, (1, 1), tiles)
    for a, b in zip((x, wt, dy), copies):
        np.testing.assert_array_equal(a, b)
    want = reference_pair(np.ascontiguousarray(x), np.ascontiguousarray(wt), None, np.ascontiguousarray(dy),
                          (1, 1, 1, 1))
    for got, ref in zip((y, dx, dw), want):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


@needs_numba
def test_results_do_not_depend_on_the_thread_count():
    """The threads split channels, filters and GEMM frequencies, never a sum (the weight
    gradient's GEMMs each run over all images), so 1 and 2 threads agree to the bit; odd
    batch and sizes take the kernels' remainder paths (images past a multiple of 8)."""
    if _blas.get_num_threads() is None:
        pytest.skip("numpy's BLAS thread count cannot be set here")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((11, 5, 10, 9)).astype(np.float32)
    wt = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((11, 6, 10, 9)).astype(np.float32)
    results = []
    for threads in (1, 2):
        with _blas.limit_blas_threads(threads):
            y, tiles = winograd(x, wt, None, (1, 1), (10, 9), keep=True)
            results.append((y,) + winograd_backward(dy, x, wt, (1, 1), tiles))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@needs_numba
def test_input_gradient_can_be_skipped():
    rng = np.random.default_rng(5)
    x, wt, dy = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((1, 3, 5, 5))
    dx, dw = winograd_backward(dy, x, wt, (1, 1), input_grad=False)
    assert dx is None
    np.testing.assert_array_equal(dw, winograd_backward(dy, x, wt, (1, 1))[1])


@needs_numba
def test_save_failure_falls_back_to_compiling_in_memory(monkeypatch):
    """A cache folder that turns unwritable after numba chose it raises OSError on save: the
    kernel is compiled without the cache and called again."""
    calls = []

    def failing(*args):
        calls.append("cached")
        raise OSError("read-only file system")

    def uncached(name, cache):
        assert cache is False
        def run(*args):
            calls.append("in memory")
            return _jit._PY_KERNELS[name](*args)  # the plain Python kernel: same code, not compiled
        return run

    monkeypatch.setattr(_jit._State, "kernels", dict(_jit.kernels(), **{"winograd.output": failing}))
    monkeypatch.setattr(_jit, "_compile", uncached)
    monkeypatch.setattr(_jit._State, "reason", _jit._State.reason)
    rng = np.random.default_rng(1)
    x, wt = rng.standard_normal((1, 1, 4, 4)), rng.standard_normal((1, 1, 3, 3))
    y, _ = winograd(x, wt, None, (1, 1), (4, 4))
    assert calls == ["cached", "in memory"]
    np.testing.assert_allclose(y, reference.conv2d(x, wt, None, padding=1), rtol=1e-10, atol=1e-10)
    assert "compiled in memory" in W.status()


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=SRC, **env))


@needs_numba
def test_no_writable_cache_location_compiles_in_memory(tmp_path):
    """With every numba cache location unusable (here: the only one allowed lies under a
    regular file, which even root cannot create), the kernels still compile and run."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    code = ("import numpy as np\n"
            "from convnet import _winograd as W\n"
            "d = np.arange(36.0).reshape(1, 1, 6, 6) ** 0.5\n"
            "v = W.transform_input(d, (0, 0), (4, 4))  # one tile: one kernel compiled\n"
            "assert np.allclose(v[:, 0, 0].reshape(6, 6), W.BT @ d[0, 0] @ W.BT.T)\n"
            "print(W.status())\n")
    done = run_python(code, NUMBA_CACHE_DIR=str(blocker / "cache"),
                      NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator")
    assert done.returncode == 0, done.stderr
    assert "compiled in memory" in done.stdout
    assert not (blocker.parent / "cache").exists()


def test_without_numba_the_plan_stays_exact_and_says_why():
    code = ("import sys; sys.modules['numba'] = None  # import numba now raises ImportError\n"
            "import numpy as np\n"
            "import convnet.functional as F\n"
            "from convnet import _conv, _winograd as W, reference as R\n"
            "assert not W.available() and not _conv.winograd_enabled()\n"
            "x = np.ones((8, 8, 16, 16)); w = np.ones((8, 8, 3, 3)) / 9\n"
            "y, cache = F.conv2d_with_cache(x, w, None, 1, 1)  # a layer the plan gives Winograd with numba\n"
            "assert cache.algo != 'winograd' and np.allclose(y, R.conv2d(x, w, None, 1, 1))\n"
            "dx, dw, db = F.conv2d_backward(y, x, w, 1, 1, cache=cache)\n"
            "assert np.allclose(dw, R.conv2d_backward(y, x, w, 1, 1)[1])\n"
            "x2 = np.arange(2 * 3 * 9 * 9.0).reshape(2, 3, 9, 9) % 7; w2 = np.ones((4, 3, 5, 5))\n"
            "y2, c2 = F.conv2d_with_cache(x2, w2, None)  # CHWN: col2im_chwn's numpy loop\n"
            "assert c2.layout == 'chwn'\n"
            "assert np.allclose(F.conv2d_backward(y2, x2, w2, cache=c2)[0], R.conv2d_backward(y2, x2, w2)[0])\n"
            "try:\n"
            "    F.conv2d(x, w, None, 1, 1, algo='winograd')\n"
            "except ValueError as exc:\n"
            "    print(exc)\n")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "algo='winograd' needs numba (pip install 'convnet[fast]'): numba not usable" in done.stdout


# --------------------------------------------------------------------------- through convnet.functional

@needs_numba
@settings(max_examples=25, deadline=None)
@given(cases(max_hw=9))
def test_public_api_with_algo_winograd(case):
    """conv2d / conv2d_with_cache / conv2d_backward with algo="winograd" (symmetric padding, as
    the public API takes it), against the loop reference; the cache keeps the tiles."""
    x, wt, bias, _, pads = case
    p = (max(pads[:2]), max(pads[2:]))  # symmetric, still large enough for the kernel
    y, cache = F.conv2d_with_cache(x, wt, bias, padding=p, algo="winograd")
    assert cache.algo == "winograd"
    rng = np.random.default_rng(0)
    dy = rng.standard_normal(y.shape).astype(x.dtype)
    got = F.conv2d_backward(dy, x, wt, padding=p, cache=cache, algo="winograd")
    np.testing.assert_array_equal(y, F.conv2d(x, wt, bias, padding=p, algo="winograd"))
    want = (reference.conv2d(x, wt, bias, padding=p),) + tuple(reference.conv2d_backward(dy, x, wt, padding=p))
    c, f = x.shape[1], wt.shape[0]
    scale = 1e-4 if x.dtype == np.float32 else 1e-11
    for name, g, r, terms in zip(("y", "dx", "dw", "db"), (y,) + got, want, (c, f, y.size // f, 1)):
        assert g.dtype == x.dtype and g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=scale, atol=scale * terms, err_msg=name)


@needs_numba
def test_auto_uses_winograd_where_planned_and_chunks(rng):
    """A layer on the table's Winograd side: auto takes it, and a small workspace limit
    (chunks, no cache) gives the same results up to rounding."""
    x = rng.standard_normal((9, 8, 16, 16))
    w = rng.standard_normal((8, 8, 3, 3))
    assert _conv.winograd_enabled()
    y, cache = F.conv2d_with_cache(x, w, None, padding=1)
    assert cache.algo == "winograd"
    dy = rng.standard_normal(y.shape)
    grads = F.conv2d_backward(dy, x, w, padding=1, cache=cache)
    per_image = W.workspace_per_image((16, 16), 8, 8) * 8
    with core.workspace_limit(per_image + 1):
        y_c, cache_c = F.conv2d_with_cache(x, w, None, padding=1)
        grads_c = F.conv2d_backward(dy, x, w, padding=1)
    assert cache_c is None
    want = (reference.conv2d(x, w, None, padding=1),) + tuple(reference.conv2d_backward(dy, x, w, padding=1))
    for got in ((y,) + grads, (y_c,) + grads_c):
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


@needs_numba
def test_exact_switch(monkeypatch, rng):
    """CONVNET_WINOGRAD=0, an exact cache, or an explicit algo keep the exact algorithms."""
    x, w = rng.standard_normal((8, 16, 16, 16)), rng.standard_normal((16, 16, 3, 3))
    dy = rng.standard_normal((8, 16, 16, 16))
    exact = F.conv2d(x, w, None, padding=1, algo="taps")
    monkeypatch.setenv(_conv.WINOGRAD_ENV, "0")
    y, cache = F.conv2d_with_cache(x, w, None, padding=1)
    assert cache.algo == "taps"
    np.testing.assert_array_equal(F.conv2d(x, w, None, padding=1), exact)
    monkeypatch.delenv(_conv.WINOGRAD_ENV)
    assert F.conv2d_with_cache(x, w, None, padding=1)[1].algo == "winograd"
    # backward from an exact cache stays exact: identical to the explicitly exact route
    exact_grads = F.conv2d_backward(dy, x, w, padding=1, cache=cache, method="zero_insert", algo="taps")
    for g, e in zip(F.conv2d_backward(dy, x, w, padding=1, cache=cache), exact_grads):
        np.testing.assert_array_equal(g, e)


@needs_numba
@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=2, padding=1), r"algo='winograd' needs a 3x3 kernel, stride 1, dilation 1 and groups 1, got "
                                r"kernel=\(3, 3\), stride=\(2, 2\)"),
    (dict(dilation=2, padding=2), r"dilation=\(2, 2\)"),
])
def test_winograd_rejects_what_it_cannot_compute(rng, kwargs, message):
    x, w = rng.standard_normal((1, 2, 8, 8)), rng.standard_normal((2, 2, 3, 3))
    with pytest.raises(ValueError, match=message):
        F.conv2d(x, w, None, algo="winograd", **kwargs)
    with pytest.raises(ValueError, match=message):
        F.conv2d_backward(np.zeros((1, 2, 4, 4)) if "stride" in kwargs else np.zeros((1, 2, 8, 8)), x, w,
                          algo="winograd", **kwargs)
    with pytest.raises(ValueError, match=r"kernel=\(5, 5\)"):
        F.conv2d(x, rng.standard_normal((2, 2, 5, 5)), None, padding=2, algo="winograd")
    with pytest.raises(ValueError, match="got method='col2im'"):
        F.conv2d_backward(np.zeros((1, 2, 8, 8)), x, w, padding=1, method="col2im", algo="winograd")


@needs_numba
def test_transposed_convolution_through_winograd_matches_the_exact_plan(monkeypatch, rng):
    """conv_transpose2d's forward is conv2d's input gradient and its backward a conv2d forward
    and filter gradient: on a layer the plan gives Winograd, results equal the exact plan's."""
    x = rng.standard_normal((8, 16, 16, 16))
    w = rng.standard_normal((16, 16, 3, 3))
    assert F.conv2d_with_cache(x, w, None, padding=1)[1].algo == "winograd"  # the same geometry
    y = F.conv_transpose2d(x, w, None, padding=1)
    dy = rng.standard_normal(y.shape)
    grads = F.conv_transpose2d_backward(dy, x, w, padding=1)
    monkeypatch.setenv(_conv.WINOGRAD_ENV, "0")
    np.testing.assert_allclose(y, F.conv_transpose2d(x, w, None, padding=1), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, F.conv_transpose2d_backward(dy, x, w, padding=1)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
