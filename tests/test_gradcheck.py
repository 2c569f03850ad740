"""Tests of the numerical gradient checker (convnet.gradcheck)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet.gradcheck import DEFAULT_EPS, GradCheckReport, check_backward, check_gradient, numerical_gradient


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# numerical_gradient
# ---------------------------------------------------------------------------

def test_numerical_gradient_of_cubic_sum():
    x = _rng().standard_normal((3, 4))
    g = numerical_gradient(lambda v: np.sum(v ** 3), x)
    assert g.shape == x.shape and g.dtype == np.float64
    np.testing.assert_allclose(g, 3 * x ** 2, rtol=1e-7, atol=1e-8)


def test_numerical_gradient_of_sin_and_of_linear_function():
    x = _rng(1).standard_normal((2, 3, 2))
    np.testing.assert_allclose(numerical_gradient(lambda v: np.sum(np.sin(v)), x), np.cos(x),
                               rtol=1e-7, atol=1e-9)
    c = _rng(2).standard_normal(x.shape)
    np.testing.assert_allclose(numerical_gradient(lambda v: float(np.sum(c * v)), x), c, rtol=1e-8, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=6))
def test_numerical_gradient_of_quadratic_form(values):
    x = np.array(values)
    a = np.arange(x.size * x.size, dtype=float).reshape(x.size, x.size) / 10.0
    g = numerical_gradient(lambda v: v @ a @ v, x)
    np.testing.assert_allclose(g, (a + a.T) @ x, rtol=1e-6, atol=1e-6)


def test_numerical_gradient_uses_float64_copy_for_float32_input():
    x = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    before = x.copy()
    received = []

    def f(v):
        received.append((v is x, v.dtype))
        return np.sum(v ** 2)

    g = numerical_gradient(f, x)
    assert g.dtype == np.float64
    assert all(not same and dtype == np.float64 for same, dtype in received)
    assert len(received) == 2 * x.size
    np.testing.assert_allclose(g, 2 * x.astype(np.float64), rtol=1e-8)
    np.testing.assert_array_equal(x, before)
    assert x.dtype == np.float32


def test_numerical_gradient_never_touches_caller_array_even_if_f_fails():
    x = _rng(13).standard_normal(4)
    before = x.copy()
    calls = []

    def f(v):
        assert v is not x
        np.testing.assert_array_equal(x, before)  # caller's array unchanged during the call too
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return np.sum(v)

    with pytest.raises(RuntimeError, match="boom"):
        numerical_gradient(f, x)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(RuntimeError, match="boom"):
        calls.clear()
        check_gradient(f, [x], [np.ones(4)])
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_restores_each_element_exactly():
    # After the element at index k has been probed, f must see it at its original value again.
    x = _rng(3).standard_normal(5)
    seen = []
    numerical_gradient(lambda v: seen.append(v.copy()) or 0.0, x)
    for k in range(x.size):
        later = seen[2 * k + 2:]  # calls made after element k was restored
        for v in later:
            assert v[k] == x[k]


def test_numerical_gradient_step_size():
    x = np.array([1.0])
    # central difference of x^3 at 1 with step h is 3 + h^2, exactly up to rounding
    g = numerical_gradient(lambda v: np.sum(v ** 3), x, eps=0.1)
    np.testing.assert_allclose(g, [3.01], rtol=1e-12)
    assert DEFAULT_EPS == 1e-6


def test_numerical_gradient_accepts_zero_d_output_and_rejects_vector_output():
    x = np.ones(3)
    np.testing.assert_allclose(numerical_gradient(lambda v: np.array([np.sum(v)]), x), np.ones(3))
    with pytest.raises(ValueError, match=r"^f must return a scalar"):
        numerical_gradient(lambda v: v * 2, x)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: numerical_gradient("f", np.ones(2)), TypeError, r"^f must be callable"),
    (lambda: numerical_gradient(np.sum, [1.0, 2.0]), TypeError, r"^x must be a numpy ndarray"),
    (lambda: numerical_gradient(np.sum, np.array(["a"])), TypeError, r"^x must have a real numeric dtype"),
    (lambda: numerical_gradient(np.sum, np.ones(2), eps=0.0), ValueError, r"^eps must be a positive"),
    (lambda: numerical_gradient(np.sum, np.ones(2), eps=float("nan")), ValueError, r"^eps"),
    (lambda: numerical_gradient(np.sum, np.ones(2), eps="1e-6"), TypeError, r"^eps"),
])
def test_numerical_gradient_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------
# check_gradient
# ---------------------------------------------------------------------------

def test_check_gradient_passes_for_correct_gradient():
    x = _rng(4).standard_normal((2, 3))
    report = check_gradient(lambda x: np.sum(x ** 3), {"x": x}, {"x": 3 * x ** 2})
    assert isinstance(report, GradCheckReport)
    assert report.ok and report.passed == {"x": True}
    assert report.max_abs_error["x"] < 1e-7
    assert report.max_rel_error["x"] < 1e-6
    np.testing.assert_allclose(report.numerical["x"], 3 * x ** 2, rtol=1e-7, atol=1e-8)


def test_check_gradient_detects_wrong_gradient():
    x = _rng(5).standard_normal((2, 3))
    report = check_gradient(lambda x: np.sum(x ** 3), {"x": x}, {"x": 2 * x ** 2})
    assert not report.ok and report.passed == {"x": False}
    assert report.max_abs_error["x"] == pytest.approx(np.max(np.abs(x ** 2)), rel=1e-5)
    assert report.max_rel_error["x"] == pytest.approx(1 / 3, rel=1e-5)
    assert "FAILED" in str(report) and "x:" in str(report)


def test_check_gradient_detects_single_wrong_element():
    x = _rng(6).standard_normal(10)
    grad = 3 * x ** 2
    grad[7] += 1e-3
    report = check_gradient(lambda x: np.sum(x ** 3), [x], [grad])
    assert not report.ok
    assert report.max_abs_error["0"] == pytest.approx(1e-3, rel=1e-3)


def test_check_gradient_several_inputs_dict_and_list():
    a, b = _rng(7).standard_normal((2, 3, 4))
    f = lambda a, b: np.sum(a * b) + np.sum(a ** 2)  # noqa: E731
    good = check_gradient(f, {"a": a, "b": b}, {"a": b + 2 * a, "b": a})
    assert good.ok and set(good.passed) == {"a", "b"}
    swapped = check_gradient(f, [a, b], [a, b + 2 * a])
    assert not swapped.ok and swapped.passed == {"0": False, "1": False}
    one_wrong = check_gradient(f, {"a": a, "b": b}, {"a": b + 2 * a, "b": 2 * a})
    assert not one_wrong.ok and one_wrong.passed == {"a": True, "b": False}


def test_check_gradient_may_check_a_subset_of_inputs():
    a, b = _rng(8).standard_normal((2, 3))
    report = check_gradient(lambda a, b: np.sum(a * b), {"a": a, "b": b}, {"b": a})
    assert report.ok and list(report.passed) == ["b"]


def test_check_gradient_nan_gradient_fails():
    x = np.ones(3)
    report = check_gradient(lambda x: np.sum(x), [x], [np.array([1.0, np.nan, 1.0])])
    assert not report.ok


def test_check_gradient_tolerances_decide():
    x = np.array([1.0, 2.0])
    claimed = np.array([1.0 + 1e-4, 1.0])  # true gradient of sum(x) is 1
    assert not check_gradient(np.sum, [x], [claimed]).ok
    assert check_gradient(np.sum, [x], [claimed], rtol=1e-3).ok
    assert check_gradient(np.sum, [x], [claimed], rtol=0, atol=2e-4).ok


def test_check_gradient_does_not_modify_inputs():
    x = _rng(9).standard_normal((3, 2)).astype(np.float32)
    g = (3 * x.astype(np.float64) ** 2)
    before_x, before_g = x.copy(), g.copy()
    inputs, analytic = {"x": x}, {"x": g}
    report = check_gradient(lambda x: np.sum(x ** 3), inputs, analytic, rtol=1e-5)
    assert report.ok
    assert inputs["x"] is x and analytic["x"] is g
    np.testing.assert_array_equal(x, before_x)
    np.testing.assert_array_equal(g, before_g)
    assert x.dtype == np.float32


@pytest.mark.parametrize("call, exc, match", [
    (lambda: check_gradient(np.sum, [np.ones(2)], [np.ones(3)]), ValueError, r"^analytic\['0'\] must have shape"),
    (lambda: check_gradient(np.sum, {"x": np.ones(2)}, {"y": np.ones(2)}), ValueError, r"unknown inputs \['y'\]"),
    (lambda: check_gradient(np.sum, {"x": np.ones(2)}, [np.ones(2)]), TypeError, r"same structure"),
    (lambda: check_gradient(np.sum, [np.ones(2), np.ones(2)], [np.ones(2)]), ValueError, r"one gradient per input"),
    (lambda: check_gradient(np.sum, np.ones(2), [np.ones(2)]), TypeError, r"^inputs must be a dict"),
    (lambda: check_gradient(np.sum, [[1.0, 2.0]], [np.ones(2)]), TypeError, r"^inputs\['0'\] must be a numpy"),
    (lambda: check_gradient(np.sum, [np.ones(2)], [np.ones(2)], rtol=-1), ValueError, r"^rtol"),
    (lambda: check_gradient(np.sum, [np.ones(2)], [np.ones(2)], atol=float("inf")), ValueError, r"^atol"),
    (lambda: check_gradient(lambda x: x, [np.ones(2)], [np.ones(2)]), ValueError, r"^f must return a scalar"),
    (lambda: check_gradient(None, [np.ones(2)], [np.ones(2)]), TypeError, r"^f must be callable"),
])
def test_check_gradient_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------
# check_backward
# ---------------------------------------------------------------------------

def test_check_backward_elementwise():
    rng = _rng(10)
    x, dy = rng.standard_normal((2, 2, 3))
    assert check_backward(lambda x: x ** 2, [x], dy, [2 * x * dy]).ok
    report = check_backward(lambda x: x ** 2, [x], dy, [2 * x])  # forgot the chain rule
    assert not report.ok


def test_check_backward_matrix_product():
    rng = _rng(11)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    dy = rng.standard_normal((3, 2))
    before = (a.copy(), b.copy(), dy.copy())
    report = check_backward(lambda a, b: a @ b, {"a": a, "b": b}, dy, {"a": dy @ b.T, "b": a.T @ dy})
    assert report.ok, str(report)
    transposed = check_backward(lambda a, b: a @ b, {"a": a, "b": b}, dy, {"a": dy @ b.T, "b": (dy.T @ a).T * 0.5})
    assert transposed.passed == {"a": True, "b": False}
    for got, orig in zip((a, b, dy), before):
        np.testing.assert_array_equal(got, orig)


def test_check_backward_float32_function():
    # A float32 forward pass checked against a float64 numerical gradient, with float32-sized tolerances.
    rng = _rng(12)
    x = rng.standard_normal(5).astype(np.float32)
    dy = rng.standard_normal(5).astype(np.float32)
    f = lambda x: np.tanh(x.astype(np.float32))  # noqa: E731
    analytic = (dy * (1 - np.tanh(x) ** 2)).astype(np.float32)
    assert check_backward(f, [x], dy, [analytic], rtol=1e-2, atol=1e-2, eps=1e-3).ok


def test_check_backward_dy_shape_mismatch():
    with pytest.raises(ValueError, match=r"^dy must have the shape of f's output \(3,\)"):
        check_backward(lambda x: x * 2, [np.ones(3)], np.ones(4), [np.ones(3)])
    with pytest.raises(TypeError, match=r"^dy must be a numpy ndarray"):
        check_backward(lambda x: x * 2, [np.ones(3)], [1.0, 1.0, 1.0], [np.ones(3)])
