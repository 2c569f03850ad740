"""Loss functions: call with the network output, then ``backward()`` for its gradient.

>>> loss_fn = CrossEntropyLoss()
>>> loss = loss_fn(logits, labels)      # float, mean over the batch
>>> dlogits = loss_fn.backward()        # (N, K), feed to model.backward
"""

from __future__ import annotations

import numpy as np

from . import functional as F

__all__ = ["Loss", "CrossEntropyLoss", "MSELoss"]


class Loss:
    """Base class: ``loss(pred, target) -> float`` and ``backward() -> dpred``."""

    #: Whether targets are class labels (enables accuracy in ``fit``/``evaluate``).
    classification = False

    def __init__(self) -> None:
        self._pred = None
        self._target = None

    def forward(self, pred: np.ndarray, target: np.ndarray) -> float:
        raise NotImplementedError

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> float:
        value = self.forward(pred, target)
        self._pred, self._target = pred, target
        return value

    def _saved(self):
        if self._pred is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before the loss was computed")
        return self._pred, self._target

    def backward(self) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CrossEntropyLoss(Loss):
    """Softmax + cross-entropy fused (log-sum-exp, stable for large logits), mean over N.

    Call with logits (N, K) float and labels (N,) int in [0, K); ``backward()`` returns
    ``(softmax(logits) - onehot(labels)) / N`` of shape (N, K).
    """

    classification = True

    def __init__(self) -> None:
        super().__init__()
        self._parts = None  # the softmax of the last call, kept for backward

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return F.softmax_cross_entropy(logits, labels)

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        # One softmax for the loss and its gradient (the same values, bit for bit, as
        # softmax_cross_entropy and its backward): half the work of a training step's loss.
        # A subclass with its own forward keeps the general route.
        self._parts = None
        if type(self).forward is not CrossEntropyLoss.forward:
            return super().__call__(logits, labels)
        value, parts = F._softmax_cross_entropy_parts(logits, labels)
        self._pred, self._target, self._parts = logits, labels, parts
        return value

    def backward(self) -> np.ndarray:
        logits, labels = self._saved()
        if self._parts is None:
            return F.softmax_cross_entropy_backward(logits, labels)
        return F._softmax_cross_entropy_grad(self._parts, labels)


class MSELoss(Loss):
    """Mean squared error over all elements; pred and target of the same shape and dtype."""

    def forward(self, pred: np.ndarray, target: np.ndarray) -> float:
        return F.mse_loss(pred, target)

    def backward(self) -> np.ndarray:
        pred, target = self._saved()
        return F.mse_loss_backward(pred, target)
