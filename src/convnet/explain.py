"""A step-by-step terminal replay of the tutorial's worked examples.

Every number that matters is computed by the engine (:mod:`convnet.functional`) and
cross-checked against the loop reference (:mod:`convnet.reference`); a disagreement
is printed loudly and counted. The intermediate pictures of the backward pass
(zero insertion, padding, 180-degree flipping) are built here with small numpy
helpers for display only; the correlation that turns them into the input
sensitivity map and the filter gradients is run by the engine, and must equal the
engine's own ``conv2d_backward``.

Arrays are printed as nested lists with commas, integers when every entry is
integral, e.g. ``[[6, 7, 5], [3, -1, -1], [2, -1, 4]]`` (rows on separate lines,
right-aligned). Non-integral entries are printed with at most 4 decimals.

Usage from Python::

    from convnet.explain import explain
    explain()                 # all three parts on the tutorial's arrays
    explain("pool")           # one part
    explain("conv", x=my_x, weight=my_w, stride=1, padding=0)

:func:`steps` returns the same replay as data (parts, steps, lines, tables of the
printed numbers), for ``convnet serve``'s explain view.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

import convnet.functional as F
import convnet.reference as R
from convnet import _args

PARTS = ("conv", "backward", "pool")

# The tutorial's worked example (channels first): input (C=3, 5, 5), two 3x3x3 filters.
EXAMPLE_INPUT = np.array(
    [[[0, 1, 1, 0, 2], [2, 2, 2, 2, 1], [1, 0, 0, 2, 0], [0, 1, 1, 0, 0], [1, 2, 0, 0, 2]],
     [[1, 0, 2, 2, 0], [0, 0, 0, 2, 0], [1, 2, 1, 2, 1], [1, 0, 0, 0, 0], [1, 2, 1, 1, 1]],
     [[2, 1, 2, 0, 0], [1, 0, 0, 1, 0], [0, 2, 1, 0, 1], [0, 1, 2, 2, 2], [2, 1, 0, 0, 1]]],
    dtype=np.float64)
EXAMPLE_WEIGHT = np.array(
    [[[[-1, 1, 0], [0, 1, 0], [0, 1, 1]], [[-1, -1, 0], [0, 0, 0], [0, -1, 0]],
      [[0, 0, -1], [0, 1, 0], [1, -1, -1]]],
     [[[1, 1, -1], [-1, -1, 1], [0, -1, 1]], [[0, 1, 0], [-1, 0, -1], [-1, 1, 0]],
      [[-1, 0, 0], [-1, 0, 1], [-1, 0, 0]]]],
    dtype=np.float64)
EXAMPLE_BIAS = np.array([1, 0], dtype=np.float64)
EXAMPLE_STRIDE = 2
EXAMPLE_PADDING = 1
# A readable sensitivity map (dE/dnet) for the example layer's (2, 3, 3) output.
EXAMPLE_DY = np.array(
    [[[1, 0, -1], [0, 2, 0], [-1, 0, 1]], [[0, 1, 0], [1, -1, 1], [0, 1, 0]]], dtype=np.float64)
EXAMPLE_POOL_INPUT = np.array(
    [[[1, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]],
     [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [3, 4, 5, 6]]], dtype=np.float64)

# explain prints every number, so user arrays must stay terminal-sized.
MAX_SIDE = 32
MAX_CHANNELS = 16
MAX_FILTERS = 16


# --------------------------------------------------------------------------- formatting

def _num(v: float, integral: bool) -> str:
    if integral:
        return str(int(v))
    return np.format_float_positional(float(v), precision=4, trim="-")


def format_array(a: np.ndarray) -> str:
    """Format a 1-D or 2-D array as comma-separated nested lists.

    Integers are printed without a decimal point when every entry is integral;
    2-D arrays put one row per line, right-aligned, e.g.::

        [[ 6,  7,  5],
         [ 3, -1, -1],
         [ 2, -1,  4]]
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim not in (1, 2):
        raise ValueError(f"format_array takes a 1-D or 2-D array, got shape {a.shape}")
    integral = bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)))
    cells = [[_num(v, integral) for v in row] for row in np.atleast_2d(a)]
    width = max((len(c) for row in cells for c in row), default=1)
    rows = ["[" + ", ".join(c.rjust(width) for c in row) + "]" for row in cells]
    if a.ndim == 1:
        return rows[0]
    return "[" + ",\n ".join(rows) + "]"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


class _Printer:
    """Writes the replay and counts engine/reference disagreements."""

    def __init__(self, file: IO[str]):
        self.file = file
        self.mismatches = 0

    def line(self, text: str = "") -> None:
        print(text, file=self.file)

    def heading(self, text: str) -> None:
        self.line()
        self.line(text)
        self.line("=" * len(text))

    def sub(self, text: str) -> None:
        self.line()
        self.line(text)
        self.line("-" * len(text))

    def array(self, label: str, a: np.ndarray, unit: str = "channel") -> None:
        """Print a 2-D array under ``label``; a 3-D array one ``unit`` (channel, map) at a time."""
        a = np.asarray(a)
        if a.ndim == 2:
            self.line(f"{label}:")
            self.line(_indent(format_array(a), "  "))
        else:
            for i in range(a.shape[0]):
                self.array(f"{label}, {unit} {i}", a[i], unit)

    def check(self, what: str, engine: np.ndarray, other: np.ndarray, other_name: str) -> None:
        """Compare an engine result with an independent one; shout if they differ."""
        engine = np.asarray(engine, dtype=np.float64)
        other = np.asarray(other, dtype=np.float64)
        if engine.shape != other.shape:
            self.mismatches += 1
            self.line(f"!!! MISMATCH: {what}: engine shape {engine.shape} but {other_name} shape "
                      f"{other.shape} !!!")
            return
        diff = float(np.max(np.abs(engine - other))) if engine.size else 0.0
        scale = max(1.0, float(np.max(np.abs(other)))) if other.size else 1.0
        if np.all(np.isfinite(engine)) and diff <= 1e-9 * scale:
            self.line(f"  check: {what}: engine == {other_name} (max |difference| {diff:.3g})")
            return
        self.mismatches += 1
        bar = "!" * 72
        self.line(bar)
        self.line(f"!!! MISMATCH: {what}: engine and {other_name} disagree, max |difference| {diff:.6g}")
        self.array("engine", engine.reshape(-1, engine.shape[-1]) if engine.ndim > 3 else engine)
        self.array(other_name, other.reshape(-1, other.shape[-1]) if other.ndim > 3 else other)
        self.line(bar)


class _Recorder(_Printer):
    """A printer that also keeps the replay as data: parts (headings) of steps (sub-headings),
    each a list of items ``{"text"}``, ``{"label", "cells"}`` (a 2-D array's entries as printed)
    or ``{"check", "ok"}``."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.parts: list[dict[str, Any]] = []
        self._inner = 0          # > 0 while a heading, array or check prints its own lines
        self._said: list[str] = []

    @contextlib.contextmanager
    def _quiet(self):
        self._inner += 1
        try:
            yield
        finally:
            self._inner -= 1

    def _items(self) -> list[dict[str, Any]]:
        if not self.parts:
            self.parts.append({"title": "", "steps": []})
        steps = self.parts[-1]["steps"]
        if not steps:
            steps.append({"title": "", "items": []})
        return steps[-1]["items"]

    def line(self, text: str = "") -> None:
        super().line(text)
        if self._inner:
            self._said.append(text)
        elif text:
            self._items().append({"text": text})

    def heading(self, text: str) -> None:
        with self._quiet():
            super().heading(text)
        self.parts.append({"title": text, "steps": []})

    def sub(self, text: str) -> None:
        with self._quiet():
            super().sub(text)
        self._items()  # makes sure a part exists
        self.parts[-1]["steps"].append({"title": text, "items": []})

    def array(self, label: str, a: np.ndarray, unit: str = "channel") -> None:
        a = np.asarray(a)
        if a.ndim != 2:
            super().array(label, a, unit)  # recurses into self.array one 2-D slice at a time
            return
        if not self._inner:
            b = np.asarray(a, dtype=np.float64)
            integral = bool(np.all(np.isfinite(b)) and np.all(b == np.round(b)))
            self._items().append({"label": label, "cells": [[_num(v, integral) for v in row] for row in b]})
        with self._quiet():
            super().array(label, a, unit)

    def check(self, what: str, engine: np.ndarray, other: np.ndarray, other_name: str) -> None:
        before, self._said = self.mismatches, []
        with self._quiet():
            super().check(what, engine, other, other_name)
        text = " ".join(line.strip() for line in self._said if line.strip().strip("!"))
        self._items().append({"check": text.removeprefix("check: "), "ok": self.mismatches == before})


# --------------------------------------------------------------------------- validation

def _as_float_array(value: object, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got NaN or infinity")
    return a


def _as_input(x: object, name: str = "input") -> np.ndarray:
    """Return ``x`` as a (1, C, H, W) float64 array; accepts (H, W), (C, H, W), (1, C, H, W)."""
    a = _as_float_array(x, name)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[None]
    elif a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"{name} must hold one image: shape (H, W), (C, H, W) or (1, C, H, W), "
                             f"got shape {a.shape}")
    else:
        raise ValueError(f"{name} must have shape (H, W), (C, H, W) or (1, C, H, W), got shape {a.shape}")
    _, c, h, w = a.shape
    if min(c, h, w) < 1:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    if h > MAX_SIDE or w > MAX_SIDE or c > MAX_CHANNELS:
        raise ValueError(f"{name} shape {a.shape[1:]} is too large to print: explain shows every number, "
                         f"so keep it at most {MAX_CHANNELS} channels of {MAX_SIDE}x{MAX_SIDE}")
    return a


def _as_weight(weight: object) -> np.ndarray:
    a = _as_float_array(weight, "weight")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"weight must have shape (F, C, KH, KW) (or (C, KH, KW) for one filter), "
                         f"got shape {a.shape}")
    if min(a.shape) < 1:
        raise ValueError(f"weight must not be empty, got shape {a.shape}")
    if a.shape[0] > MAX_FILTERS or a.shape[1] > MAX_CHANNELS or max(a.shape[2:]) > MAX_SIDE:
        raise ValueError(f"weight shape {a.shape} is too large to print: at most {MAX_FILTERS} filters, "
                         f"{MAX_CHANNELS} channels, {MAX_SIDE}x{MAX_SIDE} kernels")
    return a


def _as_pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    # Members of a weights .npz arrive as 0-d or (2,) arrays: check them as an int or a pair.
    return _args.pair(value.tolist() if isinstance(value, np.ndarray) else value, name, minimum)


def _conv_setup(x: object, weight: object, bias: object, stride: object, padding: object):
    """Validate a conv layer's arrays; return ``(x, weight, bias, stride, padding, (OH, OW))``."""
    x = _as_input(x)
    weight = _as_weight(weight)
    f, c, kh, kw = weight.shape
    if x.shape[1] != c:
        raise ValueError(f"input has {x.shape[1]} channel(s) (shape {x.shape[1:]}) but the filters expect "
                         f"{c} (weight shape {weight.shape}); pass --weights/--input whose channels match")
    if bias is None:
        bias = np.zeros(f)
    else:
        bias = _as_float_array(bias, "bias")
        if bias.shape != (f,):
            raise ValueError(f"bias must have shape ({f},) for {f} filter(s), got shape {bias.shape}")
    s = _as_pair(stride, "stride", 1)
    p = _as_pair(padding, "padding", 0)
    out = []
    for axis, size, k, si, pi in (("height", x.shape[2], kh, s[0], p[0]), ("width", x.shape[3], kw, s[1], p[1])):
        if k > size + 2 * pi:
            raise ValueError(f"kernel {axis} {k} is larger than the padded input {axis} {size + 2 * pi} "
                             f"(input {size} + 2*padding {pi}); use a smaller kernel or more padding")
        out.append(_args.output_size(size, k, si, (pi, pi)))
    return x, weight, bias, s, p, tuple(out)


def load_input(path: str) -> np.ndarray:
    """Load ``--input FILE.npy``: one image of shape (H, W), (C, H, W) or (1, C, H, W)."""
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"input file not found: {path}") from None
    except ValueError as exc:
        raise ValueError(f"cannot read input file {path}: {exc}") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise ValueError(f"input file {path} must be a .npy array, not an .npz archive")
    return _as_input(a, f"input {path}")


def load_weights(path: str) -> dict:
    """Load ``--weights FILE.npz`` with ``weight`` (F, C, KH, KW) and optional ``bias``, ``stride``, ``padding``.

    Returns
    -------
    dict with keys ``weight``, ``bias`` (None when absent), ``stride``, ``padding``
    (None when absent: the caller's defaults apply).
    """
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read weights file {path}: {exc}") from None
    if not hasattr(z, "files"):
        raise ValueError(f"weights file {path} must be an .npz archive (np.savez), not a .npy array")
    try:
        data = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read weights file {path}: {exc}") from None
    finally:
        z.close()
    allowed = {"weight", "bias", "stride", "padding"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"weights file {path} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if "weight" not in data:
        raise ValueError(f"weights file {path} has no 'weight' array (shape (F, C, KH, KW)); "
                         f"keys found: {sorted(data)}")
    out = {"weight": _as_weight(data["weight"]), "bias": data.get("bias"),
           "stride": data.get("stride"), "padding": data.get("padding")}
    for key in ("stride", "padding"):
        if out[key] is not None:
            _as_pair(out[key], f"{key} in {path}", 1 if key == "stride" else 0)
    return out


# --------------------------------------------------------------------------- display-only helpers

def zero_insert(dy: np.ndarray, stride: tuple[int, int]) -> np.ndarray:
    """Put ``stride - 1`` zeros between neighbouring entries of the last two axes (display helper)."""
    sh, sw = stride
    h, w = dy.shape[-2:]
    out = np.zeros(dy.shape[:-2] + ((h - 1) * sh + 1, (w - 1) * sw + 1), dtype=dy.dtype)
    out[..., ::sh, ::sw] = dy
    return out


def pad_or_crop(a: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Zero-pad the last two axes by the given amounts; a negative amount crops instead (display helper)."""
    pads = [(0, 0)] * (a.ndim - 2) + [(max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))]
    a = np.pad(a, pads)
    h, w = a.shape[-2:]
    return a[..., max(-top, 0): h - max(-bottom, 0), max(-left, 0): w - max(-right, 0)]


def _pair_str(p: tuple[int, int]) -> str:
    return str(p[0]) if p[0] == p[1] else f"({p[0]}, {p[1]})"


def _products(window: np.ndarray, kernel: np.ndarray) -> str:
    integral = bool(np.all(window == np.round(window)) and np.all(kernel == np.round(kernel)))

    def n(v: float) -> str:
        s = _num(v, integral)
        return f"({s})" if s.startswith("-") else s

    return " + ".join(f"{n(a)}*{n(b)}" for a, b in zip(window.ravel(), kernel.ravel()))


# --------------------------------------------------------------------------- the three parts

def _conv(out: _Printer, x, weight, bias, stride, padding) -> np.ndarray:
    x, weight, bias, s, p, (oh, ow) = _conv_setup(x, weight, bias, stride, padding)
    _, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    out.heading("Convolution forward")
    out.line(f"input: {c} channel(s) of {h}x{w}; {f} filter(s) of {c}x{kh}x{kw}; "
             f"stride {_pair_str(s)}; zero padding {_pair_str(p)}")
    out.array("input x", x[0])
    for i in range(f):
        out.array(f"filter W{i}", weight[i])
        out.line(f"bias b{i} = {_num(bias[i], bias[i] == round(bias[i]))}")

    out.sub("Output size: (W1 - F + 2P) / S + 1")
    for axis, size, k, si, pi, o in (("height", h, kh, s[0], p[0], oh), ("width", w, kw, s[1], p[1], ow)):
        top = size - k + 2 * pi
        exact = top % si == 0
        form = f"({size} - {k} + 2*{pi})/{si} + 1 = {top}/{si} + 1 = {o}" if exact else \
            f"floor(({size} - {k} + 2*{pi})/{si}) + 1 = floor({top}/{si}) + 1 = {o}"
        out.line(f"{axis}: {form}")

    xp = pad_or_crop(x[0], p[0], p[0], p[1], p[1])
    if p != (0, 0):
        out.sub(f"Input with {_pair_str(p)} ring(s) of zero padding")
        out.array("padded x", xp)

    y = F.conv2d(x, weight, bias, stride=s, padding=p)
    out.sub("One output element as its sum of products plus bias")
    out.line(f"a[0][0, 0] = sum over channels d of (window of padded x[d] at rows 0..{kh - 1}, "
             f"columns 0..{kw - 1}) * W0[d], plus b0")
    total = 0.0
    for d in range(c):
        win = xp[d, :kh, :kw]
        part = float(np.sum(win * weight[0, d]))
        total += part
        out.line(f"channel {d}: {_products(win, weight[0, d])} = {_num(part, part == round(part))}")
    total += float(bias[0])
    integral = total == round(total)
    sums = " + ".join(_num(float(np.sum(xp[d, :kh, :kw] * weight[0, d])), integral) for d in range(c))
    out.line(f"a[0][0, 0] = {sums} + {_num(bias[0], integral)} (bias) = {_num(total, integral)}")
    out.check("that element", y[0, 0, 0, 0], total, "the written-out sum")

    out.sub(f"Feature maps ({f} filter(s) -> {f} map(s) of {oh}x{ow}), computed by convnet.functional.conv2d")
    for i in range(f):
        out.array(f"feature map {i}", y[0, i])
    out.check("feature maps", y, R.conv2d(x, weight, bias, stride=s, padding=p), "loop reference")
    return y


def _backward(out: _Printer, x, weight, bias, stride, padding, dy) -> None:
    x, weight, bias, s, p, (oh, ow) = _conv_setup(x, weight, bias, stride, padding)
    _, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    if dy is None:
        # Small integers in -2..2, different per map, so the routing stays readable.
        ff, ii, jj = np.meshgrid(np.arange(f), np.arange(oh), np.arange(ow), indexing="ij")
        dy = ((ff + ii + 2 * jj) % 5 - 2).astype(np.float64)
    dy = _as_float_array(dy, "sensitivity map dy")
    if dy.ndim == 4 and dy.shape[0] == 1:
        dy = dy[0]
    if dy.shape != (f, oh, ow):
        raise ValueError(f"sensitivity map dy must have shape ({f}, {oh}, {ow}) (the layer's output), "
                         f"got shape {dy.shape}")

    out.heading("Convolution backward (sensitivity maps and filter gradients)")
    out.line(f"layer: {c} channel(s) of {h}x{w} in, {f} filter(s) of {c}x{kh}x{kw}, stride {_pair_str(s)}, "
             f"padding {_pair_str(p)}; output {f}x{oh}x{ow}")
    out.line("given sensitivity map dy (dE/dnet for each of the layer's output maps):")
    out.array("dy", dy, "map")

    dyz = zero_insert(dy, s)
    out.sub(f"1. Zero insertion for stride {_pair_str(s)}: {_pair_str((s[0] - 1, s[1] - 1))} zero(s) between "
            f"entries -> {dyz.shape[1]}x{dyz.shape[2]} (the map a stride-1 layer would have)")
    out.array("zero-inserted dy", dyz, "map")

    # Rows/columns of the padded input that no window reaches get no error.
    rh, rw = (h + 2 * p[0] - kh) % s[0], (w + 2 * p[1] - kw) % s[1]
    top, left = kh - 1 - p[0], kw - 1 - p[1]
    bottom, right = top + rh, left + rw
    dyp = pad_or_crop(dyz, top, bottom, left, right)
    out.sub(f"2. Padding: (K - 1 - P) = {top} row(s) top, {bottom} bottom; {left} column(s) left, {right} right "
            f"-> {dyp.shape[1]}x{dyp.shape[2]}")
    if rh or rw:
        out.line(f"(bottom/right include {rh}/{rw} extra row(s)/column(s): the input's last rows/columns that no "
                 f"window reaches, whose error is 0)")
    if min(top, bottom, left, right) < 0:
        out.line("(a negative amount means the padding P exceeds K - 1: crop instead of pad)")
    out.array("padded dy", dyp, "map")

    wflip = weight[:, :, ::-1, ::-1]
    out.sub("3. Filters rotated by 180 degrees (flip rows and columns)")
    for i in range(f):
        out.array(f"flipped W{i}", wflip[i])

    out.sub("4. Input sensitivity map: padded dy correlated (stride 1) with the flipped filters, summed over filters")
    out.line("delta_in[d] = sum over filters f of padded dy[f] * flipped W_f[d]   (times f'(net) of the layer "
             "below, not included here)")
    swapped = np.ascontiguousarray(wflip.transpose(1, 0, 2, 3))
    dx_route = F.conv2d(np.ascontiguousarray(dyp[None]), swapped)
    dx, dw, db = F.conv2d_backward(dy[None], x, weight, stride=s, padding=p)
    out.array("input sensitivity map dx", dx[0])
    out.check("dx", dx, dx_route, "the zero-insert/pad/flip steps above (run by convnet.functional.conv2d)")
    dx_ref, dw_ref, db_ref = R.conv2d_backward(dy[None], x, weight, stride=s, padding=p)
    out.check("dx", dx, dx_ref, "loop reference")

    out.sub("5. Filter gradients: padded input correlated with the zero-inserted dy (weight sharing sums every "
            "position)")
    out.line("dW_f[d] = padded x[d] correlated with zero-inserted dy[f] (first KxK values);  db_f = sum of dy[f]")
    xp = pad_or_crop(x[0], p[0], p[0], p[1], p[1])
    dw_route = F.conv2d(np.ascontiguousarray(xp[:, None]), np.ascontiguousarray(dyz[:, None]))
    dw_route = dw_route[:, :, :kh, :kw].transpose(1, 0, 2, 3)
    for i in range(f):
        out.array(f"dW{i}", dw[i])
    out.line("db = " + format_array(db))
    out.check("dW", dw, dw_route, "the correlation above (run by convnet.functional.conv2d)")
    out.check("dW", dw, dw_ref, "loop reference")
    out.check("db", db, dy.sum(axis=(1, 2)), "sum of dy")
    out.check("db", db, db_ref, "loop reference")


def _pool(out: _Printer, x, dy) -> None:
    x = _as_input(x)
    _, c, h, w = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"2x2 pooling needs an input of at least 2x2, got {h}x{w}")
    oh, ow = h // 2, w // 2
    if dy is None:
        dy = np.arange(1, c * oh * ow + 1, dtype=np.float64).reshape(c, oh, ow)
    dy = _as_float_array(dy, "pooling dy")
    if dy.shape != (c, oh, ow):
        raise ValueError(f"pooling dy must have shape ({c}, {oh}, {ow}), got shape {dy.shape}")

    out.heading("Pooling: 2x2 windows, stride 2")
    out.array("input", x[0])
    if h % 2 or w % 2:
        out.line(f"(input {h}x{w} is odd: the last row/column is in no window and gets zero error)")

    out.sub("Max pooling forward: the largest value of each window")
    y = F.max_pool2d(x, 2, 2)
    out.array("max pooled", y[0])
    out.check("max pooling", y, R.max_pool2d(x, 2, 2), "loop reference")

    out.sub("Max pooling backward: each error goes to its window's maximum, the others get 0")
    out.array("dy (error of the pooled map)", dy)
    for ci in range(c):
        for i in range(oh):
            for j in range(ow):
                win = x[0, ci, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2]
                a, b = np.unravel_index(int(np.argmax(win)), win.shape)
                out.line(f"channel {ci} window ({i}, {j}) {format_array(win.ravel())}: max "
                         f"{_num(win[a, b], True if win[a, b] == round(win[a, b]) else False)} at input "
                         f"({2 * i + a}, {2 * j + b}) receives "
                         f"{_num(dy[ci, i, j], dy[ci, i, j] == round(dy[ci, i, j]))}")
    dx = F.max_pool2d_backward(dy[None], x, 2, 2)
    out.array("dx", dx[0])
    out.check("max pooling dx", dx, R.max_pool2d_backward(dy[None], x, 2, 2), "loop reference")

    out.sub("Mean pooling forward: the average of each window")
    ya = F.avg_pool2d(x, 2, 2)
    out.array("mean pooled", ya[0])
    out.check("mean pooling", ya, R.avg_pool2d(x, 2, 2), "loop reference")

    out.sub("Mean pooling backward (same dy): each error is shared equally by its 4 inputs: "
            "kron(dy, ones(2, 2)) / 4")
    dxa = F.avg_pool2d_backward(dy[None], x, 2, 2)
    kron = np.stack([np.kron(dy[ci], np.ones((2, 2))) / 4 for ci in range(c)])
    kron = pad_or_crop(kron, 0, h - 2 * oh, 0, w - 2 * ow)
    out.array("dx", dxa[0])
    out.check("mean pooling dx", dxa[0], kron, "kron(dy, ones(2, 2)) / 4")
    out.check("mean pooling dx", dxa, R.avg_pool2d_backward(dy[None], x, 2, 2), "loop reference")


def explain(part: str | Sequence[str] = "all", x: np.ndarray | None = None, weight: np.ndarray | None = None,
            bias: np.ndarray | None = None, stride: object = None, padding: object = None,
            dy: np.ndarray | None = None, file: IO[str] | None = None) -> int:
    """Replay the tutorial's worked examples (or the same steps on your arrays) in the terminal.

    Parameters
    ----------
    part : "all", "conv", "backward", "pool", or a sequence of those
    x : array of shape (H, W), (C, H, W) or (1, C, H, W), optional
        The input image; default the tutorial's (3, 5, 5) input for conv/backward and its
        (2, 4, 4) input for pooling.
    weight : array of shape (F, C, KH, KW), optional
        Filters; default the tutorial's two 3x3x3 filters.
    bias : array of shape (F,), optional
        Default the tutorial's bias when ``weight`` is the tutorial's, zeros otherwise.
    stride, padding : int or (h, w) pair, optional
        Default 2 and 1 (the tutorial's) when both ``x`` and ``weight`` are the
        tutorial's, otherwise 1 and 0.
    dy : array of shape (F, OH, OW), optional
        Sensitivity map for the backward part; default a readable small-integer one.
    file : text stream, default ``sys.stdout``

    Returns
    -------
    int
        The number of engine/reference disagreements found (0 when all agree).

    Raises
    ------
    ValueError, TypeError
        For arrays or arguments that do not fit, before anything is printed.
    """
    out = _Printer(file if file is not None else sys.stdout)
    _replay(out, part, x, weight, bias, stride, padding, dy)
    return out.mismatches


def steps(part: str | Sequence[str] = "all", x: np.ndarray | None = None, weight: np.ndarray | None = None,
          bias: np.ndarray | None = None, stride: object = None, padding: object = None,
          dy: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The replay :func:`explain` prints, as data (same arguments, same numbers).

    Returns
    -------
    list of dict
        One per part: ``{"title": heading, "steps": [{"title": sub-heading, "items": [...]}]}``,
        each item one of ``{"text": line}``, ``{"label": name, "cells": [[str]]}`` (a 2-D array,
        its entries formatted as :func:`explain` prints them) or ``{"check": message, "ok": bool}``
        (an engine result compared with an independent computation). Lines printed before the
        first heading form an untitled part.
    """
    out = _Recorder()
    _replay(out, part, x, weight, bias, stride, padding, dy)
    return out.parts


def _replay(out: _Printer, part, x, weight, bias, stride, padding, dy) -> None:
    parts = list(PARTS) if part == "all" else [part] if isinstance(part, str) else list(part)
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"part must be 'all' or one of {PARTS}, got {p!r}")
    example_conv = x is None and weight is None
    cx = EXAMPLE_INPUT if x is None else x
    cw = EXAMPLE_WEIGHT if weight is None else weight
    cb = bias if bias is not None else (EXAMPLE_BIAS if weight is None else None)
    cs = stride if stride is not None else (EXAMPLE_STRIDE if example_conv else 1)
    cp = padding if padding is not None else (EXAMPLE_PADDING if example_conv else 0)
    cdy = dy if dy is not None else (EXAMPLE_DY if example_conv else None)
    px = EXAMPLE_POOL_INPUT if x is None else x

    # Validate everything first so a bad array fails before any output.
    if "conv" in parts or "backward" in parts:
        _conv_setup(cx, cw, cb, cs, cp)
    if "pool" in parts:
        _as_input(px)

    if example_conv and ("conv" in parts or "backward" in parts):
        out.line("The tutorial's worked example: a 5x5x3 input, two 3x3x3 filters, stride 2, zero padding 1.")
    for p in parts:
        if p == "conv":
            _conv(out, cx, cw, cb, cs, cp)
        elif p == "backward":
            _backward(out, cx, cw, cb, cs, cp, cdy)
        else:
            _pool(out, px, None)
    out.line()
    if out.mismatches:
        out.line(f"!!! {out.mismatches} MISMATCH(ES) between the engine and an independent computation !!!")
    else:
        out.line("All numbers above were computed by convnet.functional and agree with the loop reference "
                 "(convnet.reference).")
