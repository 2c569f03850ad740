"""Numerical gradient checking: the tutorial's gradient check, for any function of arrays.

The tutorial checks its hand-derived gradients by nudging one weight at a
time and watching the loss change. This module does exactly that, for any
scalar function of one or more arrays, using central differences::

    dE/dx[k] ~= (E(x + eps*e_k) - E(x - eps*e_k)) / (2 * eps)

whose error is O(eps^2). The nudges are applied to a float64 copy of the
input, so the caller's arrays are never modified and float32 inputs do not
limit the precision of the estimate.

Typical use, checking a backward pass against its forward pass::

    report = check_backward(lambda x, w: conv2d(x, w), {"x": x, "w": w}, dy,
                            {"x": dx, "w": dw})
    assert report.ok, report
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._args import real

__all__ = [
    "DEFAULT_EPS",
    "GradCheckReport",
    "numerical_gradient",
    "check_gradient",
    "check_backward",
]

# Central differences in float64: truncation error ~ eps^2, rounding error ~ 1e-16 / eps.
DEFAULT_EPS = 1e-6

Arrays = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def _check_eps(eps: float | None) -> float:
    if eps is None:
        return DEFAULT_EPS
    return real(eps, "eps", 0.0, low_open=True, finite=True)


def _check_tolerance(value: float, name: str) -> float:
    return real(value, name, 0.0, finite=True)


def _as_float64_copy(x: object, name: str) -> np.ndarray:
    """A private float64 copy of a real-valued ndarray (the caller's array is never touched)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(x).__name__}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must have a real numeric dtype, got {x.dtype}")
    return np.array(x, dtype=np.float64, copy=True)


def _scalar(value: object, what: str) -> float:
    """Turn the function's output into a Python float, or explain why it is not a scalar."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"f must return a scalar, got {what} of shape {arr.shape}")
    return float(arr.reshape(()))


def _numerical_gradient_inplace(evaluate: Callable[[], float], x: np.ndarray, eps: float) -> np.ndarray:
    """Central differences of ``evaluate()`` with respect to ``x``, a float64 array it reads.

    Each element of ``x`` is nudged up, then down, then restored exactly.
    """
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        original = x[idx]
        x[idx] = original + eps
        f_plus = evaluate()
        x[idx] = original - eps
        f_minus = evaluate()
        x[idx] = original  # restore before moving on
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    return grad


def numerical_gradient(f: Callable[[np.ndarray], object], x: np.ndarray,
                       eps: float | None = None) -> np.ndarray:
    """Estimate the gradient of a scalar function by central differences.

    Parameters
    ----------
    f : callable
        ``f(x) -> scalar`` (a Python number or a one-element array). It is
        called ``2 * x.size`` times with a float64 array of ``x.shape``; it
        must not modify or keep that array.
    x : ndarray, any shape
        The point at which to differentiate. Never modified.
    eps : float, optional
        Step size; defaults to :data:`DEFAULT_EPS` (``1e-6``).

    Returns
    -------
    grad : ndarray, float64, same shape as ``x``
        ``grad[k] = (f(x + eps*e_k) - f(x - eps*e_k)) / (2*eps)``.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    step = _check_eps(eps)
    work = _as_float64_copy(x, "x")
    return _numerical_gradient_inplace(lambda: _scalar(f(work), "an array"), work, step)


@dataclass
class GradCheckReport:
    """Outcome of comparing analytic gradients with numerical ones.

    Attributes
    ----------
    ok : bool
        True when every checked element satisfies
        ``|analytic - numerical| <= atol + rtol * |numerical|`` (as ``numpy.allclose``).
    max_abs_error : dict[str, float]
        Per input, ``max |analytic - numerical|``.
    max_rel_error : dict[str, float]
        Per input, ``max |analytic - numerical| / max(|analytic|, |numerical|)``
        (0 where both are 0). Informative only: it is large wherever the true
        gradient is near zero, so ``ok`` uses ``rtol``/``atol`` instead.
    passed : dict[str, bool]
        Per input, whether it passed.
    numerical : dict[str, ndarray]
        The numerical gradients (float64), for inspection.
    rtol, atol : float
        The tolerances used.
    """

    ok: bool
    max_abs_error: dict[str, float]
    max_rel_error: dict[str, float]
    passed: dict[str, bool]
    numerical: dict[str, np.ndarray] = field(repr=False)
    rtol: float
    atol: float

    def __str__(self) -> str:
        lines = [f"gradient check {'passed' if self.ok else 'FAILED'} (rtol={self.rtol:g}, atol={self.atol:g})"]
        for name in self.max_abs_error:
            status = "ok" if self.passed[name] else "MISMATCH"
            lines.append(f"  {name}: max abs error {self.max_abs_error[name]:.3e}, "
                         f"max rel error {self.max_rel_error[name]:.3e}  {status}")
        return "\n".join(lines)


def _named(inputs: Arrays, what: str) -> tuple[dict[str, np.ndarray], bool]:
    """Return ``inputs`` as an ordered name -> array dict, and whether it was a mapping."""
    if isinstance(inputs, Mapping):
        return dict(inputs), True
    if isinstance(inputs, (list, tuple)):
        return {str(i): a for i, a in enumerate(inputs)}, False
    raise TypeError(f"{what} must be a dict of arrays or a list/tuple of arrays, got {type(inputs).__name__}")


def _compare(analytic: np.ndarray, numerical: np.ndarray, rtol: float, atol: float):
    diff = np.abs(analytic - numerical)
    scale = np.maximum(np.abs(analytic), np.abs(numerical))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > 0, diff / scale, np.where(diff == 0, 0.0, np.inf))
    # NaN anywhere must fail: comparisons with NaN are False.
    passed = bool(np.all(diff <= atol + rtol * np.abs(numerical)))
    max_abs = float(np.max(diff)) if diff.size else 0.0
    max_rel = float(np.max(rel)) if rel.size else 0.0
    return passed, max_abs, max_rel


def check_gradient(f: Callable[..., object], inputs: Arrays, analytic: Arrays,
                   rtol: float = 1e-5, atol: float = 1e-7, eps: float | None = None) -> GradCheckReport:
    """Compare analytic gradients of a scalar function with numerical ones.

    Parameters
    ----------
    f : callable
        A scalar function of the inputs: ``f(**inputs)`` when ``inputs`` is a
        dict, ``f(*inputs)`` when it is a list or tuple. It is called with
        float64 copies; it must not modify them.
    inputs : dict[str, ndarray] or list of ndarray
        The point at which to check. Never modified.
    analytic : dict[str, ndarray] or list of ndarray
        Claimed gradients, same structure as ``inputs``, each of the shape of
        its input. A dict may name only some inputs (the others are held
        fixed and not checked); a list must match ``inputs`` one to one.
    rtol, atol : float
        Tolerances of the ``numpy.allclose`` rule used for ``ok``.
    eps : float, optional
        Central-difference step, default :data:`DEFAULT_EPS`.

    Returns
    -------
    GradCheckReport
        Keys are the dict names, or ``"0", "1", ...`` for a list.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    step = _check_eps(eps)
    rtol = _check_tolerance(rtol, "rtol")
    atol = _check_tolerance(atol, "atol")
    named_inputs, keyword = _named(inputs, "inputs")
    named_analytic, analytic_keyword = _named(analytic, "analytic")
    if analytic_keyword != keyword:
        raise TypeError("analytic must have the same structure as inputs (both dicts or both lists)")
    if not keyword and len(named_analytic) != len(named_inputs):
        raise ValueError(f"analytic must have one gradient per input ({len(named_inputs)}), "
                         f"got {len(named_analytic)}")
    unknown = [k for k in named_analytic if k not in named_inputs]
    if unknown:
        raise ValueError(f"analytic names unknown inputs {unknown}; inputs are {list(named_inputs)}")

    work = {name: _as_float64_copy(a, f"inputs[{name!r}]") for name, a in named_inputs.items()}
    claimed = {}
    for name, g in named_analytic.items():
        g64 = _as_float64_copy(g, f"analytic[{name!r}]")
        if g64.shape != work[name].shape:
            raise ValueError(f"analytic[{name!r}] must have shape {work[name].shape} "
                             f"(the shape of inputs[{name!r}]), got {g64.shape}")
        claimed[name] = g64

    def evaluate() -> float:
        out = f(**work) if keyword else f(*work.values())
        return _scalar(out, "an array")

    evaluate()  # fail early (e.g. non-scalar output) before the many perturbed calls
    numerical, passed, max_abs, max_rel = {}, {}, {}, {}
    for name in claimed:
        numerical[name] = _numerical_gradient_inplace(evaluate, work[name], step)
        passed[name], max_abs[name], max_rel[name] = _compare(claimed[name], numerical[name], rtol, atol)
    return GradCheckReport(ok=all(passed.values()), max_abs_error=max_abs, max_rel_error=max_rel,
                           passed=passed, numerical=numerical, rtol=rtol, atol=atol)


def check_backward(f: Callable[..., np.ndarray], inputs: Arrays, dy: np.ndarray, analytic: Arrays,
                   rtol: float = 1e-5, atol: float = 1e-7, eps: float | None = None) -> GradCheckReport:
    """Check a backward pass: compare ``analytic`` with the gradients of ``sum(f(...) * dy)``.

    A backward function receives the upstream gradient ``dy`` (the
    sensitivity map) and returns the gradient of ``E = sum(f(inputs) * dy)``
    with respect to each input; this forms that scalar ``E`` and checks each
    claimed gradient numerically with :func:`check_gradient`.

    Parameters
    ----------
    f : callable
        Forward function returning an array of ``dy.shape``: ``f(**inputs)``
        for a dict, ``f(*inputs)`` for a list.
    inputs : dict[str, ndarray] or list of ndarray
        Never modified.
    dy : ndarray, shape of ``f``'s output
        Upstream gradient. Never modified.
    analytic : dict[str, ndarray] or list of ndarray
        The backward pass's gradients, as in :func:`check_gradient`.
    rtol, atol, eps
        As in :func:`check_gradient`.

    Returns
    -------
    GradCheckReport
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    upstream = _as_float64_copy(dy, "dy")
    named_inputs, keyword = _named(inputs, "inputs")

    def loss(*args: np.ndarray, **kwargs: np.ndarray) -> float:
        out = np.asarray(f(*args, **kwargs))
        if out.shape != upstream.shape:
            raise ValueError(f"dy must have the shape of f's output {out.shape}, got {upstream.shape}")
        return float(np.sum(out.astype(np.float64) * upstream))

    return check_gradient(loss, named_inputs if keyword else list(named_inputs.values()), analytic,
                          rtol=rtol, atol=atol, eps=eps)
