"""convnet: a vectorized im2col CNN engine in numpy.

>>> import convnet
>>> from convnet import layers as L
>>> x_train, y_train, x_test, y_test = convnet.datasets.load_mnist_5k()
>>> model = convnet.Sequential(
...     L.Conv2d(1, 8, 5, padding=2, rng=0), L.ReLU(), L.MaxPool2d(2),
...     L.Flatten(), L.Linear(8 * 14 * 14, 10, rng=1))
>>> history = convnet.fit(model, x_train, y_train, epochs=2, optimizer=convnet.optim.Adam(1e-3))
>>> model.save("model.npz"); same = convnet.load("model.npz")

Modules: ``functional`` (pure forward/backward ops), ``layers``, ``losses``, ``optim``,
``datasets``; the command line is ``convnet`` (``python -m convnet``).
"""

from . import datasets, functional, layers, losses, models, optim
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Sigmoid,
    Tanh,
)
from .losses import CrossEntropyLoss, MSELoss
from .model import ModelFileError, Sequential, load
from .models import lenet, resnet
from .optim import SGD, Adam
from .training import TrainingDivergedError, confusion_matrix, evaluate, fit

__all__ = [
    "functional", "layers", "losses", "optim", "datasets",
    "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Flatten", "Linear", "Dropout",
    "BatchNorm2d", "BatchNorm1d", "AdaptiveAvgPool2d", "Residual",
    "Sequential", "load", "lenet", "resnet", "models", "ModelFileError",
    "CrossEntropyLoss", "MSELoss", "SGD", "Adam",
    "fit", "evaluate", "confusion_matrix", "TrainingDivergedError",
]


def __getattr__(name: str):
    if name == "__version__":
        # Written once, in pyproject.toml; read on first use (importlib.metadata is slow to import).
        from importlib.metadata import PackageNotFoundError, version

        global __version__
        try:
            __version__ = version("convnet")
        except PackageNotFoundError:  # a source tree on sys.path that was never installed
            __version__ = "0+unknown"
        return __version__
    # `convnet.optimizers` was the README's name for `convnet.optim`: still works, with a warning.
    if name == "optimizers":
        import warnings

        warnings.warn("convnet.optimizers is deprecated: use convnet.optim", DeprecationWarning, stacklevel=2)
        return optim
    raise AttributeError(f"module 'convnet' has no attribute {name!r}")
