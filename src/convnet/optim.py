"""Optimizers with PyTorch's update rules, updating parameters in place.

Create one optimizer per model and call ``step(model.parameters())`` after each backward
pass; its state (momentum buffers, Adam moments) is kept per parameter name.

>>> opt = Adam(lr=1e-3)
>>> model.zero_grad(); loss = loss_fn(model(x), y); model.backward(loss_fn.backward())
>>> opt.step(model.parameters())
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import numpy as np

from . import _args, _jit
from .layers import Parameter

__all__ = ["Optimizer", "SGD", "Adam", "cosine_schedule"]

# Adam's flat moment buffers, per optimizer: kept out of its attributes, which describe its
# configuration (checkpoints compare them), and rebuilt from ``state`` whenever that changes.
_FLAT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _number(value, name: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    """A finite hyperparameter in ``[low, high)`` (``(low, high)`` when ``low_open``)."""
    return _args.real(value, name, low, high, low_open=low_open, high_open=True, finite=True)


class Optimizer:
    """Base class: ``step(parameters)`` updates each ``Parameter.data`` from its ``grad``."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr = _number(lr, "lr", 0.0, low_open=True)
        self.weight_decay = _number(weight_decay, "weight_decay", 0.0)
        self.state: dict[str, dict[str, np.ndarray | int]] = {}

    def _state(self, p: Parameter) -> dict:
        st = self.state.get(p.name)
        if st is None:
            st = self.state[p.name] = {}
        else:
            for v in st.values():
                if isinstance(v, np.ndarray) and v.shape != p.data.shape:
                    raise ValueError(f"parameter {p.name} has shape {p.data.shape} but this optimizer's state "
                                     f"was built for {v.shape}; use a new optimizer for a different model")
        return st

    def _grad(self, p: Parameter) -> np.ndarray:
        # L2 penalty added to the gradient, as torch.optim does (weight_decay * param).
        if self.weight_decay:
            return p.grad + self.weight_decay * p.data
        return p.grad

    def step(self, parameters: Iterable[Parameter]) -> None:
        params = list(parameters)
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"step() expects Parameters (from model.parameters()), got {type(p).__name__}")
        if self._step_all(params):
            return
        for p in params:
            self._update(p, self._state(p))

    def _step_all(self, params: list[Parameter]) -> bool:
        """Update all ``params`` at once if the optimizer can; False leaves them to ``_update``."""
        return False

    def _update(self, p: Parameter, state: dict) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    ``buf = momentum * buf + g`` (``buf = g`` on the first step), then
    ``param -= lr * (g + momentum * buf if nesterov else buf)``; plain ``param -= lr * g``
    without momentum. ``g = grad + weight_decay * param``.
    """

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        super().__init__(lr, weight_decay)
        self.momentum = _number(momentum, "momentum", 0.0, 1.0)
        self.nesterov = _args.flag(nesterov, "nesterov")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0")

    def _update(self, p: Parameter, state: dict) -> None:
        g = self._grad(p)
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(g, copy=True)
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr:g}, momentum={self.momentum:g}, weight_decay={self.weight_decay:g}, "
                f"nesterov={self.nesterov})")


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam``.

    ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g**2``,
    ``param -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``;
    ``g = grad + weight_decay * param`` (L2, not decoupled).
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        self.betas = (_number(betas[0], "betas[0]", 0.0, 1.0), _number(betas[1], "betas[1]", 0.0, 1.0))
        self.eps = _number(eps, "eps", 0.0, low_open=True)

    def _step_all(self, params: list[Parameter]) -> bool:
        """One pass over all parameters' moments, kept in two flat buffers.

        The per-parameter state (``state[name]["m"]``, ``["v"]``) are views of these
        buffers, so the arithmetic is the same, elementwise, as :meth:`_update`'s (bit for
        bit); only the number of numpy calls drops (about 13 per parameter before). Where
        numba is installed each parameter's step is one compiled loop instead
        (:func:`_adam_kernel`, the same bits), reading its gradient in place.
        """
        if len(params) < 2:
            return False
        flat = _FLAT.get(self)
        if flat is None or not self._flat_matches(flat, params):
            flat = self._build_flat(params)
            if flat is None:
                _FLAT.pop(self, None)
                return False
            _FLAT[self] = flat
        slices, m, v, g = flat["slices"], flat["m"], flat["v"], flat["g"]
        t = flat["step"] = flat["step"] + 1
        for p in params:
            self.state[p.name]["step"] = t
        b1, b2 = self.betas
        # The scalars as numpy's ufuncs see them: Python floats cast to the arrays' dtype.
        scalars = tuple(g.dtype.type(c) for c in (b1, 1 - b1, b2, 1 - b2, math.sqrt(1 - b2 ** t), self.eps,
                                                  self.lr / (1 - b1 ** t)))
        if _jit.ready() and all(p.data.flags.c_contiguous and p.data.flags.writeable for p in params):
            wd = g.dtype.type(self.weight_decay)
            for p, sl in zip(params, slices):  # gradients read where they are: no gathering pass
                _jit.run("optim.adam", p.grad.reshape(-1), p.data.reshape(-1), m[sl], v[sl], wd, *scalars)
            return True
        np.concatenate([p.grad.reshape(-1) for p in params], out=g)
        if self.weight_decay:
            g += self.weight_decay * np.concatenate([p.data.reshape(-1) for p in params])
        update = flat["tmp"]  # kept between steps: no fresh pages to fault in
        _adam_numpy(g, m, v, update, flat["denom"], *scalars)
        for p, sl in zip(params, slices):
            p.data -= update[sl].reshape(p.data.shape)
        return True

    def _flat_matches(self, flat: dict, params: list[Parameter]) -> bool:
        if len(params) != len(flat["names"]):
            return False
        for p, name, view_m, view_v in zip(params, flat["names"], flat["views_m"], flat["views_v"]):
            st = self.state.get(p.name)
            if p.name != name or p.grad.dtype != flat["g"].dtype or p.data.shape != view_m.shape \
                    or p.grad.shape != view_m.shape or st is None or st.get("m") is not view_m \
                    or st.get("v") is not view_v or st.get("step") != flat["step"]:
                return False  # another model, or state set from outside: rebuild
        return True

    def _build_flat(self, params: list[Parameter]) -> dict | None:
        dtype = params[0].data.dtype
        states = [self._state(p) for p in params]  # raises on a shape change, as step by step
        steps = {st.get("step", 0) for st in states}
        if len({p.name for p in params}) != len(params) or len(steps) != 1 \
                or any(p.data.dtype != dtype or p.grad.dtype != dtype or not p.grad.flags.c_contiguous
                       for p in params):
            return None
        sizes = np.cumsum([0] + [p.data.size for p in params])
        slices = [slice(int(a), int(b)) for a, b in zip(sizes[:-1], sizes[1:])]
        m, v = np.zeros(int(sizes[-1]), dtype), np.zeros(int(sizes[-1]), dtype)
        views_m, views_v = [], []
        for p, st, sl in zip(params, states, slices):
            vm, vv = m[sl].reshape(p.data.shape), v[sl].reshape(p.data.shape)
            if "m" in st:
                vm[...], vv[...] = st["m"], st["v"]
            st["m"], st["v"], st["step"] = vm, vv, st.get("step", 0)
            views_m.append(vm)
            views_v.append(vv)
        return {"names": [p.name for p in params], "slices": slices, "m": m, "v": v,
                "g": np.empty(int(sizes[-1]), dtype), "tmp": np.empty(int(sizes[-1]), dtype),
                "denom": np.empty(int(sizes[-1]), dtype), "views_m": views_m, "views_v": views_v,
                "step": next(iter(steps))}

    def _update(self, p: Parameter, state: dict) -> None:
        b1, b2 = self.betas
        g = self._grad(p)
        if "m" not in state:
            state["step"] = 0
            state["m"] = np.zeros_like(p.data)
            state["v"] = np.zeros_like(p.data)
        state["step"] += 1
        t, m, v = state["step"], state["m"], state["v"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        denom = np.sqrt(v)
        denom /= math.sqrt(1 - b2 ** t)
        denom += self.eps
        update = m / denom
        update *= self.lr / (1 - b1 ** t)
        p.data -= update

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr:g}, betas={self.betas}, eps={self.eps:g}, weight_decay={self.weight_decay:g})"


def _adam_numpy(g, m, v, update, denom, b1, c1, b2, c2, root_bc2, eps, step_size) -> None:
    """Adam's moments (``m``, ``v`` in place) and ``update`` from the gradient ``g``: 13
    passes, one operation each, in the order of :meth:`Adam._update`, in place (no
    temporaries beyond ``denom``). ``c1 = 1 - b1``, ``c2 = 1 - b2``, ``root_bc2 =
    sqrt(1 - b2**t)``, ``step_size = lr / (1 - b1**t)``, all in the arrays' dtype."""
    np.multiply(g, c1, out=update)
    m *= b1
    m += update
    np.multiply(g, g, out=update)
    update *= c2
    v *= b2
    v += update
    np.sqrt(v, out=denom)
    denom /= root_bc2
    denom += eps
    np.divide(m, denom, out=update)
    update *= step_size


def _adam_kernel(grad, data, m, v, wd, b1, c1, b2, c2, root_bc2, eps, step_size):  # compiled (convnet._jit)
    """One parameter's whole Adam step in one pass (flat views; ``data``, ``m``, ``v`` updated
    in place): the L2 term (``wd`` > 0), then :func:`_adam_numpy` and ``data -= update``
    element by element, the same operations in the same order and dtype (the scalars
    arrive in the arrays' dtype), so the same bits. LeNet's 117,066 float32 parameters, 1
    thread: the arithmetic 63 vs 199 us (13 passes). Compiled with numpy's error model: a
    zero-division check in the loop kept it from vectorizing (475 us)."""
    for i in range(grad.shape[0]):
        gi = grad[i]
        if wd != 0:
            gi = gi + wd * data[i]
        mi = m[i] * b1 + gi * c1
        vi = v[i] * b2 + (gi * gi) * c2
        m[i] = mi
        v[i] = vi
        data[i] = data[i] - (mi / (np.sqrt(vi) / root_bc2 + eps)) * step_size


_jit.register({"error_model": "numpy"}, **{"optim.adam": _adam_kernel})


def cosine_schedule(lr: float, epochs: int, min_lr: float = 0.0):
    """Cosine learning-rate decay for ``fit(lr_schedule=...)``.

    Returns ``f(epoch) = min_lr + (lr - min_lr) * (1 + cos(pi * (epoch - 1) / epochs)) / 2``
    for 1-based epochs: ``lr`` in the first epoch, close to ``min_lr`` in the last.
    """
    lr = _number(lr, "lr", 0.0, low_open=True)
    min_lr = _number(min_lr, "min_lr", 0.0)
    epochs = _args.positive_int(epochs, "epochs")

    def schedule(epoch: int) -> float:
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2

    return schedule
