"""ONNX export and import (optional extra ``onnx``: ``pip install 'convnet[onnx]'``).

``export(model, path)`` writes a :class:`~convnet.Sequential` as an ONNX graph that ONNX
Runtime (or any ONNX engine) runs with the same results; ``load(path)`` builds a
``Sequential`` back from an ONNX chain of the ops convnet has.

Layer -> ONNX op (default opset 17, any from 13 up):

=============================  =============================================================
``Conv2d``                     ``Conv`` (strides, pads, dilations, group); ``padding="same"``
                               is written as explicit pads
``ConvTranspose2d``            ``ConvTranspose`` (output_padding, group, dilations)
``BatchNorm2d`` / ``1d``       ``BatchNormalization`` (inference form: running statistics)
``AdaptiveAvgPool2d``          ``GlobalAveragePool`` for size 1, else ``AveragePool`` when the
                               input size is known and divisible
``Residual``                   the body's and shortcut's nodes, then ``Add``; nested
                               ``Sequential`` stacks are written inline
``MaxPool2d``                  ``MaxPool`` (padding never wins: ONNX pads are ignored too)
``AvgPool2d``                  ``AveragePool`` with ``count_include_pad=1``: padded zeros
                               count in the mean, as in convnet (and PyTorch's default)
``ReLU`` / ``LeakyReLU``       ``Relu`` / ``LeakyRelu`` (alpha; float64 models: ``PRelu``
                               with a float64 slope, as alpha is a float32 attribute)
``Sigmoid`` / ``Tanh``         ``Sigmoid`` / ``Tanh``
``Flatten``                    ``Flatten`` (axis 1)
``Linear``                     ``Gemm`` (transB=1)
``Dropout``                    ``Dropout`` with its ratio: the identity at inference
=============================  =============================================================

The graph has one input ``"input"`` of shape ``(N, *input_shape)`` with a symbolic batch
dimension ``N``, one output ``"output"``, and the weights as initializers named as in
``model.state_dict()`` (``"0.weight"``, ...). float32 and float64 models are exported in
their own dtype (ONNX Runtime's CPU provider has no float64 ``Conv``/``AveragePool``
kernels; ``onnx.reference`` runs them).

``load`` treats the file as hostile: it checks the file size before reading, refuses
external data, checks every initializer's declared size against the bytes it holds, and
reports an unsupported op, attribute or shape in one line naming the node.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _args
from ._io import write_bytes_atomic
from ._npz import read_regular_file
from .layers import (
    AvgPool2d,
    Conv2d,
    Dropout,
    Flatten,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Tanh,
)
from .model import Sequential

__all__ = ["export", "to_onnx", "load", "from_onnx", "OnnxError", "DEFAULT_OPSET", "MIN_OPSET"]

#: Opset written by default (supported by every ONNX Runtime since 1.12).
DEFAULT_OPSET = 17
#: Oldest opset ``export`` writes and ``load`` reads (Dropout's ratio input, Gemm without C).
MIN_OPSET = 13
#: ``load`` refuses larger files unless told otherwise (protobuf's own limit is 2 GiB).
MAX_FILE_BYTES = 2**31 - 1
#: ``load`` checks shapes by running one zero sample when it has at most this many values.
_SHAPE_CHECK_MAX_VALUES = 2**24

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class OnnxError(ValueError):
    """An ONNX file convnet cannot use: malformed, hostile, or with an unsupported op, attribute or shape."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export and import need the onnx package: pip install 'convnet[onnx]'") from None
    return onnx


# -- export ---------------------------------------------------------------------------------

class _GraphBuilder:
    """Collects nodes and initializers; hands out fresh value names."""

    def __init__(self, onnx_mod, dtype: np.dtype) -> None:
        self.onnx = onnx_mod
        self.dtype = dtype
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        self._count += 1
        out = f"{name}.out" if name else f"value{self._count}"
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out


def _conv_pads(layer: Conv2d) -> list[int]:
    k = _args.pair(_tuple(layer.kernel_size), "kernel_size", 1)
    s = _args.pair(_tuple(layer.stride), "stride", 1)
    d = _args.pair(_tuple(layer.dilation), "dilation", 1)
    (pt, pb), (pl, pr) = _args.padding_pads(_tuple(layer.padding), k, s, d)
    return [pt, pl, pb, pr]


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _export_conv(b: _GraphBuilder, layer: Conv2d, x: str, name: str, sample) -> str:
    inputs = [x, b.const(f"{name}.weight", layer.weight)]
    if layer.bias is not None:
        inputs.append(b.const(f"{name}.bias", layer.bias))
    return b.node("Conv", inputs, name, kernel_shape=list(layer.weight.shape[2:]),
                  strides=list(_args.pair(_tuple(layer.stride), "stride", 1)), pads=_conv_pads(layer),
                  dilations=list(_args.pair(_tuple(layer.dilation), "dilation", 1)),
                  group=int(getattr(layer, "groups", 1)))


def _export_conv_transpose(b: _GraphBuilder, layer: Layer, x: str, name: str, sample) -> str:
    inputs = [x, b.const(f"{name}.weight", layer.weight)]
    if layer.bias is not None:
        inputs.append(b.const(f"{name}.bias", layer.bias))
    p = _args.pair(_tuple(layer.padding), "padding", 0)
    return b.node("ConvTranspose", inputs, name, kernel_shape=list(layer.weight.shape[2:]),
                  strides=list(_args.pair(_tuple(layer.stride), "stride", 1)), pads=[p[0], p[1], p[0], p[1]],
                  output_padding=list(_args.pair(_tuple(layer.output_padding), "output_padding", 0)),
                  dilations=list(_args.pair(_tuple(layer.dilation), "dilation", 1)), group=int(layer.groups))


def _pool_attrs(layer: MaxPool2d | AvgPool2d) -> dict[str, Any]:
    k = _args.pair(_tuple(layer.kernel_size), "kernel_size", 1)
    s = k if layer.stride is None else _args.pair(_tuple(layer.stride), "stride", 1)
    p = _args.pair(_tuple(layer.padding), "padding", 0)
    return {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]]}


def _export_maxpool(b: _GraphBuilder, layer: MaxPool2d, x: str, name: str, sample) -> str:
    return b.node("MaxPool", [x], name, **_pool_attrs(layer))


def _export_avgpool(b: _GraphBuilder, layer: AvgPool2d, x: str, name: str, sample) -> str:
    # convnet's mean counts padded zeros: count_include_pad=1 (ONNX's default is 0).
    return b.node("AveragePool", [x], name, count_include_pad=1, **_pool_attrs(layer))


def _export_adaptive_avgpool(b: _GraphBuilder, layer: Layer, x: str, name: str, sample) -> str:
    oh, ow = _args.pair(_tuple(layer.output_size), "output_size", 1)
    if (oh, ow) == (1, 1):
        return b.node("GlobalAveragePool", [x], name)
    if sample is None:
        raise TypeError(f"cannot export layer {name} ({layer!r}) without the input size: pass input_shape")
    h, w = sample.shape[2:]
    if h % oh or w % ow:
        raise TypeError(f"cannot export layer {name} ({layer!r}) on a {h}x{w} input: ONNX has no adaptive "
                        f"pooling, and {oh}x{ow} windows do not divide {h}x{w} evenly")
    k = [h // oh, w // ow]
    return b.node("AveragePool", [x], name, kernel_shape=k, strides=k, pads=[0, 0, 0, 0])


def _export_batchnorm(b: _GraphBuilder, layer: Layer, x: str, name: str, sample) -> str:
    if layer.running_mean is None:
        raise TypeError(f"cannot export layer {name} ({layer!r}): without running statistics "
                        f"(track_running_stats=False) it has no inference form")
    c = layer.num_features
    weight = layer.weight if layer.weight is not None else np.ones(c, b.dtype)
    bias = layer.bias if layer.bias is not None else np.zeros(c, b.dtype)
    inputs = [x, b.const(f"{name}.weight", weight), b.const(f"{name}.bias", bias),
              b.const(f"{name}.running_mean", layer.running_mean), b.const(f"{name}.running_var", layer.running_var)]
    # ONNX's momentum weighs the old estimate (PyTorch's the new one); it matters only for training.
    return b.node("BatchNormalization", inputs, name, epsilon=layer.eps, momentum=1.0 - layer.momentum)


def _export_linear(b: _GraphBuilder, layer: Linear, x: str, name: str, sample) -> str:
    inputs = [x, b.const(f"{name}.weight", layer.weight)]
    if layer.bias is not None:
        inputs.append(b.const(f"{name}.bias", layer.bias))
    return b.node("Gemm", inputs, name, transB=1)


def _export_dropout(b: _GraphBuilder, layer: Dropout, x: str, name: str, sample) -> str:
    # Without training_mode, ONNX Dropout is the identity; the ratio keeps the layer's p.
    return b.node("Dropout", [x, b.const(f"{name}.ratio", np.array(layer.p, dtype=b.dtype))], name)


def _export_leaky(b: _GraphBuilder, layer: LeakyReLU, x: str, name: str, sample) -> str:
    if b.dtype == np.float32:
        return b.node("LeakyRelu", [x], name, alpha=layer.negative_slope)
    # LeakyRelu's alpha is a float32 attribute; PRelu takes the slope as a float64 tensor.
    return b.node("PRelu", [x, b.const(f"{name}.slope", np.array([layer.negative_slope], b.dtype))], name)


def _export_sequential(b: _GraphBuilder, layer: Sequential, x: str, name: str, sample) -> str:
    return _export_layers(b, layer.layers, x, f"{name}.", sample)[0]


def _export_residual(b: _GraphBuilder, layer: Layer, x: str, name: str, sample) -> str:
    """``body(x) + shortcut(x)``: each branch's nodes (``<name>.body...``, ``<name>.shortcut...``), then an Add."""
    y = _export_layer(b, layer.body, x, f"{name}.body", sample)[0]
    s = x if layer.shortcut is None else _export_layer(b, layer.shortcut, x, f"{name}.shortcut", sample)[0]
    return b.node("Add", [y, s], name)


def _simple(op: str) -> Callable:
    def export_op(b: _GraphBuilder, layer: Layer, x: str, name: str, sample) -> str:
        return b.node(op, [x], name)
    return export_op


#: Layer class name -> exporter(builder, layer, input value, layer name, input sample or None) -> output value.
EXPORTERS: dict[str, Callable] = {
    "Conv2d": _export_conv,
    "ConvTranspose2d": _export_conv_transpose,
    "MaxPool2d": _export_maxpool,
    "AvgPool2d": _export_avgpool,
    "AdaptiveAvgPool2d": _export_adaptive_avgpool,
    "BatchNorm2d": _export_batchnorm,
    "BatchNorm1d": _export_batchnorm,
    "ReLU": _simple("Relu"),
    "LeakyReLU": _export_leaky,
    "Sigmoid": _simple("Sigmoid"),
    "Tanh": _simple("Tanh"),
    "Flatten": lambda b, layer, x, name, sample: b.node("Flatten", [x], name, axis=1),
    "Linear": _export_linear,
    "Dropout": _export_dropout,
    "Sequential": _export_sequential,
    "Residual": _export_residual,
}


def _export_layer(b: _GraphBuilder, layer: Layer, x: str, name: str, sample):
    """Append ``layer``'s nodes reading value ``x``; return (its output value, its output sample or None).

    ``sample`` is a one-image zero input when the input size is known: shape-dependent
    exports (adaptive pooling) read it.
    """
    kind = type(layer).__name__
    exporter = EXPORTERS.get(kind)
    if exporter is None:
        raise TypeError(f"cannot export layer {name} ({layer!r}) to ONNX: no ONNX form for {kind}; "
                        f"supported: {', '.join(EXPORTERS)}")
    out = exporter(b, layer, x, name, sample)
    return out, (None if sample is None else layer.forward(sample))


def _export_layers(b: _GraphBuilder, layers: Sequence[Layer], x: str, prefix: str, sample):
    """Append the nodes of ``layers`` (named ``prefix + index``); return (last value, last sample)."""
    for i, layer in enumerate(layers):
        x, sample = _export_layer(b, layer, x, f"{prefix}{i}", sample)
    return x, sample


def _input_dims(model: Sequential, input_shape: Sequence[int] | None) -> list[int | str]:
    shape = Sequential._check_input_shape(input_shape) if input_shape is not None else model.input_shape
    if shape is not None:
        return ["N", *shape]
    first = model.layers[0] if len(model) else None
    if isinstance(first, Conv2d):
        return ["N", first.in_channels, "H", "W"]
    if isinstance(first, Linear):
        return ["N", first.in_features]
    raise ValueError("input_shape is needed to export this model (the model has none and its first layer "
                     "does not tell the input's rank); pass input_shape=(C, H, W)")


def to_onnx(model: Sequential, input_shape: Sequence[int] | None = None, opset: int = DEFAULT_OPSET):
    """The ONNX ``ModelProto`` of ``model`` (see :func:`export`), checked by ``onnx.checker``."""
    onnx = _onnx()
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a convnet Sequential, got {type(model).__name__}")
    if len(model) == 0:
        raise ValueError("cannot export an empty Sequential")
    newest = onnx.defs.onnx_opset_version()
    if not (_args.is_int(opset) and MIN_OPSET <= opset <= newest):
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {newest}, got {opset!r}")
    dtype = np.dtype(model.dtype or np.float32)
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    dims = _input_dims(model, input_shape)
    b = _GraphBuilder(onnx, dtype)
    known = all(isinstance(d, int) for d in dims[1:])
    was_training = model.training
    modes = [(layer, layer.training) for layer in _all_layers(model) if not _children(layer)]
    model.eval()
    try:
        sample = np.zeros((1, *dims[1:]), dtype=dtype) if known else None
        last, out = _export_layers(b, model.layers, INPUT_NAME, "", sample)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TypeError) and str(exc).startswith("cannot export"):
            raise
        raise ValueError(f"input shape {tuple(dims[1:])} does not fit the model: {exc}") from None
    finally:
        model.clear_cache()
        model.train(was_training)
        for layer, mode in modes:
            layer.training = mode
    b.nodes.append(onnx.helper.make_node("Identity", [last], [OUTPUT_NAME], name="output"))
    out_dims = ["N", *out.shape[1:]] if out is not None else None
    graph = onnx.helper.make_graph(
        b.nodes, "convnet", [onnx.helper.make_tensor_value_info(INPUT_NAME, elem, dims)],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, elem, out_dims)], initializer=b.initializers)
    opsets = [onnx.helper.make_opsetid("", int(opset))]
    from . import __version__

    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="convnet",
                                   producer_version=__version__,
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets))
    if out_dims is None:  # let ONNX's shape inference fill in the output's rank and symbolic sizes
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _children(layer) -> list:
    if hasattr(layer, "children"):
        return list(layer.children())
    return [(str(i), child) for i, child in enumerate(getattr(layer, "layers", []))]


def _all_layers(layer) -> list:
    """``layer`` and everything nested in it (for saving and restoring train/eval modes)."""
    out = [layer]
    for _, child in _children(layer):
        out.extend(_all_layers(child))
    return out


def export(model: Sequential, path: str | os.PathLike, input_shape: Sequence[int] | None = None,
           opset: int = DEFAULT_OPSET) -> None:
    """Write ``model`` to ``path`` as an ONNX file (atomically).

    Parameters
    ----------
    model : Sequential
        float32 or float64; exported in inference form (dropout is the identity).
    path : str or os.PathLike
    input_shape : (C, H, W) or (features,), optional
        Shape of one sample; defaults to ``model.input_shape``. Without either, H and W
        stay symbolic. The batch dimension is always symbolic (``"N"``).
    opset : int
        ONNX opset of the default domain, ``MIN_OPSET`` or newer (default 17).

    Raises
    ------
    TypeError
        For a layer with no ONNX form (the message names it).
    ValueError
        For a bad ``opset`` or ``input_shape`` (or one that does not fit the model).
    """
    proto = to_onnx(model, input_shape=input_shape, opset=opset)
    data = proto.SerializeToString()
    write_bytes_atomic(path, data)


# -- import ---------------------------------------------------------------------------------

class _Node:
    """One ONNX node as the importers see it: its label, attributes and constant inputs."""

    def __init__(self, index: int, proto, attrs: dict[str, Any], consts: list[np.ndarray | None]) -> None:
        self.proto = proto
        self.op = proto.op_type
        self.label = f"node {index} ({proto.op_type}" + (f" {proto.name!r})" if proto.name else ")")
        self.attrs = attrs
        self.consts = consts  # inputs after the first; None for an absent optional input

    def error(self, what: str) -> OnnxError:
        return OnnxError(f"{self.label}: {what}")

    def attr(self, name: str, default: Any) -> Any:
        return self.attrs.get(name, default)

    def allow(self, *names: str) -> None:
        """Refuse attributes other than ``names``."""
        extra = sorted(set(self.attrs) - set(names))
        if extra:
            raise self.error(f"unsupported attribute {extra[0]!r} = {self.attrs[extra[0]]!r}")

    def ints(self, name: str, default: list[int], length: int) -> list[int]:
        value = self.attrs.get(name, default)
        if not isinstance(value, list) or len(value) != length or not all(isinstance(v, int) for v in value):
            raise self.error(f"unsupported {name} {value!r} (convnet needs {length} ints: 2-D operations only)")
        return value

    def const(self, i: int, what: str, required: bool = True) -> np.ndarray | None:
        value = self.consts[i] if i < len(self.consts) else None
        if value is None and required:
            raise self.error(f"{what} (input {i + 1}) is missing or not a constant initializer")
        return value


def _compact(pair: Sequence[int]) -> Any:
    """(a, a) -> a, as a user would write it (keeps a loaded model's repr short)."""
    return int(pair[0]) if pair[0] == pair[1] else (int(pair[0]), int(pair[1]))


def _symmetric(node: _Node, pads: list[int]) -> tuple[int, int] | None:
    top, left, bottom, right = pads
    if min(pads) < 0:
        raise node.error(f"negative pads {pads} are not supported")
    return (top, left) if (top, left) == (bottom, right) else None


def _auto_pad(node: _Node) -> str:
    mode = node.attr("auto_pad", "NOTSET")
    if isinstance(mode, bytes):
        mode = mode.decode("utf-8", "replace")
    if mode not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.error(f"unsupported auto_pad {mode!r}")
    return mode


def _conv_weights(node: _Node, what: str, layout: str) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]]:
    """A Conv or ConvTranspose node's constant weight (4-D, ``layout`` named in the error) and
    optional bias, and the kernel size, checked against ``kernel_shape``."""
    w = node.const(0, "weight")
    b = node.const(1, "bias", required=False)
    if w.ndim != 4:
        raise node.error(f"unsupported weight shape {w.shape}: convnet has 2-D {what} only (weight {layout})")
    k = tuple(w.shape[2:])
    if list(node.attr("kernel_shape", list(k))) != list(k):
        raise node.error(f"kernel_shape {node.attrs['kernel_shape']} does not match the weight shape {w.shape}")
    return w, b, k


def _set_weight_and_bias(node: _Node, layer: Layer, w: np.ndarray, b: np.ndarray | None) -> list[Layer]:
    _set(node, layer, "weight", w)
    if b is not None:
        _set(node, layer, "bias", b)
    return [layer]


def _import_conv(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad")
    w, b, k = _conv_weights(node, "convolution", "(F, C, KH, KW)")
    stride = tuple(node.ints("strides", [1, 1], 2))
    dilation = tuple(node.ints("dilations", [1, 1], 2))
    group = node.attr("group", 1)
    kwargs: dict[str, Any] = {}
    if not isinstance(group, int) or group < 1:
        raise node.error(f"unsupported group {group!r}")
    if group != 1:
        if "groups" not in inspect.signature(Conv2d).parameters:
            raise node.error(f"unsupported group {group} (this convnet has no grouped convolution)")
        kwargs["groups"] = int(group)
    if b is not None and b.shape != (w.shape[0],):
        raise node.error(f"unsupported bias shape {b.shape}, expected ({w.shape[0]},)")
    padding = _conv_padding(node, k, stride, dilation)
    if isinstance(padding, tuple):
        padding = _compact(padding)
    layer = Conv2d(w.shape[1] * int(group), w.shape[0], _compact(k), stride=_compact(stride), padding=padding,
                   dilation=_compact(dilation), bias=b is not None, dtype=dtype, rng=0, **kwargs)
    return _set_weight_and_bias(node, layer, w, b)


def _import_conv_transpose(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("kernel_shape", "strides", "pads", "dilations", "group", "output_padding", "auto_pad")
    cls = getattr(_layers_module(), "ConvTranspose2d", None)
    if cls is None:
        raise node.error("unsupported op (this convnet has no transposed convolution)")
    w, b, k = _conv_weights(node, "transposed convolution", "(C_in, C_out/groups, KH, KW)")
    mode = _auto_pad(node)
    if mode not in ("NOTSET", "VALID"):
        raise node.error(f"unsupported auto_pad {mode} for a transposed convolution")
    pads = [0, 0, 0, 0] if mode == "VALID" else node.ints("pads", [0, 0, 0, 0], 4)
    p = _symmetric(node, pads)
    if p is None:
        raise node.error(f"unsupported asymmetric pads {pads} (convnet pads top=bottom and left=right)")
    group = int(node.attr("group", 1))
    if group < 1:
        raise node.error(f"unsupported group {group}")
    if b is not None and b.shape != (w.shape[1] * group,):
        raise node.error(f"unsupported bias shape {b.shape}, expected ({w.shape[1] * group},)")
    layer = cls(w.shape[0], w.shape[1] * group, _compact(k), stride=_compact(node.ints("strides", [1, 1], 2)),
                padding=_compact(p), output_padding=_compact(node.ints("output_padding", [0, 0], 2)), groups=group,
                bias=b is not None, dilation=_compact(node.ints("dilations", [1, 1], 2)), dtype=dtype, rng=0)
    return _set_weight_and_bias(node, layer, w, b)


def _conv_padding(node: _Node, k, stride, dilation) -> Any:
    mode = _auto_pad(node)
    if mode == "VALID":
        return 0
    if mode != "NOTSET":
        same = _args.padding_pads("same", k, (1, 1), dilation)
        lower_ok = all(lo == hi for lo, hi in same)  # SAME_LOWER puts the odd pixel first
        if stride != (1, 1) or (mode == "SAME_LOWER" and not lower_ok):
            raise node.error(f"unsupported auto_pad {mode} with stride {list(stride)} and kernel {list(k)} "
                             f"(convnet's 'same' needs stride 1 and puts an odd pad at the bottom/right)")
        return "same"
    pads = node.ints("pads", [0, 0, 0, 0], 4)
    sym = _symmetric(node, pads)
    if sym is not None:
        return sym
    same = _args.padding_pads("same", k, (1, 1), dilation)
    if stride == (1, 1) and [same[0][0], same[1][0], same[0][1], same[1][1]] == pads:
        return "same"
    raise node.error(f"unsupported asymmetric pads {pads} (convnet pads top=bottom and left=right, "
                     f"or 'same' at stride 1)")


def _pool_geometry(node: _Node, allow: Sequence[str]) -> tuple[tuple, tuple, tuple]:
    node.allow("kernel_shape", "strides", "pads", "auto_pad", "ceil_mode", "dilations", *allow)
    if "kernel_shape" not in node.attrs:
        raise node.error("kernel_shape is missing")
    k = tuple(node.ints("kernel_shape", [], 2))
    s = tuple(node.ints("strides", [1, 1], 2))  # ONNX's default stride is 1, not the kernel
    if node.ints("dilations", [1, 1], 2) != [1, 1]:
        raise node.error(f"unsupported dilations {node.attrs['dilations']} (convnet pools without dilation)")
    if node.attr("ceil_mode", 0) != 0:
        raise node.error("unsupported ceil_mode=1 (convnet's pooling rounds the output size down)")
    if min(k) < 1 or min(s) < 1:
        raise node.error(f"kernel_shape {list(k)} and strides {list(s)} must be positive")
    mode = _auto_pad(node)
    if mode not in ("NOTSET", "VALID"):
        raise node.error(f"unsupported auto_pad {mode} for pooling")
    pads = [0, 0, 0, 0] if mode == "VALID" else node.ints("pads", [0, 0, 0, 0], 4)
    p = _symmetric(node, pads)
    if p is None:
        raise node.error(f"unsupported asymmetric pads {pads} (convnet pads top=bottom and left=right)")
    if 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        raise node.error(f"unsupported pads {pads}: convnet pads at most half the kernel {list(k)}")
    return k, s, p


def _import_maxpool(node: _Node, dtype: np.dtype) -> list[Layer]:
    if len(node.proto.output) > 1 and node.proto.output[1]:
        raise node.error("unsupported second output (Indices)")
    k, s, p = _pool_geometry(node, ("storage_order",))
    return [MaxPool2d(_compact(k), stride=None if s == k else _compact(s), padding=_compact(p))]


def _import_avgpool(node: _Node, dtype: np.dtype) -> list[Layer]:
    k, s, p = _pool_geometry(node, ("count_include_pad",))
    if node.attr("count_include_pad", 0) != 1 and p != (0, 0):
        raise node.error("unsupported count_include_pad=0 with padding: convnet's average pooling counts "
                         "padded zeros in the mean (count_include_pad=1)")
    return [AvgPool2d(_compact(k), stride=None if s == k else _compact(s), padding=_compact(p))]


def _import_gemm(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("alpha", "beta", "transA", "transB")
    for name, want in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
        if node.attr(name, want) != want:
            raise node.error(f"unsupported {name}={node.attrs[name]!r} (convnet's Linear needs {name}={want})")
    w = node.const(0, "weight")
    b = node.const(1, "bias", required=False)
    if w.ndim != 2:
        raise node.error(f"unsupported weight shape {w.shape}, expected 2-D")
    if node.attr("transB", 0) == 0:
        w = np.ascontiguousarray(w.T)  # Gemm computes x @ B; convnet's Linear holds weight = B.T
    if b is not None and b.shape != (w.shape[0],):
        raise node.error(f"unsupported bias shape {b.shape}, expected ({w.shape[0]},)")
    layer = Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=dtype, rng=0)
    return _set_weight_and_bias(node, layer, w, b)


def _import_dropout(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("seed")
    ratio = node.const(0, "ratio", required=False)
    mode = node.const(1, "training_mode", required=False)
    if mode is not None and bool(np.any(mode)):
        raise node.error("unsupported training_mode=true (convnet imports inference graphs)")
    if ratio is None:
        return [Dropout(0.5)]
    if ratio.size != 1 or not 0 <= float(ratio.reshape(())) < 1:
        raise node.error(f"unsupported ratio {ratio!r}, expected a scalar in [0, 1)")
    # A float32 ratio of 0.4 reads 0.4000000059604645 as a double: keep the shortest decimal.
    return [Dropout(float(str(ratio.reshape(())[()])))]


def _import_leaky(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("alpha")
    alpha = node.attr("alpha", 0.01)
    if not math.isfinite(alpha):
        raise node.error(f"unsupported alpha {alpha!r}")
    # ONNX stores alpha as float32: take the shortest decimal that rounds to it (0.2, not
    # 0.200000003), so a float64 model's slope survives export and load exactly.
    return [LeakyReLU(float(str(np.float32(alpha))))]


def _import_prelu(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow()
    slope = node.const(0, "slope")
    if slope.size != 1:
        raise node.error(f"unsupported slope shape {slope.shape} (convnet's LeakyReLU has one slope)")
    return [LeakyReLU(float(slope.reshape(())))]


def _import_flatten(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("axis")
    if node.attr("axis", 1) != 1:
        raise node.error(f"unsupported axis {node.attrs['axis']} (convnet's Flatten keeps the batch axis: axis=1)")
    return [Flatten()]


def _import_batchnorm(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow("epsilon", "momentum", "training_mode")
    if node.attr("training_mode", 0) != 0:
        raise node.error("unsupported training_mode=1 (convnet imports inference graphs)")
    for extra in node.proto.output[1:]:
        if extra:
            raise node.error("unsupported running-statistics outputs (a training graph)")
    names = ("weight", "bias", "running_mean", "running_var")
    values = [node.const(i, name) for i, name in enumerate(names)]
    c = values[0].shape[0] if values[0].ndim == 1 else None
    if c is None or any(v.shape != (c,) for v in values):
        raise node.error(f"unsupported parameter shapes {[v.shape for v in values]} (one value per channel)")
    cls = getattr(_layers_module(), "BatchNorm2d" if node.rank == 4 else "BatchNorm1d", None)
    if cls is None:
        raise node.error("unsupported op (this convnet has no batch normalization)")
    if node.rank not in (2, 3, 4):
        raise node.error(f"unsupported input rank {node.rank}")
    eps = float(str(np.float32(node.attr("epsilon", 1e-5))))  # a float32 attribute: its shortest decimal
    # ONNX's momentum weighs the old estimate, PyTorch's (and convnet's) the new one.
    momentum = min(max(round(1.0 - float(str(np.float32(node.attr("momentum", 0.9)))), 12), 0.0), 1.0)
    layer = cls(c, eps=eps, momentum=momentum, dtype=dtype)
    for name, value in zip(names, values):
        if name in layer.params:
            _set(node, layer, name, value)
        else:
            if value.dtype != layer.buffers[name].dtype:
                raise node.error(f"{name} has dtype {value.dtype}, but the graph input is {layer.buffers[name].dtype}")
            layer.buffers[name][...] = value
    return [layer]


def _import_global_avgpool(node: _Node, dtype: np.dtype) -> list[Layer]:
    node.allow()
    cls = getattr(_layers_module(), "AdaptiveAvgPool2d", None)
    if cls is None:
        raise node.error("unsupported op (this convnet has no global average pooling)")
    if node.rank != 4:
        raise node.error(f"unsupported input rank {node.rank} (convnet pools (N, C, H, W))")
    return [cls(1)]


def _no_attrs(cls: type[Layer] | None) -> Callable:
    def import_op(node: _Node, dtype: np.dtype) -> list[Layer]:
        node.allow()
        return [] if cls is None else [cls()]
    return import_op


#: ONNX op type -> importer(node, dtype) -> layers (none for the identity).
IMPORTERS: dict[str, Callable[[_Node, np.dtype], list[Layer]]] = {
    "Conv": _import_conv,
    "ConvTranspose": _import_conv_transpose,
    "MaxPool": _import_maxpool,
    "AveragePool": _import_avgpool,
    "GlobalAveragePool": _import_global_avgpool,
    "BatchNormalization": _import_batchnorm,
    "Relu": _no_attrs(ReLU),
    "LeakyRelu": _import_leaky,
    "PRelu": _import_prelu,
    "Sigmoid": _no_attrs(Sigmoid),
    "Tanh": _no_attrs(Tanh),
    "Flatten": _import_flatten,
    "Gemm": _import_gemm,
    "Dropout": _import_dropout,
    "Identity": _no_attrs(None),
}


def _set(node: _Node, layer: Layer, name: str, value: np.ndarray) -> None:
    if value.dtype != layer.params[name].dtype:
        raise node.error(f"{name} has dtype {value.dtype}, but the graph input is {layer.params[name].dtype}")
    layer.set_param(name, value)


_TENSOR_DTYPES = {1: np.dtype(np.float32), 11: np.dtype(np.float64), 7: np.dtype(np.int64), 9: np.dtype(np.bool_)}
_TENSOR_FIELDS = {1: "float_data", 11: "double_data", 7: "int64_data", 9: "int32_data"}


def _tensor(t, what: str, limit: int) -> np.ndarray:
    """A TensorProto as a numpy array, sizes checked against the bytes it holds before converting."""
    onnx = _onnx()
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
        raise OnnxError(f"{what}: external data is not supported (the weights must be inside the file)")
    if t.data_type not in _TENSOR_DTYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() \
            else str(t.data_type)
        raise OnnxError(f"{what}: unsupported tensor type {name} (convnet reads FLOAT and DOUBLE weights)")
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise OnnxError(f"{what}: negative dimension in {dims}")
    count = 1
    for d in dims:
        count *= d
        if count > limit:
            raise OnnxError(f"{what}: declared shape {dims} is larger than the file")
    dtype = _TENSOR_DTYPES[t.data_type]
    if t.HasField("raw_data"):
        held, expected = len(t.raw_data), count * dtype.itemsize
    else:
        held, expected = len(getattr(t, _TENSOR_FIELDS[t.data_type])), count
    if held != expected:
        raise OnnxError(f"{what}: declared shape {dims} of {dtype.name} needs {expected} values/bytes, "
                        f"the file holds {held}")
    return onnx.numpy_helper.to_array(t).astype(dtype, copy=False).reshape(dims)


def _read_model(path: str, max_bytes: int):
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    data = read_regular_file(path, max_bytes, OnnxError, "ONNX file")
    try:
        return onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxError(f"{path}: not an ONNX model, or truncated ({reason})") from None


def load(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES) -> Sequential:
    """Build a :class:`~convnet.Sequential` from an ONNX file.

    The graph must be a chain: one input, each node reading the previous node's output
    (its other inputs constant initializers), one output. Supported ops are those
    :func:`export` writes (``Conv``, ``MaxPool``, ``AveragePool``, ``Relu``, ``LeakyRelu``,
    ``Sigmoid``, ``Tanh``, ``Flatten``, ``Gemm``, ``Dropout``) and ``Identity``.

    Parameters
    ----------
    path : str or os.PathLike
    max_bytes : int
        Larger files are refused before they are read.

    Returns
    -------
    Sequential
        With the graph's float32 or float64 weights and, when the graph input's sample
        shape is fixed, ``input_shape``; an exported model comes back predicting exactly
        as the original.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    OnnxError
        (a ``ValueError``) for a malformed file or an unsupported op, attribute or shape;
        one line naming the node and what is unsupported.
    """
    path = os.fspath(path)
    proto = _read_model(path, max_bytes)
    try:
        return from_onnx(proto, _size_limit=proto.ByteSize())
    except OnnxError as exc:
        raise OnnxError(f"{path}: {exc}") from None


def from_onnx(proto, *, _size_limit: int | None = None) -> Sequential:
    """Build a ``Sequential`` from an ONNX ``ModelProto`` (or its serialized bytes); see :func:`load`."""
    onnx = _onnx()
    if isinstance(proto, (bytes, bytearray)):
        limit = len(proto)
        try:
            proto = onnx.load_model_from_string(bytes(proto))
        except Exception as exc:  # protobuf raises several types for bad bytes
            raise OnnxError(f"not an ONNX model, or truncated ({type(exc).__name__})") from None
    else:
        limit = _size_limit if _size_limit is not None else proto.ByteSize()
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto or bytes, got {type(proto).__name__}")
    graph = proto.graph
    if not graph.node:
        raise OnnxError("the model has no graph nodes")
    _check_opsets(proto, graph)
    if graph.sparse_initializer:
        raise OnnxError("sparse initializers are not supported")

    consts: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        consts[t.name] = _tensor(t, f"initializer {t.name!r}", limit)
    init_names = set(consts)
    inputs = [v for v in graph.input if v.name not in init_names]
    if len(inputs) != 1:
        raise OnnxError(f"the graph has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); "
                        f"convnet models take one")
    dtype, input_shape, rank = _input_spec(inputs[0])
    reader = _GraphReader(onnx, graph, consts, dtype, limit)
    layers, last, _, join = reader.chain(inputs[0].name, rank)
    if join is not None:
        raise OnnxError(f"{join.label}: unsupported Add (convnet reads Add only where the two branches of a "
                        f"residual block meet)")
    unread = [label for label in reader.labels if label not in reader.read]
    if unread:
        raise OnnxError(f"{unread[0]}: not on the chain from the graph input (unsupported graph shape)")
    outputs = [v.name for v in graph.output]
    if outputs != [last]:
        raise OnnxError(f"the graph's outputs {outputs} are not the chain's last value {last!r}")
    if not layers:
        raise OnnxError("the graph computes nothing convnet can hold (only Identity nodes)")
    model = Sequential(*(layer for layer, _ in layers), input_shape=input_shape)
    if input_shape is not None:
        _check_shapes(layers, input_shape, dtype)
    return model


class _Join:
    """An Add node where two branches meet."""

    def __init__(self, index: int, proto, label: str) -> None:
        self.index, self.proto, self.label = index, proto, label


class _GraphReader:
    """Turns an ONNX graph into layers: a chain of supported ops, where a value read by two nodes
    opens a residual block whose two branches meet again in one Add."""

    def __init__(self, onnx_mod, graph, consts: dict[str, np.ndarray], dtype: np.dtype, limit: int) -> None:
        self.onnx, self.graph, self.consts, self.dtype = onnx_mod, graph, consts, dtype
        self.labels: dict[int, str] = {}
        self.read: set[str] = set()
        self.users: dict[str, list[tuple[int, Any]]] = {}
        self.graph_outputs = {v.name for v in graph.output}
        for index, node in enumerate(graph.node):
            label = f"node {index} ({node.op_type}" + (f" {node.name!r})" if node.name else ")")
            if node.op_type == "Constant":
                consts[node.output[0]] = _constant(node, label, limit)
                continue
            self.labels[index] = label
        for index, node in enumerate(graph.node):
            if index not in self.labels:
                continue
            for name in dict.fromkeys(node.input):
                if name and name not in consts:
                    self.users.setdefault(name, []).append((index, node))
        self.labels_by_index = self.labels
        self.labels = list(self.labels.values())

    def chain(self, value: str, rank: int):
        """Layers from ``value`` on, until the graph's end or an Add: (layers, last value, rank, join or None)."""
        layers: list[tuple[Layer, str]] = []
        while True:
            users = self.users.get(value, [])
            if not users:
                return layers, value, rank, None
            if len(users) == 1:
                index, node = users[0]
                label = self.labels_by_index[index]
                if node.op_type == "Add":
                    return layers, value, rank, _Join(index, node, label)
                new, rank = self._import(index, node, value, rank)
                layers.extend(new)
                value = node.output[0]
                continue
            if len(users) == 2:
                block, value = self._residual(value, users, rank)
                layers.append(block)
                continue
            labels = ", ".join(self.labels_by_index[i] for i, _ in users)
            raise OnnxError(f"value {value!r} is read by {len(users)} nodes ({labels}); convnet reads chains "
                            f"and two-branch residual blocks")

    def _branch(self, value: str, index: int, node, rank: int):
        """A residual block's branch starting with ``node``: (layers, end value, join)."""
        label = self.labels_by_index[index]
        if node.op_type == "Add":  # the identity shortcut
            return [], value, _Join(index, node, label), label
        new, rank = self._import(index, node, value, rank)
        layers, end, _, join = self.chain(node.output[0], rank)
        if join is None:
            raise OnnxError(f"{label}: the branch from value {value!r} does not end in an Add "
                            f"(unsupported graph shape)")
        return new + layers, end, join, label

    def _residual(self, value: str, users, rank: int):
        residual_cls, sequential = getattr(_layers_module(), "Residual", None), Sequential
        first = self.labels_by_index[users[0][0]]
        if residual_cls is None:
            raise OnnxError(f"{first}: value {value!r} is read by 2 nodes; this convnet has no residual "
                            f"blocks (unsupported graph shape)")
        branches = [self._branch(value, index, node, rank) for index, node in users]
        (a_layers, a_end, a_join, a_label), (b_layers, b_end, b_join, b_label) = branches
        if a_join.index != b_join.index:
            raise OnnxError(f"{a_join.label}: the branches from value {value!r} end in different Add nodes "
                            f"({a_join.label}, {b_join.label}); unsupported graph shape")
        add = a_join.proto
        if len(add.input) != 2 or set(add.input) != {a_end, b_end} or len(add.attribute):
            raise OnnxError(f"{a_join.label}: unsupported Add (it must add the two branches' results)")
        self.read.add(a_join.label)
        if not a_layers and not b_layers:
            raise OnnxError(f"{a_join.label}: unsupported Add of a value to itself")
        # Body: the non-identity branch; with two, the one convnet named ".body", else the longer one.
        if not b_layers or (a_layers and ".shortcut" not in a_label and
                            (".body" in a_label or ".shortcut" in b_label or len(a_layers) >= len(b_layers))):
            body, shortcut = a_layers, b_layers
        else:
            body, shortcut = b_layers, a_layers
        block = residual_cls(sequential(*(layer for layer, _ in body)),
                             sequential(*(layer for layer, _ in shortcut)) if shortcut else None)
        return (block, a_join.label), add.output[0]

    def _import(self, index: int, node_proto, value: str, rank: int):
        label = self.labels_by_index[index]
        self.read.add(label)
        importer = IMPORTERS.get(node_proto.op_type)
        if importer is None:
            raise OnnxError(f"{label}: unsupported op {node_proto.op_type!r}; convnet reads "
                            f"{', '.join(IMPORTERS)}, and Add in residual blocks")
        if not node_proto.input or node_proto.input[0] != value:
            raise OnnxError(f"{label}: the graph is not a chain (the node reads {value!r} as an input other "
                            f"than its first)")
        rest: list[np.ndarray | None] = []
        for name in node_proto.input[1:]:
            if name and name not in self.consts:
                raise OnnxError(f"{label}: input {name!r} is not a constant initializer (unsupported)")
            rest.append(self.consts[name] if name else None)
        for extra in node_proto.output[1:]:
            if extra and (extra in self.users or extra in self.graph_outputs):
                raise OnnxError(f"{label}: unsupported use of its output {extra!r}")
        attrs = {a.name: self.onnx.helper.get_attribute_value(a) for a in node_proto.attribute}
        node = _Node(index, node_proto, {k: _plain(v) for k, v in attrs.items()}, rest)
        node.rank = rank
        try:
            new = importer(node, self.dtype)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, OnnxError):
                raise
            raise OnnxError(f"{label}: unsupported configuration ({exc})") from None
        if node_proto.op_type in ("Flatten", "Gemm"):
            rank = 2
        return [(layer, label) for layer in new], rank


def _layers_module():
    from . import layers

    return layers


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_opsets(proto, graph) -> None:
    version = None
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            version = op.version
    if version is None:
        raise OnnxError("the model imports no version of the default ONNX operator set")
    if version < MIN_OPSET:
        raise OnnxError(f"opset {version} is older than convnet reads (from {MIN_OPSET}); "
                        f"convert it with onnx.version_converter")
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise OnnxError(f"node {i} ({node.op_type} {node.name!r}): unsupported operator domain {node.domain!r}")


def _input_spec(value_info) -> tuple[np.dtype, tuple[int, ...] | None, int]:
    onnx = _onnx()
    ttype = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or ttype.elem_type not in (1, 11):
        name = onnx.TensorProto.DataType.Name(ttype.elem_type) if ttype.elem_type in \
            onnx.TensorProto.DataType.values() else str(ttype.elem_type)
        raise OnnxError(f"graph input {value_info.name!r}: unsupported type {name} (FLOAT or DOUBLE tensors only)")
    dtype = _TENSOR_DTYPES[ttype.elem_type]
    if not ttype.HasField("shape"):
        raise OnnxError(f"graph input {value_info.name!r}: no shape (convnet needs at least its rank)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
    if len(dims) not in (2, 4):
        raise OnnxError(f"graph input {value_info.name!r}: unsupported rank {len(dims)} "
                        f"(convnet takes (N, C, H, W) images or (N, features))")
    sample = dims[1:]
    if all(d is not None and d > 0 for d in sample):
        return dtype, tuple(int(d) for d in sample), len(dims)
    return dtype, None, len(dims)


def _constant(node_proto, label: str, limit: int) -> np.ndarray:
    attrs = list(node_proto.attribute)
    if len(attrs) != 1 or attrs[0].name != "value" or not attrs[0].HasField("t"):
        raise OnnxError(f"{label}: unsupported Constant (only a 'value' tensor)")
    return _tensor(attrs[0].t, label, limit)


def _check_shapes(layers: list[tuple[Layer, str]], input_shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Run one zero sample through the layers so a shape that does not fit names its node."""
    if math.prod(input_shape) > _SHAPE_CHECK_MAX_VALUES:
        raise OnnxError(f"graph input sample shape {list(input_shape)} is larger than convnet loads "
                        f"({_SHAPE_CHECK_MAX_VALUES} values)")
    x = np.zeros((1, *input_shape), dtype=dtype)
    for layer, label in layers:
        layer.eval()
        try:
            x = layer.forward(x)
        except (ValueError, TypeError) as exc:
            raise OnnxError(f"{label}: unsupported shape: input {tuple(x.shape)}: {exc}") from None
        finally:
            layer.clear_cache()
            layer.train(True)
