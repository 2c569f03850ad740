"""Argument parsing and validation shared by the vectorized ops and the loop reference.

Nothing here computes a convolution: it only turns user arguments into canonical
tuples and rejects bad ones with a message that names the argument and its value,
before any work is done.
"""

from __future__ import annotations

import math
import os

import numpy as np

IntOrPair = int | tuple[int, int]
Padding = int | tuple[int, int] | str
# ((top, bottom), (left, right)): "same" with an even kernel needs uneven sides.
Pads = tuple[tuple[int, int], tuple[int, int]]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- scalars

class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type.

    A ``TypeError``; also a ``ValueError`` because the checks it replaced raised that,
    and callers catch it.
    """


def is_int(value: object) -> bool:
    """True for Python and numpy integers; False for bools (``True`` is not a size)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """True for Python and numpy integers and floats; False for bools and complex numbers."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def integer(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as a Python int in ``[minimum, maximum]`` (either bound optional), or raise.

    The message names the argument and the value, e.g. ``epochs must be a positive int, got 0``.
    """
    if minimum == 1 and maximum is None:
        what = "a positive int"
    elif minimum == 0 and maximum is None:
        what = "a non-negative int"
    elif minimum is None and maximum is None:
        what = "an int"
    else:
        what = f"an int in [{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}]"
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def positive_int(value: object, name: str) -> int:
    """Return ``value`` as a Python int >= 1, or raise naming ``name``."""
    return integer(value, name, 1)


def non_negative_int(value: object, name: str) -> int:
    """Return ``value`` as a Python int >= 0, or raise naming ``name``."""
    return integer(value, name, 0)


def real(value: object, name: str, low: float | None = None, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False, finite: bool = False, what: str | None = None) -> float:
    """Return ``value`` as a Python float (so it never upcasts a float32 array), or raise.

    ``low`` / ``high`` bound it (closed unless ``low_open`` / ``high_open``; a bound also
    refuses nan); ``finite`` refuses inf and nan. Bools and non-numbers are a
    ``TypeError``, a number out of range a ``ValueError``; both messages say what is
    expected (``what`` overrides the wording), name the argument and show the value.
    """
    if what is None:
        kind = "finite number" if finite else "number"
        if low is None and high is None:
            what = "a finite real number" if finite else "a real number"
        elif low == 0 and high is None:
            what = f"a {'positive' if low_open else 'non-negative'} {kind}"
        else:
            left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
            right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
            what = f"a {kind} in {left}, {right}"
    if not is_real(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    v = float(value)
    above = low is None or (v > low if low_open else v >= low)
    below = high is None or (v < high if high_open else v <= high)
    if not (above and below) or (finite and not math.isfinite(v)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def probability(value: object, name: str) -> float:
    """A drop probability: a real number in ``[0, 1)`` (1 would drop everything)."""
    return real(value, name, 0.0, 1.0, high_open=True, what="a probability in [0, 1)")


def flag(value: object, name: str) -> bool:
    """Return ``value`` (True/False or a numpy bool) as a Python bool; anything else is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise ``name must be 'a', 'b' or 'c', got ...``."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}" if len(choices) > 1 \
            else repr(choices[0])
        raise ValueError(f"{name} must be {options}, got {value!r}")
    return value


# --------------------------------------------------------------------------- geometry

def pair(value: IntOrPair, name: str, minimum: int) -> tuple[int, int]:
    """Return ``value`` as an ``(h, w)`` pair of ints, each at least ``minimum``."""
    if is_int(value):
        out = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        out = (int(value[0]), int(value[1]))
    else:
        raise ArgumentTypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def padding_pads(padding: Padding, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> Pads:
    """Resolve ``padding`` (int, pair, ``"valid"`` or ``"same"``) to per-side pads.

    ``"same"`` keeps the output size equal to the input size (stride 1 only); when the
    total padding ``D*(K-1)`` is odd, the extra row/column goes to the bottom/right,
    as in PyTorch.
    """
    kernel, stride = pair(kernel, "kernel_size", 1), pair(stride, "stride", 1)
    dilation = pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' requires stride 1, got stride={stride}")
            sides = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                sides.append((total // 2, total - total // 2))
            return (sides[0], sides[1])
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = pair(padding, "padding", 0)
    return ((ph, ph), (pw, pw))


def check_array(x: object, name: str, ndim: int, layout: str) -> np.ndarray:
    """Check that ``x`` is a float32/float64 ndarray of ``ndim`` dimensions."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {x.shape}")
    return x


def check_same_dtype(**arrays: np.ndarray) -> None:
    """Reject a mix of float32 and float64 among ``arrays`` (no silent upcast)."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"dtypes must match, got {desc}")


def check_shape(x: np.ndarray, name: str, expected: tuple[int, ...]) -> None:
    """Require ``x.shape == expected`` (used for ``dy`` in backward passes)."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def output_size(size: int, k: int, s: int, pads: tuple[int, int], d: int = 1) -> int:
    """Output length of one spatial axis of a convolution or pooling window: the floor rule.

    ``OH = (H + P0 + P1 - D*(K-1) - 1) // S + 1``: the number of windows of ``D*(K-1) + 1``
    inputs, ``S`` apart, that fit in the padded axis. This is the one rule of the
    vectorized side (the loop reference keeps its own, as an independent witness).
    """
    return (size + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def out_size_or_raise(size: int, pads: tuple[int, int], k: int, s: int, d: int, axis: str) -> int:
    """:func:`output_size`, or ``ValueError`` when the (dilated) kernel is larger than the padded input."""
    padded = size + pads[0] + pads[1]
    span = d * (k - 1) + 1
    if span > padded:
        raise ValueError(
            f"kernel {axis} extent {span} (kernel_size={k}, dilation={d}) is larger than the "
            f"padded input {axis} {padded} (input {size} + padding {pads[0]}+{pads[1]})"
        )
    return output_size(size, k, s, pads, d)


def transposed_output_size(size: int, k: int, s: int, pads: tuple[int, int], d: int = 1,
                           output_padding: int = 0) -> int:
    """Output length of one axis of a transposed convolution: the inverse of :func:`output_size`.

    ``(H - 1)*S - P0 - P1 + D*(K-1) + output_padding + 1``: the largest input of the forward
    convolution whose output has ``H`` entries is ``output_padding`` (< S) longer than the
    smallest, and PyTorch picks it with that argument.
    """
    return (size - 1) * s - pads[0] - pads[1] + d * (k - 1) + output_padding + 1


def _check_groups(groups: object, c: int, f: int, c_name: str, f_name: str) -> int:
    groups = positive_int(groups, "groups")
    if c % groups or f % groups:
        raise ValueError(f"groups={groups} must divide both {c_name}={c} and {f_name}={f}")
    return groups


def conv_args(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: IntOrPair,
              padding: Padding, dilation: IntOrPair, groups: int = 1):
    """Validate conv2d arguments; return ``(stride, pads, dilation, (OH, OW))``.

    ``weight`` is (F, C/groups, KH, KW); C and F must be multiples of ``groups``.
    """
    check_array(x, "x", 4, "(N, C, H, W)")
    check_array(weight, "weight", 4, "(F, C, KH, KW)" if groups == 1 else "(F, C/groups, KH, KW)")
    if bias is not None:
        check_array(bias, "bias", 1, "(F,)")
    check_same_dtype(x=x, weight=weight, bias=bias)
    groups = _check_groups(groups, x.shape[1], weight.shape[0], "C (the input channels)", "F (the filters)")
    if weight.shape[1] * groups != x.shape[1]:
        if groups == 1:
            raise ValueError(
                f"channel mismatch: x has C={x.shape[1]} channels (shape {x.shape}) but weight expects "
                f"C={weight.shape[1]} (shape {weight.shape})"
            )
        raise ValueError(
            f"channel mismatch: x has C={x.shape[1]} channels (shape {x.shape}), so with groups={groups} "
            f"weight must have C/groups={x.shape[1] // groups} channels, got {weight.shape[1]} (shape {weight.shape})"
        )
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
    if min(weight.shape) < 1 or min(x.shape) < 1:
        raise ValueError(f"empty arrays are not supported: x {x.shape}, weight {weight.shape}")
    s = pair(stride, "stride", 1)
    d = pair(dilation, "dilation", 1)
    k = (weight.shape[2], weight.shape[3])
    pads = padding_pads(padding, k, s, d)
    oh = out_size_or_raise(x.shape[2], pads[0], k[0], s[0], d[0], "height")
    ow = out_size_or_raise(x.shape[3], pads[1], k[1], s[1], d[1], "width")
    check_output_fits((x.shape[0], weight.shape[0], oh, ow), x.dtype, padding)
    return s, pads, d, (oh, ow)


def conv_transpose_args(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: IntOrPair,
                        padding: IntOrPair, output_padding: IntOrPair, groups: int, dilation: IntOrPair):
    """Validate conv_transpose2d arguments; return ``(stride, pads, dilation, (OH, OW))``.

    ``x`` is (N, C_in, H, W), ``weight`` (C_in, C_out/groups, KH, KW) as in PyTorch, the
    output (N, C_out, OH, OW) with :func:`transposed_output_size`. ``output_padding`` must
    be smaller than the stride or the dilation (PyTorch's rule), so it only picks among the
    inputs of the forward convolution that give ``H`` outputs.
    """
    check_array(x, "x", 4, "(N, C_in, H, W)")
    check_array(weight, "weight", 4, "(C_in, C_out/groups, KH, KW)")
    if bias is not None:
        check_array(bias, "bias", 1, "(C_out,)")
    check_same_dtype(x=x, weight=weight, bias=bias)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has C_in={x.shape[1]} channels (shape {x.shape}) but weight "
                         f"(C_in, C_out/groups, KH, KW) expects C_in={weight.shape[0]} (shape {weight.shape})")
    groups = positive_int(groups, "groups")
    if x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide C_in={x.shape[1]} (the input channels)")
    c_out = weight.shape[1] * groups
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},) (C_out), got {bias.shape}")
    if min(weight.shape) < 1 or min(x.shape) < 1:
        raise ValueError(f"empty arrays are not supported: x {x.shape}, weight {weight.shape}")
    s = pair(stride, "stride", 1)
    d = pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        raise ArgumentTypeError(f"padding of a transposed convolution must be an int or a pair, got {padding!r}")
    p = pair(padding, "padding", 0)
    op = pair(output_padding, "output_padding", 0)
    for axis, o, si, di in zip(("height", "width"), op, s, d):
        if o >= max(si, di):
            raise ValueError(f"output_padding must be smaller than stride or dilation, got output_padding="
                             f"{output_padding!r} with stride={stride!r}, dilation={dilation!r} ({axis})")
    pads = ((p[0], p[0]), (p[1], p[1]))
    out = []
    for axis, size, k, si, pi, di, o in zip(("height", "width"), x.shape[2:], weight.shape[2:], s, pads, d, op):
        length = transposed_output_size(size, k, si, pi, di, o)
        if length < 1:
            raise ValueError(f"padding={padding!r} leaves no output {axis}: (H-1)*S - 2P + D*(K-1) + "
                             f"output_padding + 1 = {length} for input {axis} {size}")
        out.append(length)
    check_output_fits((x.shape[0], c_out, out[0], out[1]), x.dtype, padding)
    return s, pads, d, (out[0], out[1])


def memory_bytes() -> int:
    """This machine's physical memory in bytes (2**47, the usual address space, if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**47


def check_output_fits(shape: tuple[int, ...], dtype: np.dtype, padding: object) -> None:
    """Refuse a result larger than the machine's memory (an absurd ``padding``), before any work."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > memory_bytes():
        raise ValueError(f"the output would have shape {shape} ({nbytes / 2**30:.3g} GiB, with padding={padding!r}), "
                         f"more than this machine's memory ({memory_bytes() / 2**30:.3g} GiB)")


def pool_params(kernel_size: IntOrPair, stride: IntOrPair | None,
                padding: IntOrPair) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate pooling's scalar arguments; return ``(kernel, stride, padding)`` pairs.

    ``stride`` defaults to the kernel. Padding may be at most half the kernel (as in
    PyTorch), so every window holds at least one real input element.
    """
    k = pair(kernel_size, "kernel_size", 1)
    s = k if stride is None else pair(stride, "stride", 1)
    if isinstance(padding, str):
        raise ArgumentTypeError(f"padding for pooling must be an int or a pair, got {padding!r}")
    p = pair(padding, "padding", 0)
    for pi, ki in zip(p, k):
        if 2 * pi > ki:
            raise ValueError(f"padding must be at most half of kernel_size, got padding={padding!r}, "
                             f"kernel_size={kernel_size!r}")
    return k, s, p


def pool_args(x: np.ndarray, kernel_size: IntOrPair, stride: IntOrPair | None, padding: IntOrPair):
    """Validate pooling arguments; return ``(kernel, stride, pads, (OH, OW))`` (see :func:`pool_params`)."""
    check_array(x, "x", 4, "(N, C, H, W)")
    if min(x.shape) < 1:
        raise ValueError(f"empty arrays are not supported: x {x.shape}")
    k, s, p = pool_params(kernel_size, stride, padding)
    pads = ((p[0], p[0]), (p[1], p[1]))
    oh = out_size_or_raise(x.shape[2], pads[0], k[0], s[0], 1, "height")
    ow = out_size_or_raise(x.shape[3], pads[1], k[1], s[1], 1, "width")
    return k, s, pads, (oh, ow)
