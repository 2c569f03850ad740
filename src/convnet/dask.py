"""Inference at scale with Dask (optional extra ``dask``: ``pip install 'convnet[dask]'``).

``predict(model, images)`` takes a Dask array of images (N, C, H, W) and returns a lazy Dask
array of class probabilities (N, K) (or labels, or logits): one ``map_blocks`` task per
chunk of images, run wherever the chunks live, so nothing is gathered on the client.

The model travels once: it is wrapped in a :class:`ShippedModel`, whose pickled form is
convnet's own model file (``model.save``'s bytes, read back with ``convnet.load``, never
an unpickled object graph), and put in the task graph as a single key that every chunk's
task depends on. Each worker receives that key once and keeps it in memory; the model is
built from the bytes the first time a task on that worker needs it, and then reused by all
the worker's tasks.

Example (a cluster of your own, or ``distributed.LocalCluster()`` on one machine)::

    import dask.array as da
    from distributed import Client
    import convnet, convnet.dask

    client = Client("tcp://scheduler:8786")
    model = convnet.load("out/convnet_mnist.npz")
    images = da.from_zarr("digits.zarr")            # (N, 1, 28, 28) float32, chunked along N
    labels = convnet.dask.predict(model, images, output="labels")
    labels.to_zarr("labels.zarr")                   # computed on the workers
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Any

import numpy as np

from . import _args
from .model import Sequential
from .model import load as load_model

__all__ = ["predict", "ShippedModel", "OUTPUTS"]

OUTPUTS = ("probabilities", "labels", "logits")

# How often this process built a model from shipped bytes, and how often it received them
# (unpickled a ShippedModel): the tests read these on each worker.
_counts = {"loads": 0, "arrivals": 0}
_lock = threading.Lock()


def _model_bytes(model: Sequential) -> bytes:
    with tempfile.TemporaryDirectory(prefix="convnet-") as tmp:
        path = os.path.join(tmp, "model.npz")
        model.save(path)
        with open(path, "rb") as fh:
            return fh.read()


class ShippedModel:
    """A convnet model that pickles as its model-file bytes and is built once per process.

    Parameters
    ----------
    data : bytes
        A model file as written by ``Sequential.save``.
    """

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"data must be the bytes of a convnet model file, got {type(data).__name__}")
        self.data = data
        self.digest = hashlib.sha256(data).hexdigest()
        self._model: Sequential | None = None

    @classmethod
    def from_model(cls, model: Sequential) -> ShippedModel:
        shipped = cls(_model_bytes(model))
        return shipped

    def __reduce__(self):
        return (_arrive, (self.data,))

    def __dask_tokenize__(self) -> str:
        return self.digest

    @property
    def model(self) -> Sequential:
        """The model, built from the bytes on first use (thread-safe), in eval mode."""
        if self._model is None:
            with _lock:
                if self._model is None:
                    with tempfile.TemporaryDirectory(prefix="convnet-") as tmp:
                        path = os.path.join(tmp, "model.npz")
                        with open(path, "wb") as fh:
                            fh.write(self.data)
                        model = load_model(path)
                    model.eval()
                    _counts["loads"] += 1
                    self._model = model
        return self._model

    def __repr__(self) -> str:
        return f"ShippedModel({len(self.data)} bytes, sha256 {self.digest[:12]})"


def _arrive(data: bytes) -> ShippedModel:
    with _lock:
        _counts["arrivals"] += 1
    return ShippedModel(data)


def process_counts() -> dict[str, int]:
    """How many models this process received and built (``{"arrivals": ..., "loads": ...}``)."""
    return dict(_counts)


def _predict_block(block: np.ndarray, shipped: ShippedModel, batch_size: int, output: str) -> np.ndarray:
    from .functional import softmax

    model = shipped.model
    # forward() in eval mode, never predict(): predict toggles train/eval on the shared model,
    # which would race between the worker's threads.
    outs = [model.forward(block[i:i + batch_size]) for i in range(0, len(block), batch_size)]
    logits = np.concatenate(outs, axis=0) if len(outs) != 1 else outs[0]
    if output == "logits":
        return logits
    if output == "labels":
        return logits.argmax(axis=1).astype(np.int64)
    return softmax(logits, axis=1)


def predict(model: Sequential | ShippedModel, images: Any, batch_size: int = 256,
            output: str = "probabilities"):
    """Lazy predictions for a Dask array of images.

    Parameters
    ----------
    model : Sequential (or a ShippedModel)
        A classifier whose output is (N, K) logits.
    images : dask.array.Array, shape (N, C, H, W)
        Chunked along N (other axes are made whole if they are not); converted to the
        model's dtype lazily.
    batch_size : int
        Images per forward pass inside each chunk's task.
    output : "probabilities" (default), "labels" or "logits"

    Returns
    -------
    dask.array.Array
        (N, K) probabilities or logits in the model's dtype, or (N,) int64 labels; chunked
        like ``images`` along N. Nothing is computed until you ask (``.compute()``,
        ``.to_zarr()``, ...).
    """
    import dask
    import dask.array as da

    shipped = model if isinstance(model, ShippedModel) else None
    if shipped is None and not isinstance(model, Sequential):
        raise TypeError(f"model must be a convnet Sequential, got {type(model).__name__}")
    if not isinstance(images, da.Array):
        raise TypeError(f"images must be a dask array, got {type(images).__name__} "
                        f"(wrap numpy arrays with dask.array.from_array)")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    batch_size = _args.positive_int(batch_size, "batch_size")
    _args.choice(output, "output", OUTPUTS)
    local = shipped.model if shipped is not None else model
    sample = tuple(int(s) for s in images.shape[1:])
    if any(np.isnan(s) for s in images.shape[1:]):
        raise ValueError(f"images must have known sizes except N, got shape {images.shape}")
    if local.input_shape is not None and tuple(local.input_shape) != sample:
        raise ValueError(f"images of shape {sample} do not fit the model, which takes {tuple(local.input_shape)}")
    dtype = np.dtype(local.dtype or np.float32)
    # The output width, from one zero image run here (cheap, and it checks that the shapes fit).
    was_training = local.training
    local.eval()
    try:
        probe = local.forward(np.zeros((1, *sample), dtype=dtype))
    finally:
        local.clear_cache()
        local.train(was_training)
    if probe.ndim != 2:
        raise ValueError(f"the model outputs shape {probe.shape[1:]} per image, not class scores")
    k = probe.shape[1]
    if shipped is None:
        shipped = ShippedModel.from_model(model)
    if images.dtype != dtype:
        images = images.astype(dtype)
    if any(len(c) != 1 for c in images.chunks[1:]):
        images = images.rechunk({1: -1, 2: -1, 3: -1})
    model_key = dask.delayed(shipped, name=f"convnet-model-{shipped.digest[:16]}")
    if output == "labels":
        return da.map_blocks(_predict_block, images, model_key, int(batch_size), output, dtype=np.int64,
                             chunks=(images.chunks[0],), drop_axis=[1, 2, 3])
    return da.map_blocks(_predict_block, images, model_key, int(batch_size), output, dtype=dtype,
                         chunks=(images.chunks[0], (k,)), drop_axis=[2, 3])
