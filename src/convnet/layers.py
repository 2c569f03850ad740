"""Layers: thin stateful wrappers over :mod:`convnet.functional`.

A layer holds its parameters and their gradients as numpy arrays in PyTorch's layouts,
keeps what its backward pass needs from the forward pass, and calls the functional API
for every computation. No layer does math of its own.

Gradients accumulate (``grad += ...``) across backward calls, as in PyTorch; call
``zero_grad()`` (or ``Sequential.zero_grad()``) before each backward pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _args
from . import functional as F

__all__ = [
    "Parameter",
    "Layer",
    "Conv2d",
    "ConvTranspose2d",
    "MaxPool2d",
    "AvgPool2d",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "Flatten",
    "Linear",
    "Dropout",
    "BatchNorm2d",
    "BatchNorm1d",
    "AdaptiveAvgPool2d",
    "Residual",
    "LAYER_TYPES",
]

RngLike = np.random.Generator | int | None


def _as_rng(rng: RngLike, name: str = "rng") -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if _args.is_int(rng):
        return np.random.default_rng(int(rng))
    raise TypeError(f"{name} must be a numpy.random.Generator, an int seed or None, got {rng!r}")


def _as_float_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in _args.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def _tuplify(value: Any) -> Any:
    """Lists (e.g. from JSON) -> tuples, the form the functional API documents."""
    return tuple(value) if isinstance(value, list) else value


def _jsonable(value: Any) -> Any:
    """Tuples -> lists so a config round-trips through JSON."""
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# While set (see `skeleton`), new layers get placeholder arrays instead of real ones.
_SKELETON: contextvars.ContextVar[bool] = contextvars.ContextVar("convnet_layer_skeleton", default=False)


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build layers without their arrays: inside the block, parameters, gradients and
    buffers of new layers are read-only, zero-strided placeholders of the right shape and
    dtype, so no memory is used and no random numbers are drawn.

    The model loader builds a saved architecture this way, checks the file's arrays
    against the placeholders, and only then allocates (``numpy.empty``) and fills them
    (``Layer.params``, ``grads`` and ``buffers`` are replaced). Such a layer cannot run
    until then.
    """
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def _placeholder(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > np.iinfo(np.intp).max:
        raise ValueError(f"an array of shape {tuple(shape)} ({dtype}) would take {nbytes:.3g} bytes")
    return np.broadcast_to(np.zeros((), dtype), shape)


def _filled(shape: tuple[int, ...], value: float, dtype: np.dtype) -> np.ndarray:
    """``numpy.full``, or a placeholder while building a skeleton."""
    return _placeholder(shape, dtype) if _SKELETON.get() else np.full(shape, value, dtype=dtype)


def _pytorch_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
                     dtype: np.dtype) -> np.ndarray:
    if _SKELETON.get():
        return _placeholder(shape, dtype)
    # kaiming_uniform_(a=sqrt(5)) gives bound gain*sqrt(3/fan_in) with gain sqrt(2/(1+5)),
    # i.e. 1/sqrt(fan_in); PyTorch draws the bias from the same range.
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Parameter:
    """A named parameter array and its gradient (same shape and dtype).

    ``data`` and ``grad`` are the layer's own arrays: optimizers update them in place.
    """

    __slots__ = ("name", "data", "grad")

    def __init__(self, name: str, data: np.ndarray, grad: np.ndarray) -> None:
        self.name = name
        self.data = data
        self.grad = grad

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.data.shape}, dtype={self.data.dtype})"


class Layer:
    """Base class: ``forward(x) -> y``, ``backward(dy, input_grad=True) -> dx``, parameters and modes.

    A subclass implements ``forward`` and ``backward`` and, when forward keeps arrays for
    backward, ``clear_cache`` to drop them.
    """

    def __init__(self) -> None:
        self.training = True
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        # State that is saved and loaded but not trained (batch norm's running estimates):
        # optimizers never see it.
        self.buffers: dict[str, np.ndarray] = {}

    # -- parameters -------------------------------------------------------------------
    def _add_param(self, name: str, value: np.ndarray) -> None:
        self.params[name] = value
        self.grads[name] = value if _SKELETON.get() else np.zeros_like(value)

    def children(self) -> list[tuple[str, Layer]]:
        """Named sub-layers of a container (none for a plain layer).

        Parameters and buffers of a child ``name`` are named ``"<name>.<its name>"``, so a
        layer nested in a container nested in a model gets PyTorch's ``state_dict`` names,
        e.g. ``"3.body.0.weight"``. Modes, gradients and dtype reach every child.
        """
        return []

    def _init_weight_and_bias(self, weight_shape: tuple[int, ...], rng: RngLike, dtype: Any,
                              bias_size: int | None = None) -> None:
        """PyTorch's default initialisation, weight then bias from one generator: uniform in
        ``+-1/sqrt(fan_in)``, ``fan_in = prod(weight_shape[1:])``. The bias (``has_bias``) has
        ``bias_size`` entries, ``weight_shape[0]`` by default."""
        dt = _as_float_dtype(dtype)
        gen = _as_rng(rng)
        fan_in = int(np.prod(weight_shape[1:]))
        self._add_param("weight", _pytorch_uniform(gen, weight_shape, fan_in, dt))
        if self.has_bias:
            self._add_param("bias", _pytorch_uniform(gen, (bias_size or weight_shape[0],), fan_in, dt))

    def parameters(self, prefix: str = "") -> list[Parameter]:
        """The layer's parameters (and its children's) with their gradients, named ``prefix + name``."""
        out = [Parameter(prefix + n, self.params[n], self.grads[n]) for n in self.params]
        for name, child in self.children():
            out.extend(child.parameters(f"{prefix}{name}."))
        return out

    def named_buffers(self, prefix: str = "") -> list[tuple[str, np.ndarray]]:
        """``(name, array)`` of the layer's buffers (and its children's), named like parameters."""
        out = [(prefix + n, b) for n, b in self.buffers.items()]
        for name, child in self.children():
            out.extend(child.named_buffers(f"{prefix}{name}."))
        return out

    def zero_grad(self) -> None:
        """Set all gradients to zero (in place)."""
        for g in self.grads.values():
            g.fill(0)
        for _, child in self.children():
            child.zero_grad()

    def set_param(self, name: str, value: np.ndarray) -> None:
        """Copy ``value`` into parameter ``name`` in place (shape and dtype must match)."""
        if name not in self.params:
            raise KeyError(f"{type(self).__name__} has no parameter {name!r}; it has {list(self.params)}")
        current = self.params[name]
        value = np.asarray(value)
        if value.shape != current.shape:
            raise ValueError(f"{type(self).__name__}.{name} must have shape {current.shape}, got {value.shape}")
        current[...] = value

    @property
    def dtype(self) -> np.dtype | None:
        """Dtype of the parameters (or float buffers, or children's), or None without any."""
        for a in (*self.params.values(), *self.buffers.values()):
            if a.dtype.kind == "f":
                return a.dtype
        for _, child in self.children():
            if child.dtype is not None:
                return child.dtype
        return None

    def astype(self, dtype: Any) -> Layer:
        """Convert parameters and float buffers (and zero the gradients) to ``dtype``; returns ``self``."""
        dt = _as_float_dtype(dtype)
        for n in list(self.params):
            self.params[n] = self.params[n].astype(dt)
            self.grads[n] = np.zeros_like(self.params[n])
        for n, b in self.buffers.items():
            if b.dtype.kind == "f":
                self.buffers[n] = b.astype(dt)
        if hasattr(self, "_dtype"):
            self._dtype = dt
        self.clear_cache()
        for _, child in self.children():
            child.astype(dt)
        return self

    def num_parameters(self) -> int:
        own = int(sum(p.size for p in self.params.values()))
        return own + sum(child.num_parameters() for _, child in self.children())

    # -- modes ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> Layer:
        """Training mode (``mode=True``) or eval mode, for this layer and its children."""
        self.training = bool(mode)
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Layer:
        return self.train(False)

    # -- computation ----------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulate parameter gradients from ``dy`` (the loss gradient of the output) and
        return the input gradient ``dx``.

        With ``input_grad=False`` the caller needs only the parameter gradients: a layer may
        skip ``dx`` and return None (``Sequential.backward`` asks this of its first layer
        with parameters during training).
        """
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def clear_cache(self) -> None:
        """Drop what forward kept for backward (frees memory after inference).

        The base layer keeps nothing itself; a layer that keeps arrays overrides this (and a
        container's children are cleared here).
        """
        for _, child in self.children():
            child.clear_cache()

    def _cached(self, attr: str):
        value = getattr(self, attr, None)
        if value is None:
            raise RuntimeError(f"{self!r}: backward() called before forward()")
        return value

    def _check_param_dtype(self, x: np.ndarray) -> None:
        dt = self.dtype
        if dt is not None and isinstance(x, np.ndarray) and x.dtype != dt:
            raise TypeError(
                f"input dtype {x.dtype} does not match the layer's parameters ({dt}); "
                f"convert the input with x.astype(np.{dt}) or the model with .astype(np.{x.dtype})"
            )

    # -- serialisation ----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-compatible dict (parameters excluded)."""
        return {}

    def __repr__(self) -> str:
        # Required arguments positionally, others only when they differ from the default,
        # e.g. Conv2d(1, 8, 5, padding=2).
        sig = inspect.signature(type(self).__init__).parameters
        parts = []
        for k, v in self.get_config().items():
            v = _tuplify(v)
            param = sig.get(k)
            if param is None or param.default is inspect.Parameter.empty:
                parts.append(repr(v))
            elif v != param.default and not (k == "dtype" and v == "float32"):
                parts.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class _Weighted(Layer):
    """A layer with a ``weight`` and, when ``has_bias``, a ``bias`` (Conv2d, ConvTranspose2d, Linear)."""

    @property
    def weight(self) -> np.ndarray:
        return self.params["weight"]

    @property
    def bias(self) -> np.ndarray | None:
        return self.params.get("bias")

    @property
    def weight_grad(self) -> np.ndarray:
        return self.grads["weight"]

    @property
    def bias_grad(self) -> np.ndarray | None:
        return self.grads.get("bias")

    def _add_grads(self, dw: np.ndarray, db: np.ndarray | None) -> None:
        self.grads["weight"] += dw
        if self.has_bias:
            self.grads["bias"] += db


class _Conv(_Weighted):
    """What Conv2d and ConvTranspose2d share: their channel, group, kernel, stride and
    dilation arguments, and the input check."""

    def _conv_args(self, in_channels: object, out_channels: object, groups: object, kernel_size: object,
                   stride: object, dilation: object) -> tuple[tuple[int, int], ...]:
        """Check and keep the channels and groups; return the checked (kernel, stride, dilation) pairs."""
        self.in_channels = _args.positive_int(in_channels, "in_channels")
        self.out_channels = _args.positive_int(out_channels, "out_channels")
        self.groups = _group_count(groups, self.in_channels, self.out_channels)
        k = _args.pair(kernel_size, "kernel_size", 1)
        s = _args.pair(stride, "stride", 1)
        d = _args.pair(dilation, "dilation", 1)
        return k, s, d

    def _check_input(self, x: np.ndarray) -> None:
        if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"expected input with {self.in_channels} channels (N, {self.in_channels}, H, W), "
                             f"got shape {x.shape}")
        self._check_param_dtype(x)


class Conv2d(_Conv):
    """2-D convolution (cross-correlation), NCHW.

    Parameters
    ----------
    in_channels, out_channels : int
        C and F.
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int), "valid" or "same"
    groups : int dividing C and F (``groups=C``: depthwise)
    bias : bool
        Whether to add a learned bias per output channel.
    rng : numpy.random.Generator, int or None
        Source of the initial weights (PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        with fan_in = C/groups * KH * KW, for weight and bias).
    dtype : float32 (default) or float64

    Attributes
    ----------
    weight : ndarray (F, C/groups, KH, KW);  bias : ndarray (F,) or None
    weight_grad, bias_grad : gradients of the same shapes.

    Shapes: x (N, C, H, W) -> y (N, F, OH, OW), OH = (H + 2P - D*(KH-1) - 1) // S + 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, *,
                 rng: RngLike = None, dtype: Any = np.float32) -> None:
        super().__init__()
        k, s, d = self._conv_args(in_channels, out_channels, groups, kernel_size, stride, dilation)
        _args.padding_pads(padding, k, s, d)  # validates padding (and 'same' with stride 1)
        self.has_bias = _args.flag(bias, "bias")
        self.kernel_size, self.stride = _tuplify(kernel_size), _tuplify(stride)
        self.padding, self.dilation = _tuplify(padding), _tuplify(dilation)
        self._init_weight_and_bias((self.out_channels, self.in_channels // self.groups, *k), rng, dtype)
        self._x = None
        self._cache = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._check_input(x)
        y, self._cache = F.conv2d_with_cache(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                             self.groups)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulate the parameter gradients; return ``dx`` (None with ``input_grad=False``)."""
        x = self._cached("_x")
        dx, dw, db = F.conv2d_backward(dy, x, self.weight, self.stride, self.padding, self.dilation,
                                       cache=self._cache, groups=self.groups, input_grad=input_grad)
        self._add_grads(dw, db)
        return dx

    def clear_cache(self) -> None:
        self._x = self._cache = None

    def get_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": _jsonable(self.kernel_size), "stride": _jsonable(self.stride),
            "padding": _jsonable(self.padding), "dilation": _jsonable(self.dilation), "groups": self.groups,
            "bias": self.has_bias, "dtype": self.dtype.name,
        }


def _group_count(groups: object, in_channels: int, out_channels: int) -> int:
    groups = _args.positive_int(groups, "groups")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide both in_channels={in_channels} and "
                         f"out_channels={out_channels}")
    return groups


class ConvTranspose2d(_Conv):
    """2-D transposed convolution, NCHW, as PyTorch's ``ConvTranspose2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int or (int, int)
    output_padding : int or (int, int), smaller than the stride or the dilation
    groups : int dividing in_channels and out_channels
    bias : bool
    rng : numpy.random.Generator, int or None
        PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        fan_in = out_channels/groups * KH * KW (PyTorch's count for this weight layout).
    dtype : float32 (default) or float64

    Attributes
    ----------
    weight : ndarray (in_channels, out_channels/groups, KH, KW);  bias : ndarray (out_channels,) or None

    Shapes: x (N, C_in, H, W) -> y (N, C_out, OH, OW),
    OH = (H-1)*S - 2P + D*(KH-1) + output_padding + 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 output_padding: int | tuple[int, int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int | tuple[int, int] = 1, *, rng: RngLike = None, dtype: Any = np.float32) -> None:
        super().__init__()
        k, s, d = self._conv_args(in_channels, out_channels, groups, kernel_size, stride, dilation)
        if isinstance(padding, str):
            raise TypeError(f"padding of a transposed convolution must be an int or a pair, got {padding!r}")
        _args.pair(padding, "padding", 0)
        op = _args.pair(output_padding, "output_padding", 0)
        if any(o >= max(si, di) for o, si, di in zip(op, s, d)):
            raise ValueError(f"output_padding must be smaller than stride or dilation, got output_padding="
                             f"{output_padding!r} with stride={stride!r}, dilation={dilation!r}")
        self.has_bias = _args.flag(bias, "bias")
        self.kernel_size, self.stride, self.padding = _tuplify(kernel_size), _tuplify(stride), _tuplify(padding)
        self.output_padding, self.dilation = _tuplify(output_padding), _tuplify(dilation)
        self._init_weight_and_bias((self.in_channels, self.out_channels // self.groups, *k), rng, dtype,
                                   bias_size=self.out_channels)
        self._x = None

    def _geometry(self) -> tuple:
        return self.stride, self.padding, self.output_padding, self.groups, self.dilation

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._check_input(x)
        y = F.conv_transpose2d(x, self.weight, self.bias, *self._geometry())
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulate the parameter gradients; return ``dx`` (None with ``input_grad=False``)."""
        x = self._cached("_x")
        dx, dw, db = F.conv_transpose2d_backward(dy, x, self.weight, *self._geometry(), input_grad=input_grad)
        self._add_grads(dw, db)
        return dx

    def clear_cache(self) -> None:
        self._x = None

    def get_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": _jsonable(self.kernel_size), "stride": _jsonable(self.stride),
            "padding": _jsonable(self.padding), "output_padding": _jsonable(self.output_padding),
            "groups": self.groups, "bias": self.has_bias, "dilation": _jsonable(self.dilation),
            "dtype": self.dtype.name,
        }


class Linear(_Weighted):
    """Fully connected layer ``y = x @ weight.T + bias``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    rng : numpy.random.Generator, int or None
        PyTorch default init: U(-1/sqrt(in_features), 1/sqrt(in_features)) for weight and bias.
    dtype : float32 (default) or float64

    Shapes: x (N, in_features) -> y (N, out_features); weight (out_features, in_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rng: RngLike = None,
                 dtype: Any = np.float32) -> None:
        super().__init__()
        self.in_features = _args.positive_int(in_features, "in_features")
        self.out_features = _args.positive_int(out_features, "out_features")
        self.has_bias = _args.flag(bias, "bias")
        self._init_weight_and_bias((self.out_features, self.in_features), rng, dtype)
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and (x.ndim != 2 or x.shape[1] != self.in_features):
            hint = " (add a Flatten layer before it?)" if x.ndim > 2 else ""
            raise ValueError(f"expected input (N, {self.in_features}), got shape {x.shape}{hint}")
        self._check_param_dtype(x)
        y = F.linear(x, self.weight, self.bias)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulate the parameter gradients; return ``dx`` (None with ``input_grad=False``)."""
        x = self._cached("_x")
        dx, dw, db = F.linear_backward(dy, x, self.weight, input_grad)
        self._add_grads(dw, db)
        return dx

    def clear_cache(self) -> None:
        self._x = None

    def get_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.has_bias, "dtype": self.dtype.name}


class _Pool2d(Layer):
    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        _args.pool_params(kernel_size, stride, padding)
        self.kernel_size, self.stride, self.padding = _tuplify(kernel_size), _tuplify(stride), _tuplify(padding)
        self._x = None

    def clear_cache(self) -> None:
        self._x = None

    def get_config(self) -> dict[str, Any]:
        return {"kernel_size": _jsonable(self.kernel_size), "stride": _jsonable(self.stride),
                "padding": _jsonable(self.padding)}


class MaxPool2d(_Pool2d):
    """Max pooling (first maximum wins on ties; padding counts as -inf).

    ``stride`` defaults to ``kernel_size``. Shapes: (N, C, H, W) -> (N, C, OH, OW).
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.training:  # the arg-max kept for backward routes the error without a second max
            y, self._argmax = F.max_pool2d_with_argmax(x, self.kernel_size, self.stride, self.padding)
        else:
            y, self._argmax = F.max_pool2d(x, self.kernel_size, self.stride, self.padding), None
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return F.max_pool2d_backward(dy, self._cached("_x"), self.kernel_size, self.stride, self.padding,
                                     argmax=getattr(self, "_argmax", None))

    def clear_cache(self) -> None:
        super().clear_cache()
        self._argmax = None


class AvgPool2d(_Pool2d):
    """Average pooling (padding counts as zeros in the mean).

    ``stride`` defaults to ``kernel_size``. Shapes: (N, C, H, W) -> (N, C, OH, OW).
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return F.avg_pool2d_backward(dy, self._cached("_x"), self.kernel_size, self.stride, self.padding)


class ReLU(Layer):
    """``max(x, 0)`` elementwise; any shape."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = F.relu(x)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return F.relu_backward(dy, self._cached("_x"))

    def clear_cache(self) -> None:
        self._x = None


class LeakyReLU(Layer):
    """``x if x > 0 else negative_slope * x`` elementwise; any shape."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = _args.real(negative_slope, "negative_slope", finite=True)
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = F.leaky_relu(x, self.negative_slope)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return F.leaky_relu_backward(dy, self._cached("_x"), self.negative_slope)

    def clear_cache(self) -> None:
        self._x = None

    def get_config(self) -> dict[str, Any]:
        return {"negative_slope": self.negative_slope}

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope:g})"


class Sigmoid(Layer):
    """Logistic sigmoid elementwise; any shape."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = F.sigmoid(x)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return F.sigmoid_backward(dy, self._cached("_x"))

    def clear_cache(self) -> None:
        self._x = None


class Tanh(Layer):
    """Hyperbolic tangent elementwise; any shape."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = F.tanh(x)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return F.tanh_backward(dy, self._cached("_x"))

    def clear_cache(self) -> None:
        self._x = None


class Flatten(Layer):
    """Flatten all but the batch axis: (N, d1, d2, ...) -> (N, d1*d2*...)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.ndim < 2:
            shape = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"expected an array with a batch axis and at least one more, got {shape}")
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        return dy.reshape(self._cached("_shape"))

    def clear_cache(self) -> None:
        self._shape = None


class Dropout(Layer):
    """Inverted dropout: in training mode zero each element with probability ``p`` and
    scale the rest by ``1/(1-p)``; identity in eval mode (and when ``p == 0``).

    ``rng`` (Generator, int seed or None) draws the masks; seed it for reproducible training.
    """

    def __init__(self, p: float = 0.5, *, rng: RngLike = None) -> None:
        super().__init__()
        self.p = _args.probability(p, "p")
        self.rng = _as_rng(rng)
        self._mask = None
        self._identity = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0.0:
            self._identity = True
            self._mask = None
            return x
        y, self._mask = F.dropout(x, self.p, self.rng)
        self._identity = False
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        if not input_grad:
            return None
        if self._identity:
            return dy
        return F.dropout_backward(dy, self._cached("_mask"))

    def clear_cache(self) -> None:
        self._mask = None
        self._identity = False

    def get_config(self) -> dict[str, Any]:
        return {"p": self.p}

    def __repr__(self) -> str:
        return f"Dropout(p={self.p:g})"


class _BatchNorm(Layer):
    """Batch normalization over axis 1 (see :func:`convnet.functional.batch_norm`)."""

    _layout = "(N, C, H, W)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, dtype: Any = np.float32) -> None:
        super().__init__()
        self.num_features = _args.positive_int(num_features, "num_features")
        self.eps = _args.real(eps, "eps", 0.0, low_open=True, finite=True)
        self.momentum = _args.real(momentum, "momentum", 0.0, 1.0)
        for name, flag in (("affine", affine), ("track_running_stats", track_running_stats)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self._dtype = _as_float_dtype(dtype)
        c = self.num_features
        if self.affine:
            self._add_param("weight", _filled((c,), 1, self._dtype))
            self._add_param("bias", _filled((c,), 0, self._dtype))
        if self.track_running_stats:
            self.buffers["running_mean"] = _filled((c,), 0, self._dtype)
            self.buffers["running_var"] = _filled((c,), 1, self._dtype)
            self.buffers["num_batches_tracked"] = _filled((), 0, np.dtype(np.int64))
        self._x = None
        self._stats = None

    @property
    def weight(self) -> np.ndarray | None:
        return self.params.get("weight")

    @property
    def bias(self) -> np.ndarray | None:
        return self.params.get("bias")

    @property
    def running_mean(self) -> np.ndarray | None:
        return self.buffers.get("running_mean")

    @property
    def running_var(self) -> np.ndarray | None:
        return self.buffers.get("running_var")

    def _as_supported(self, x: np.ndarray) -> np.ndarray:
        return x

    def forward(self, x: np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and (x.ndim < 2 or x.shape[1] != self.num_features):
            raise ValueError(f"expected input {self._layout} with C={self.num_features}, got shape {x.shape}")
        self._check_param_dtype(x)
        xs = self._as_supported(x)
        y, self._stats = F.batch_norm_with_stats(xs, self.weight, self.bias, self.running_mean, self.running_var,
                                                 self.training, self.momentum, self.eps)
        if self.training and self.track_running_stats:
            self.buffers["num_batches_tracked"] += 1
        self._x = xs
        return y.reshape(x.shape)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Accumulate the weight and bias gradients; return ``dx`` (None with ``input_grad=False``)."""
        x, stats = self._cached("_x"), self._cached("_stats")
        shape = getattr(dy, "shape", None)
        if isinstance(dy, np.ndarray) and dy.size == x.size:
            dy = dy.reshape(x.shape)
        dx, dw, db = F.batch_norm_backward(dy, x, self.weight, stats, input_grad=input_grad)
        if self.affine:
            self.grads["weight"] += dw
            self.grads["bias"] += db
        return None if dx is None else dx.reshape(shape)

    def clear_cache(self) -> None:
        self._x = None
        self._stats = None

    def get_config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats,
                "dtype": self._dtype.name}


class BatchNorm2d(_BatchNorm):
    """Batch normalization per channel of (N, C, H, W) inputs, as ``torch.nn.BatchNorm2d``.

    Parameters ``weight`` (ones) and ``bias`` (zeros) when ``affine``; buffers
    ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked`` when
    ``track_running_stats``. In training mode it normalizes with the batch's statistics and
    updates the running estimates (``momentum`` as PyTorch defines it, unbiased variance);
    in eval mode it normalizes with the running estimates. Buffers are saved and loaded with
    the model but are not parameters: no optimizer or weight decay touches them.
    """

    _layout = "(N, C, H, W)"

    def forward(self, x: np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and x.ndim != 4:
            raise ValueError(f"expected input (N, {self.num_features}, H, W), got shape {x.shape}")
        return super().forward(x)


class BatchNorm1d(_BatchNorm):
    """Batch normalization per feature of (N, C) or (N, C, L) inputs, as ``torch.nn.BatchNorm1d``.

    See :class:`BatchNorm2d` for parameters, buffers and modes.
    """

    _layout = "(N, C) or (N, C, L)"

    def _as_supported(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:
            return x.reshape(x.shape + (1,))
        if x.ndim != 2:
            raise ValueError(f"expected input (N, {self.num_features}) or (N, {self.num_features}, L), "
                             f"got shape {x.shape}")
        return x


class AdaptiveAvgPool2d(Layer):
    """Average pooling to a fixed output size (``1`` = global average pooling), as
    ``torch.nn.AdaptiveAvgPool2d``. Shapes: (N, C, H, W) -> (N, C, OH, OW)."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        _args.pair(output_size, "output_size", 1)
        self.output_size = _tuplify(output_size)
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = F.adaptive_avg_pool2d(x, self.output_size)
        self._x = x
        return y

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        x = self._cached("_x")
        return F.adaptive_avg_pool2d_backward(dy, x, self.output_size) if input_grad else None

    def clear_cache(self) -> None:
        self._x = None

    def get_config(self) -> dict[str, Any]:
        return {"output_size": _jsonable(self.output_size)}


class Residual(Layer):
    """A residual block: ``body(x) + shortcut(x)``, the shortcut being the identity when None.

    ``body`` and ``shortcut`` are layers, typically :class:`convnet.Sequential` stacks (a
    projection shortcut is e.g. ``Sequential(Conv2d(c, f, 1, stride=2), BatchNorm2d(f))``).
    Their parameters are named ``"body.<name>"`` and ``"shortcut.<name>"``. The sum is one
    pass over the activation (a new array: the body's output may be a view of something a
    layer kept); backward adds the shortcut's gradient into the body's in place when that
    array is the body's own.
    """

    def __init__(self, body: Layer, shortcut: Layer | None = None) -> None:
        super().__init__()
        for name, part in (("body", body), ("shortcut", shortcut)):
            if part is not None and not isinstance(part, Layer):
                raise TypeError(f"{name} must be a Layer (e.g. a Sequential), got {type(part).__name__}")
        if body is None:
            raise TypeError("body must be a Layer (e.g. a Sequential), got None")
        self.body = body
        self.shortcut = shortcut

    def children(self) -> list[tuple[str, Layer]]:
        return [("body", self.body)] + ([("shortcut", self.shortcut)] if self.shortcut is not None else [])

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = self.body.forward(x)
        s = x if self.shortcut is None else self.shortcut.forward(x)
        if getattr(y, "shape", None) != getattr(s, "shape", None):
            raise ValueError(f"body output {getattr(y, 'shape', None)} and shortcut output "
                             f"{getattr(s, 'shape', None)} differ; give a shortcut that matches "
                             f"(e.g. a strided 1x1 Conv2d)")
        return np.add(y, s)

    def backward(self, dy: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """Backpropagate through both branches; return ``dx`` (None with ``input_grad=False``)."""
        if not input_grad:
            self.body.backward(dy, input_grad=False)
            if self.shortcut is not None:
                self.shortcut.backward(dy, input_grad=False)
            return None
        dx = self.body.backward(dy)
        ds = dy if self.shortcut is None else self.shortcut.backward(dy)
        if dx.flags.writeable and not (np.may_share_memory(dx, dy) or np.may_share_memory(dx, ds)):
            dx += ds
            return dx
        return dx + ds

    def get_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        short = "" if self.shortcut is None else f",\n  shortcut={_indent(repr(self.shortcut))}"
        return f"Residual(\n  body={_indent(repr(self.body))}{short}\n)"


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")


#: Layer classes by name, used to rebuild a saved model.
LAYER_TYPES: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (Conv2d, ConvTranspose2d, MaxPool2d, AvgPool2d, ReLU, LeakyReLU, Sigmoid, Tanh, Flatten, Linear,
                Dropout, BatchNorm2d, BatchNorm1d, AdaptiveAvgPool2d, Residual)
}
