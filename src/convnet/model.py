"""``Sequential`` models (nestable), saving and loading.

File format (``model.save`` / ``convnet.load``): one ``.npz`` archive, readable with
``numpy.load(path, allow_pickle=False)``, holding

* ``__architecture__``: a 0-d unicode array with JSON ``{"format": "convnet.Sequential",
  "version": 2, "input_shape": [C, H, W] or null, "layers": [spec, ...], "params":
  {"0.weight": {"shape": [...], "dtype": "float32"}, ...}, "buffers": {...},
  "sha256": "<digest of all stored arrays in name order>"}``, where a layer's ``spec`` is
  ``{"type": "Conv2d", "config": {...}}``, or for containers
  ``{"type": "Sequential", "layers": [spec, ...]}`` and
  ``{"type": "Residual", "body": spec, "shortcut": spec or null}``;
* one array per parameter and per buffer, named as in PyTorch's ``state_dict``: the path
  of layer indices and child names, then the array's name (``"0.weight"``,
  ``"4.running_mean"``, ``"3.body.0.weight"``).
* only in checkpoints written by ``fit(checkpoint=...)``: the training state, in members
  whose names start with ``"__training__"`` (see :mod:`convnet._checkpoint`); ``load``
  ignores them.

Version 1 files (no containers, no buffers) still load. Writes go to a temporary file in
the target directory, are flushed to disk and then renamed over the target
(``os.replace``), so an interrupted save leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _args
from ._blas import blas_threads as _blas_threads
from ._blas import resolve_threads
from ._io import atomic_open
from ._npz import NpzArchive
from .layers import (
    LAYER_TYPES,
    Layer,
    MaxPool2d,
    ReLU,
    Residual,
    _indent,
    skeleton,
)

__all__ = ["Sequential", "load", "ModelFileError", "StateDictKeys", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "convnet.Sequential"
FORMAT_VERSION = 2
#: Versions :func:`load` reads.
READABLE_VERSIONS = (1, 2)
# A saved architecture nests containers at most this deep (a hostile file cannot recurse forever).
MAX_NESTING = 32
_ARCH_KEY = "__architecture__"
#: Largest architecture JSON :func:`load` reads (stored as UTF-32: 4 bytes a character).
MAX_ARCHITECTURE_BYTES = 16 << 20
#: ``summary()`` runs one sample through the model; it refuses larger samples.
MAX_SUMMARY_SAMPLE_BYTES = 1 << 30
#: Members of a training checkpoint that hold the training state (see ``convnet.fit``).
TRAINING_STATE_PREFIX = "__training__"


class ModelFileError(ValueError):
    """A model file is missing pieces, truncated, corrupted or does not match its architecture."""


class StateDictKeys(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` did not match (PyTorch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _layer_label(index: int, layer: Layer) -> str:
    return f"layer {index} ({layer!r})"


def _run_order(layers: Sequence[Layer]) -> list[int]:
    """The order in which :class:`Sequential` runs ``layers``: a ``ReLU`` directly followed
    by a ``MaxPool2d`` runs after it.

    The two commute exactly: ReLU is monotone, so ``relu(max(window)) == max(relu(window))``
    for every window (padding is ``-inf`` and never fills a whole window), and both orders
    send each error to the window's first maximum where that maximum is positive and
    nowhere else. Outputs and gradients are the same numbers; ReLU's two passes then touch
    the pooled map (a quarter of the elements for 2x2 pooling: 0.75 -> 0.2 ms a step on
    LeNet's first block, 1 thread; the training step 16.1 -> 14.5 ms).
    """
    order = list(range(len(layers)))
    i = 0
    while i + 1 < len(layers):
        if type(layers[i]) is ReLU and type(layers[i + 1]) is MaxPool2d:
            order[i], order[i + 1] = i + 1, i
            i += 2
        else:
            i += 1
    return order


class Sequential(Layer):
    """A stack of layers applied in order; itself a layer, so stacks nest (e.g. as the
    body of a :class:`convnet.layers.Residual`).

    Parameters
    ----------
    *layers : Layer
        The layers, first to last. Their parameters are named ``"<index>.<name>"``.
    input_shape : tuple of int, optional
        Shape of one sample, e.g. (1, 28, 28); used by ``summary()`` and saved with the
        model. ``fit`` fills it in from the training data when it is not set.

    Examples
    --------
    >>> from convnet import Sequential, layers as L
    >>> model = Sequential(L.Conv2d(1, 8, 3, padding=1, rng=0), L.ReLU(), L.MaxPool2d(2),
    ...                    L.Flatten(), L.Linear(8 * 14 * 14, 10, rng=1))
    >>> model.predict(np.zeros((5, 1, 28, 28), np.float32)).shape
    (5, 10)
    """

    def __init__(self, *layers: Layer, input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential argument {i} must be a Layer, got {type(layer).__name__}")
        self.layers: list[Layer] = list(layers)
        self.input_shape = self._check_input_shape(input_shape)

    @staticmethod
    def _check_input_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
        if shape is None:
            return None
        try:
            out = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"input_shape must be a sequence of positive ints, got {shape!r}") from None
        if not out or min(out) < 1:
            raise ValueError(f"input_shape must be a sequence of positive ints, got {shape!r}")
        return out

    def children(self) -> list[tuple[str, Layer]]:
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    # -- container protocol -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> Layer:
        return self.layers[index]

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}) {_indent(repr(layer))}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    # -- computation ------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run all layers; shape/dtype errors name the layer where they happen.

        Parameters
        ----------
        x : ndarray (N, ...) matching the first layer (e.g. (N, C, H, W)).

        Returns
        -------
        ndarray: the last layer's output, e.g. logits (N, K).
        """
        for i in _run_order(self.layers):
            layer = self.layers[i]
            shape = getattr(x, "shape", None)
            try:
                x = layer.forward(x)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{_layer_label(i, layer)} forward, input shape {shape}: {exc}") from exc
        return x

    __call__ = forward

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Backpropagate ``dy`` (gradient of the loss w.r.t. the output); accumulates
        parameter gradients and returns the gradient w.r.t. the input.

        With ``input_grad=False`` (training) nothing below the first layer with parameters
        is computed: that layer skips its input gradient and None is returned.
        """
        order = _run_order(self.layers)  # the forward's, reversed below
        first = 0
        if not input_grad:
            first = next((i for i, layer in enumerate(self.layers) if layer.parameters()), len(self.layers))
        # ReLU and MaxPool2d, the only layers the order swaps, have no parameters: the layers
        # from ``first`` on are the positions from ``first`` on.
        for i in reversed(order[first:]):
            layer = self.layers[i]
            shape = getattr(dy, "shape", None)
            try:
                dy = layer.backward(dy, input_grad=False) if not input_grad and i == first else layer.backward(dy)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise type(exc)(f"{_layer_label(i, layer)} backward, gradient shape {shape}: {exc}") from exc
        return dy if input_grad else None

    def predict(self, x: np.ndarray, batch_size: int = 256, blas_threads: int | str | None = None) -> np.ndarray:
        """Outputs for ``x`` in eval mode, ``batch_size`` samples at a time.

        The model's train/eval mode is restored afterwards. ``blas_threads`` sets the
        BLAS threads meanwhile, as in :func:`convnet.fit` ("auto", an int, or None for
        the environment variable ``CONVNET_BLAS_THREADS`` or else "auto").

        Returns
        -------
        ndarray (N, ...) : the network outputs (logits for a classifier).
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy ndarray, got {type(x).__name__}")
        batch_size = _args.positive_int(batch_size, "batch_size")
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"x must hold at least one sample, got shape {x.shape}")
        blas_threads = resolve_threads(blas_threads)
        modes = self._modes()
        self.eval()
        try:
            outs = []
            with _blas_threads(blas_threads) as threads:
                for i in range(0, len(x), batch_size):
                    threads.step()
                    outs.append(self.forward(x[i:i + batch_size]))
        finally:
            self.clear_cache()
            self._restore_modes(modes)
        return np.concatenate(outs, axis=0)

    def _modes(self) -> list[tuple[Layer, bool]]:
        """Every layer's mode (nested ones included), to restore after an eval-mode pass."""
        out, stack = [], [self]
        while stack:
            layer = stack.pop()
            out.append((layer, layer.training))
            stack.extend(child for _, child in layer.children())
        return out

    @staticmethod
    def _restore_modes(modes: list[tuple[Layer, bool]]) -> None:
        for layer, mode in modes:
            layer.training = mode

    # -- PyTorch-style state dict ------------------------------------------------------------
    def _named_tensors(self) -> list[tuple[str, np.ndarray]]:
        """The model's own arrays under PyTorch's names and in its order: each layer's
        parameters, then its buffers, then its children's (``"3.body.1.running_mean"``)."""
        out: list[tuple[str, np.ndarray]] = []

        def walk(layer: Layer, prefix: str) -> None:
            out.extend((prefix + n, a) for n, a in layer.params.items())
            out.extend((prefix + n, b) for n, b in layer.buffers.items())
            for name, child in layer.children():
                walk(child, f"{prefix}{name}.")

        walk(self, "")
        return out

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Copies of the weights (and buffers) under the names PyTorch gives the same ``nn.Sequential``.

        ``"0.weight"``, ``"0.bias"`` for layer 0, and so on, in PyTorch's order, so that
        ``torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`` works
        for the same architecture (see also :mod:`convnet.weights` for ``.safetensors``).

        Returns
        -------
        OrderedDict[str, ndarray]
            Copies: changing them does not change the model.
        """
        return OrderedDict((name, array.copy()) for name, array in self._named_tensors())

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> StateDictKeys:
        """Copy weights from ``state`` (name -> array, e.g. a PyTorch ``state_dict``) into the model.

        Every name, shape and dtype is checked before anything is copied, so a mismatch
        leaves the model as it was.

        Parameters
        ----------
        state : mapping of str to array-like
            numpy arrays, or anything ``numpy.asarray`` converts (CPU torch tensors).
        strict : bool
            If True (default), the names must be exactly the model's; if False, missing
            and unexpected names are allowed and returned. Shapes and dtypes must match
            either way.

        Returns
        -------
        StateDictKeys
            ``(missing_keys, unexpected_keys)``, both empty with ``strict=True``.

        Raises
        ------
        TypeError
            If ``state`` is not a mapping with string keys, or a dtype differs.
        ValueError
            For missing or unexpected names (strict) or a shape mismatch; the message names them.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
        bad_keys = [k for k in state if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"state keys must be strings, got {bad_keys[0]!r}")
        own = self._named_tensors()
        names = [name for name, _ in own]
        missing = [name for name in names if name not in state]
        unexpected = [name for name in state if name not in set(names)]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected)}")
            raise ValueError(f"state dict does not match the model: {'; '.join(parts)}")
        checked: list[tuple[np.ndarray, np.ndarray]] = []
        for name, target in own:
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.shape != target.shape:
                raise ValueError(f"state dict entry {name!r} has shape {value.shape}, the model's is {target.shape}")
            if value.dtype != target.dtype:
                raise TypeError(f"state dict entry {name!r} has dtype {value.dtype}, the model's is {target.dtype} "
                                f"(convert one of them, e.g. model.astype(np.{value.dtype}))")
            checked.append((target, value))
        for target, value in checked:
            target[...] = value
        return StateDictKeys(missing, unexpected)

    # -- summary ------------------------------------------------------------------------
    def summary(self, input_shape: Sequence[int] | None = None, file=None) -> str:
        """Print (to ``file``, default stdout) and return a table of each layer's output
        shape and parameter count, like Keras' ``model.summary()``. Layers nested in
        containers get rows of their own, named by their path (``3.body.0``).

        Parameters
        ----------
        input_shape : tuple of int, optional
            Shape of one sample, e.g. (1, 28, 28); defaults to ``self.input_shape``.
            Without either, output shapes are shown as "?".
        """
        shape = self._check_input_shape(input_shape) if input_shape is not None else self.input_shape
        rows: list[list[str]] = []
        if shape is not None:
            dtype = np.dtype(self.dtype or np.float32)
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > MAX_SUMMARY_SAMPLE_BYTES:
                raise ValueError(f"input_shape {tuple(shape)} is too large for summary(): one {dtype} sample takes "
                                 f"{nbytes:,} bytes, more than the {MAX_SUMMARY_SAMPLE_BYTES:,} it runs through "
                                 f"the model to find the output shapes")
            x = np.zeros((1, *shape), dtype=dtype)
            modes = self._modes()
            self.eval()
            try:
                _summary_rows(self, "", x, rows)
            except MemoryError as exc:
                raise ValueError(f"input_shape {tuple(shape)}: summary() ran out of memory running one sample "
                                 f"through the model ({exc})") from None
            finally:
                self.clear_cache()
                self._restore_modes(modes)
        else:
            _summary_rows(self, "", None, rows)
        head = ("Layer", "Output shape", "Params")
        w = [max(len(r[c]) for r in rows + [list(head)]) for c in range(3)]
        line = "-" * (w[0] + w[1] + w[2] + 4)
        out = [f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:>{w[2]}}", line]
        out += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
        out.append(line)
        if shape is not None:
            out.append(f"Input shape: {str(('N', *shape)).replace(chr(39), '')}")
        out.append(f"Total params: {self.num_parameters():,}")
        text = "\n".join(out)
        print(text, file=file if file is not None else sys.stdout)
        return text

    # -- save ---------------------------------------------------------------------------
    def architecture(self) -> dict[str, Any]:
        """The JSON-compatible description stored in saved files (without weights)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "layers": [_spec(layer) for layer in self.layers],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Save architecture and weights to ``path`` (one ``.npz``), atomically.

        The file name is used as given (no ``.npz`` is appended). If ``path`` is a symbolic
        link, the file it points to is replaced and the link kept. See the module docstring
        for the format.
        """
        _atomic_savez(os.fspath(path), self._file_arrays())

    def _file_arrays(self) -> dict[str, np.ndarray]:
        """The members of a saved file: architecture JSON and one array per parameter and buffer."""
        arch = self.architecture()  # rejects layer types it cannot describe
        params = {p.name: np.ascontiguousarray(p.data) for p in self.parameters()}
        buffers = {name: np.asarray(b, order="C") for name, b in self.named_buffers()}  # keeps 0-d
        arch["params"] = {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in params.items()}
        arch["buffers"] = {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in buffers.items()}
        arch["sha256"] = _digest({**params, **buffers})
        arrays = {_ARCH_KEY: np.array(json.dumps(arch))}
        arrays.update(params)
        arrays.update(buffers)
        return arrays


def _summary_rows(layer: Layer, name: str, x: np.ndarray | None, rows: list[list[str]]) -> np.ndarray | None:
    """Append ``[label, output shape, params]`` rows for ``layer``'s children, recursively
    (a container's row before its children's); return ``layer``'s output for ``x``
    (None when ``x`` is None: no shapes)."""
    chained = isinstance(layer, Sequential)  # a Sequential feeds each child the previous output
    current = x
    for child_name, child in layer.children():
        path = f"{name}.{child_name}" if name else child_name
        label = f"{path}: {type(child).__name__}" if child.children() else f"{path}: {child!r}"
        row = [label, "?", f"{child.num_parameters():,}"]
        rows.append(row)
        inp = current if chained else x
        try:
            if child.children():
                y = _summary_rows(child, path, inp, rows)
            else:
                y = None if inp is None else child.forward(inp)
        except (ValueError, TypeError) as exc:
            if path in str(exc):
                raise
            raise type(exc)(f"layer {path} ({child!r}) forward, input shape {getattr(inp, 'shape', None)}: "
                            f"{exc}") from exc
        if y is not None:
            row[1] = str(("N", *y.shape[1:])).replace("'", "")
        if chained:
            current = y
    if chained or x is None:
        return current if chained else None
    return layer.forward(x)  # e.g. a Residual's sum of its branches


def _spec(layer: Layer) -> dict[str, Any]:
    """The JSON description of one layer (containers with their children)."""
    kind = type(layer).__name__
    if isinstance(layer, Sequential) and type(layer) is Sequential:
        return {"type": "Sequential", "layers": [_spec(child) for child in layer.layers]}
    if LAYER_TYPES.get(kind) is not type(layer):
        raise TypeError(f"cannot save custom layer type {kind}; supported: Sequential, {', '.join(LAYER_TYPES)}")
    if isinstance(layer, Residual):
        return {"type": kind, "body": _spec(layer.body),
                "shortcut": None if layer.shortcut is None else _spec(layer.shortcut)}
    return {"type": kind, "config": layer.get_config()}


def _digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name]).reshape(-1).data)  # the bytes, without a copy
    return h.hexdigest()


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save model to {path!r}: directory {directory!r} does not exist")
    with atomic_open(path) as fh:
        np.savez(fh, **arrays)


def load(path: str | os.PathLike) -> Sequential:
    """Load a model saved with ``Sequential.save``.

    The file is treated as hostile until checked, and nothing is allocated before its
    size is known to be what the file holds: the architecture is built without arrays
    (:func:`convnet.layers.skeleton`), members of unexpected names are refused before any
    is decompressed, each array's ``.npy`` header is checked against the architecture
    before its data are read, and the arrays are then allocated and filled from the file
    (no random initialisation first). The checksum is required from format version 2.

    Returns
    -------
    Sequential
        In training mode, like a freshly built model (``predict`` switches to eval mode
        by itself); its predictions equal the saved model's exactly.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    PermissionError
        If the file cannot be read.
    ModelFileError
        (a ``ValueError``) if the file is not a convnet model (or not a regular file), is
        truncated or corrupted, or its weights do not match its architecture; the message
        says which.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a directory, not a model file")
    try:
        npz = NpzArchive(path, ModelFileError)
    except (FileNotFoundError, PermissionError):
        raise
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a model file") from None
    except OSError as exc:  # a FIFO or device, or a read error
        raise ModelFileError(str(exc) if exc.errno is None else f"{path}: {exc.strerror}") from None
    with npz:
        if _ARCH_KEY not in npz.members:
            raise ModelFileError(f"{path}: not a convnet model file (no {_ARCH_KEY!r} entry; "
                                 f"entries: {sorted(npz.members)[:5]})")
        arch, model = _build(path, npz.read_small(_ARCH_KEY, MAX_ARCHITECTURE_BYTES))
        _fill(path, npz, arch, model)
    return model


def _build(path: str, arch_raw: np.ndarray) -> tuple[dict, Sequential]:
    """The architecture JSON and the model it describes, built without arrays (a skeleton)."""
    if arch_raw.shape != () or arch_raw.dtype.kind != "U":
        raise ModelFileError(f"{path}: architecture entry is not a JSON string")
    try:
        arch = json.loads(str(arch_raw))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: architecture JSON is corrupted ({exc})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: architecture JSON nests too deeply") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT_NAME:
        found = arch.get("format") if isinstance(arch, dict) else None
        raise ModelFileError(f"{path}: not a convnet model file (format {found!r})")
    version = arch.get("version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: unsupported model file version {version!r} "
                             f"(this convnet reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    specs = arch.get("layers")
    if not isinstance(specs, list):
        raise ModelFileError(f"{path}: architecture has no layer list")
    with skeleton():
        layers = [_build_layer(path, spec, str(i), 1) for i, spec in enumerate(specs)]
    try:
        model = Sequential(*layers, input_shape=arch.get("input_shape"))
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    return arch, model


def _array_slots(layer: Layer, prefix: str = "") -> Iterator[tuple[str, dict, str, dict | None]]:
    """``(name, dict, key, grads or None)`` for every parameter and buffer, named as
    ``parameters()`` and ``named_buffers()`` name them."""
    for key in layer.params:
        yield prefix + key, layer.params, key, layer.grads
    for key in layer.buffers:
        yield prefix + key, layer.buffers, key, None
    for name, child in layer.children():
        yield from _array_slots(child, f"{prefix}{name}.")


def _fill(path: str, npz: NpzArchive, arch: dict, model: Sequential) -> None:
    """Check the file's arrays against the skeleton ``model`` (names, then ``.npy``
    headers), then allocate and read them, then verify the checksum."""
    slots = {name: (store, key, grads) for name, store, key, grads in _array_slots(model)}
    # A training checkpoint (convnet.fit) also holds the training state: not weights.
    stored = {n for n in npz.members if n != _ARCH_KEY and not n.startswith(TRAINING_STATE_PREFIX)}
    missing = [name for name in slots if name not in stored]
    extra = sorted(stored - set(slots))
    if missing:
        raise ModelFileError(f"{path}: weights missing for {', '.join(missing)} (architecture needs them)")
    if extra:
        raise ModelFileError(f"{path}: unexpected weights {', '.join(extra)} that the architecture does not use")
    for name, (store, key, _) in slots.items():
        head, want = npz.header(name), store[key]
        if head.shape != want.shape or head.dtype.newbyteorder("=") != want.dtype:
            top = name.split(".")[0]
            raise ModelFileError(
                f"{path}: weight {name} of layer {top} ({model[int(top)]!r}) does not match the architecture: "
                f"expected {want.dtype} {want.shape}, file has {head.dtype} {head.shape}")
    digest = arch.get("sha256")
    if digest is None and arch.get("version", 1) >= 2:
        raise ModelFileError(f"{path}: the checksum (sha256) is missing; the weights cannot be verified")
    arrays = {}
    for name, (store, key, _) in slots.items():
        value = np.empty(store[key].shape, store[key].dtype)
        npz.read_into(name, value)
        arrays[name] = value
    if digest is not None and digest != _digest(arrays):
        raise ModelFileError(f"{path}: weights are corrupted (checksum mismatch)")
    for name, (store, key, grads) in slots.items():
        store[key] = arrays[name]
        if grads is not None:
            grads[key] = np.zeros_like(arrays[name])


def _build_layer(path: str, spec: Any, where: str, depth: int) -> Layer:
    """One layer from its JSON spec (``where`` is its path, e.g. ``3.body.0``, for messages)."""
    if depth > MAX_NESTING:
        raise ModelFileError(f"{path}: layer {where} nests containers more than {MAX_NESTING} deep")
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequential":
        children = spec.get("layers")
        if not isinstance(children, list):
            raise ModelFileError(f"{path}: layer {where} (Sequential) has no layer list")
        return Sequential(*[_build_layer(path, c, f"{where}.{i}", depth + 1) for i, c in enumerate(children)])
    if kind == "Residual":
        if not isinstance(spec.get("body"), dict):
            raise ModelFileError(f"{path}: layer {where} (Residual) has no body")
        shortcut = spec.get("shortcut")
        return Residual(_build_layer(path, spec["body"], f"{where}.body", depth + 1),
                        None if shortcut is None else _build_layer(path, shortcut, f"{where}.shortcut", depth + 1))
    if kind not in LAYER_TYPES:
        raise ModelFileError(f"{path}: layer {where} has unknown type {kind!r}; "
                             f"known: Sequential, {', '.join(LAYER_TYPES)}")
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: layer {where} ({kind}) has an invalid config {config!r}")
    try:
        if kind in ("Conv2d", "Linear"):
            return LAYER_TYPES[kind](**config, rng=0)  # weights are overwritten by the file's
        return LAYER_TYPES[kind](**config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: layer {where} ({kind}) has an invalid config {config}: {exc}") from None


def __getattr__(name: str) -> Any:
    # ``convnet.model.lenet`` moved to :mod:`convnet.models`; the old import keeps working.
    if name == "lenet":
        from .models import lenet
        return lenet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
