"""Optimizers with PyTorch's update rules, updating parameters in place.

Create one optimizer per model and call ``step(model.parameters())`` after each backward
pass; its state (momentum buffers, Adam moments) is kept per parameter name.

>>> opt = Adam(lr=1e-3)
>>> model.zero_grad(); loss = loss_fn(model(x), y); model.backward(loss_fn.backward())
>>> opt.step(model.parameters())
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from . import _args
from .layers import Parameter

__all__ = ["Optimizer", "SGD", "Adam", "OPTIMIZERS", "cosine_schedule"]


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
        for p in parameters:
            if not isinstance(p, Parameter):
                raise TypeError(f"step() expects Parameters (from model.parameters()), got {type(p).__name__}")
            self._update(p, self._state(p))

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
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0")
        self.nesterov = bool(nesterov)

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


#: Optimizers by lower-case name (used by the command line).
OPTIMIZERS = {"sgd": SGD, "adam": Adam}


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
