"""Shared pieces of the `convnet serve` tests: a small trained model and a server in a thread."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import numpy as np

import convnet
from convnet import serve
from convnet.datasets import load_mnist_5k

SMALL = {"channels": (4, 8), "hidden": 32}


def small_lenet(rng=0) -> convnet.Sequential:
    """LeNet's shape with fewer channels: trains in about a second."""
    return convnet.lenet(rng=rng, **SMALL)


@functools.lru_cache(maxsize=1)
def _trained_weights() -> list[np.ndarray]:
    x, y, _, _ = load_mnist_5k()
    model = small_lenet()
    convnet.fit(model, x[:2000], y[:2000], epochs=1, batch_size=32, optimizer=convnet.optim.Adam(3e-3), seed=0,
                progress=False, blas_threads=1)  # steadier than a BLAS pool on a busy machine
    return [p.data.copy() for p in model.parameters()]


def small_model() -> convnet.Sequential:
    """A fresh copy of the small network after one epoch on 2,000 digits (about 80% test accuracy)."""
    model = small_lenet()
    for p, w in zip(model.parameters(), _trained_weights()):
        p.data[...] = w
    return model


def small_trainer() -> serve.Trainer:
    """Trains the small network on 300 digits: an epoch takes a fraction of a second."""
    return serve.Trainer(limit=300, make_model=small_lenet)


@contextlib.contextmanager
def running_server(model: convnet.Sequential | None = None, trainer: serve.Trainer | None = None,
                   **kwargs) -> Iterator[serve._Server]:
    """A server on a free loopback port, serving in a thread until the block ends."""
    server = serve.make_server(model if model is not None else small_model(), "127.0.0.1", 0,
                               trainer=trainer if trainer is not None else small_trainer(), **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.close()
        thread.join(5)


def digit(index: int = 0) -> np.ndarray:
    """Test digit ``index`` of the bundled split, (1, 28, 28) float32."""
    return load_mnist_5k().x_test[index]
