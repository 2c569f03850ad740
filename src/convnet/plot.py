"""Pictures of a network: learning curves, filters, feature maps, saliency, confusion matrix.

matplotlib is optional (``pip install 'convnet[plot]'``). It is imported lazily inside
the drawing functions, through the object-oriented API with the Agg canvas, so importing
this module never needs it, no global pyplot state or interactive backend is touched,
and a missing matplotlib raises :class:`MatplotlibMissingError` with one clear line.

Everything shown is computed by the engine itself: feature maps by running the model's
layers one by one, saliency by the model's own backward pass.

Every ``*_png`` function writes one PNG (atomically: temporary file, then rename, so a
viewer never sees half a file while the learning curves are rewritten every epoch) and
returns its path. :func:`plot_model` writes the whole set under stable names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _args
from ._io import atomic_open
from .layers import AvgPool2d, Conv2d, MaxPool2d
from .training import confusion_matrix

__all__ = [
    "MISSING_MATPLOTLIB",
    "MatplotlibMissingError",
    "require_matplotlib",
    "LEARNING_CURVES",
    "FEATURE_MAPS",
    "SALIENCY",
    "CONFUSION_MATRIX",
    "filters_name",
    "learning_curves_png",
    "filters_png",
    "feature_maps_png",
    "saliency_map",
    "saliency_png",
    "confusion_matrix_png",
    "plot_model",
    "TrainingPlots",
]

MISSING_MATPLOTLIB = "matplotlib is not installed: pip install 'convnet[plot]'"

# Stable file names written by plot_model and ``convnet train --plots``.
LEARNING_CURVES = "learning_curves.png"
FEATURE_MAPS = "feature_maps.png"
SALIENCY = "saliency.png"
CONFUSION_MATRIX = "confusion_matrix.png"

DPI = 100
CELL = 90          # pixels per small image in a grid
GRID_COLUMNS = 8   # feature-map and first-layer filter grids wrap after this many images
MAX_SHOWN = 32     # at most this many filters / channels per filter picture


class MatplotlibMissingError(ImportError):
    """matplotlib, needed for pictures, is not installed."""

    def __init__(self) -> None:
        super().__init__(MISSING_MATPLOTLIB)


def require_matplotlib() -> None:
    """Raise :class:`MatplotlibMissingError` unless matplotlib can be imported."""
    _mpl()


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissingError() from None
    return Figure, FigureCanvasAgg


def _figure(width_px: int, height_px: int):
    Figure, FigureCanvasAgg = _mpl()
    # +0.25 px: Agg truncates width*dpi, and 2.9 * 100 is 289.99999...
    fig = Figure(figsize=((width_px + 0.25) / DPI, (height_px + 0.25) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=DPI)
    return path


def _symmetric(a: np.ndarray) -> tuple[float, float]:
    m = float(np.max(np.abs(a))) if a.size else 0.0
    m = m if m > 0 else 1.0
    return -m, m


def _scale(a: np.ndarray) -> dict:
    """Colour scale for a stack of maps: diverging around 0 when signed, else sequential."""
    if a.size and float(np.min(a)) < 0:
        lo, hi = _symmetric(a)
        return {"cmap": "RdBu_r", "vmin": lo, "vmax": hi}
    hi = float(np.max(a)) if a.size else 1.0
    return {"cmap": "viridis", "vmin": 0.0, "vmax": hi if hi > 0 else 1.0}


def _grid(fig: Any, images: np.ndarray, ncols: int, labels: Sequence[str] | None, colorbar: bool,
          row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None, **imshow) -> None:
    """Draw ``images`` (n, h, w) on ``fig`` (a figure or subfigure) in rows of ``ncols``.

    The images are tiled into one array drawn by a single ``imshow`` (hundreds of
    separate axes under constrained layout take seconds to lay out); the gaps are NaN,
    which the colour map leaves transparent. ``labels`` titles every image;
    ``row_labels`` / ``col_labels`` label the rows on the left / the columns on top.
    """
    n, h, w = images.shape
    nrows = max(1, math.ceil(n / ncols))
    gap_x = max(1, math.ceil(w / 8))
    # A titled tile gets a taller gap above it, room for its label.
    gap_y = max(1, math.ceil(h / 3)) if labels is not None else gap_x
    top = gap_y if labels is not None else 0
    mosaic = np.full((nrows * (h + gap_y) - gap_y + top, ncols * (w + gap_x) - gap_x), np.nan)
    for k in range(n):
        r, c = divmod(k, ncols)
        y0, x0 = top + r * (h + gap_y), c * (w + gap_x)
        mosaic[y0:y0 + h, x0:x0 + w] = images[k]
    ax = fig.subplots()
    im = ax.imshow(mosaic, interpolation="nearest", **imshow)
    ax.set_frame_on(False)
    ax.tick_params(length=0, labelsize=8)
    xs = [c * (w + gap_x) + (w - 1) / 2 for c in range(ncols)]
    ys = [top + r * (h + gap_y) + (h - 1) / 2 for r in range(nrows)]
    ax.xaxis.set_ticks_position("top")
    ax.set_xticks(xs[:len(col_labels)] if col_labels is not None else [],
                  list(col_labels) if col_labels is not None else [])
    ax.set_yticks(ys[:len(row_labels)] if row_labels is not None else [],
                  list(row_labels) if row_labels is not None else [])
    if labels is not None:
        for k in range(n):
            r, c = divmod(k, ncols)
            ax.text(xs[c], top + r * (h + gap_y) - 0.6, labels[k], ha="center", va="bottom", fontsize=8)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)


# --------------------------------------------------------------------------- learning curves

def learning_curves_png(history: Sequence[dict], path: str | os.PathLike) -> str:
    """Plot loss and accuracy per epoch, train and validation, from a training history.

    Parameters
    ----------
    history : list of dict
        One dict per epoch with "epoch", "loss", "accuracy" and optionally "val_loss",
        "val_accuracy" (None when there is no validation split), as returned by ``fit``.
    path : file to write (PNG, 1000x400 pixels).

    Returns
    -------
    str : ``path``.
    """
    if not isinstance(history, (list, tuple)) or not history:
        raise ValueError(f"history must be a non-empty list of per-epoch dicts, got {history!r:.80}")
    for i, h in enumerate(history):
        if not isinstance(h, dict) or not {"epoch", "loss", "accuracy"} <= set(h):
            raise ValueError(f"history[{i}] must be a dict with 'epoch', 'loss' and 'accuracy', got {h!r:.120}")
    epochs = [int(h["epoch"]) for h in history]

    def series(key: str) -> list[float] | None:
        vals = [h.get(key) for h in history]
        return None if all(v is None for v in vals) else [np.nan if v is None else float(v) for v in vals]

    fig = _figure(1000, 400)
    axes = fig.subplots(1, 2)
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        train = series(key)
        if train is None:  # regression losses (MSE) have no accuracy
            ax.text(0.5, 0.5, f"no {key} for this loss", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.plot(epochs, train, "o-", label=f"train {key}")
        val = series(f"val_{key}")
        if val is not None:
            ax.plot(epochs, val, "s--", label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    last = history[-1]
    acc = f", validation accuracy {last['val_accuracy']:.2%}" if last.get("val_accuracy") is not None else ""
    fig.suptitle(f"Learning curves: epoch {epochs[-1]}, train loss {float(last['loss']):.4f}{acc}")
    return _save(fig, path)


# --------------------------------------------------------------------------- filters

def filters_name(conv_index: int) -> str:
    """Stable file name for the ``conv_index``-th (1-based) conv layer's filters."""
    return f"filters_conv{conv_index}.png"


def filters_png(weight: np.ndarray, path: str | os.PathLike, title: str = "filters") -> str:
    """Draw a conv layer's filters.

    Parameters
    ----------
    weight : ndarray (F, C, KH, KW)
        With one input channel (the first layer on grey images) the F filters form a grid;
        otherwise each row is a filter and each column one of its input channels.
        At most 32 filters and 32 channels are drawn (the title says so).
    path : file to write.
    title : figure title.

    Returns
    -------
    str : ``path``.
    """
    if not isinstance(weight, np.ndarray) or weight.ndim != 4 or min(weight.shape) < 1:
        raise ValueError(f"weight must be a non-empty ndarray of shape (F, C, KH, KW), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    f, c, kh, kw = weight.shape
    shown = np.asarray(weight[:MAX_SHOWN, :MAX_SHOWN], dtype=np.float64)
    note = ("" if f <= MAX_SHOWN and c <= MAX_SHOWN
            else f" (first {min(f, MAX_SHOWN)} filters x {min(c, MAX_SHOWN)} channels)")
    scale = {"cmap": "RdBu_r", **dict(zip(("vmin", "vmax"), _symmetric(shown)))}
    if c == 1:
        ncols = min(len(shown), GRID_COLUMNS)
        nrows = math.ceil(len(shown) / ncols)
        images, labels = shown[:, 0], [f"filter {i}" for i in range(len(shown))]
    else:
        ncols, nrows = shown.shape[1], shown.shape[0]
        images, labels = shown.reshape(-1, kh, kw), None
        scale["row_labels"] = [f"filter {i}" for i in range(nrows)]
        scale["col_labels"] = [f"channel {j}" for j in range(ncols)]
    fig = _figure(ncols * CELL + 120, nrows * CELL + 60)
    fig.suptitle(f"{title}: {f} filter(s) of {c}x{kh}x{kw}{note}; red > 0 > blue", fontsize=10)
    _grid(fig, images, ncols, labels, colorbar=True, **scale)
    return _save(fig, path)


# --------------------------------------------------------------------------- feature maps

def _describe(index: int, layer: Any) -> str:
    name = type(layer).__name__
    if isinstance(layer, Conv2d):
        k = layer.weight.shape[2:]
        extra = "".join(f", {a} {getattr(layer, a)}" for a, default in (("stride", 1), ("padding", 0))
                        if getattr(layer, a) not in (default, (default, default)))
        return f"layer {index}: {name} {layer.in_channels}->{layer.out_channels}, {k[0]}x{k[1]}{extra}"
    if isinstance(layer, (MaxPool2d, AvgPool2d)):
        k = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 2
        return f"layer {index}: {name} {k[0]}x{k[1]}"
    return f"layer {index}: {name}"


def _one_image(model: Any, x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy ndarray, got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one image of shape (C, H, W) or (1, C, H, W), got shape {x.shape}")
    return x.astype(model.dtype or np.float32, copy=False)


def _layer_outputs(model: Any, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Run ``model``'s layers one by one in eval mode; keep each conv and pooling output."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, layer in enumerate(model.layers):
            x = layer.forward(x)
            if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d)):
                out.append((_describe(i, layer), x[0]))
    finally:
        model.clear_cache()
        model.train(was_training)
    return out


def feature_maps_png(model: Any, x: np.ndarray, path: str | os.PathLike, label: int | None = None) -> str:
    """Show one input image and every conv and pooling layer's output channels.

    Parameters
    ----------
    model : Sequential
    x : ndarray (C, H, W) or (1, C, H, W)
        One input, e.g. a digit (1, 28, 28).
    path : file to write; width 8 maps per row, height grows with the number of layers.
    label : true class of ``x``, shown in the title when given.

    Returns
    -------
    str : ``path``.
    """
    x = _one_image(model, x)
    blocks = [(f"input{'' if label is None else f' (label {label})'}", x[0])] + _layer_outputs(model, x)
    if len(blocks) == 1:
        raise ValueError("model has no Conv2d or pooling layer: no feature maps to show")
    rows = [math.ceil(len(maps) / GRID_COLUMNS) for _, maps in blocks]
    title_px = 30
    heights = [40] + [r * CELL + title_px for r in rows]
    fig = _figure(GRID_COLUMNS * CELL + 140, sum(heights))
    subfigs = fig.subfigures(len(heights), 1, height_ratios=heights)
    subfigs[0].suptitle("Feature maps: one input through every conv and pooling layer "
                        "(shared colour scale per layer)", fontsize=11)
    for sub, (title, maps) in zip(subfigs[1:], blocks):
        sub.suptitle(f"{title} -> output {tuple(maps.shape)}", fontsize=9, x=0.02, ha="left")
        scale = {"cmap": "gray_r", "vmin": float(maps.min()), "vmax": float(maps.max())} \
            if title.startswith("input") else _scale(maps)
        _grid(sub, maps, GRID_COLUMNS, None, colorbar=True, **scale)
    return _save(fig, path)


# --------------------------------------------------------------------------- saliency

def saliency_map(model: Any, x: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Gradient of the predicted class score with respect to the input pixels.

    Runs the model forward in eval mode, sets ``dlogits`` one-hot at the predicted
    class and calls ``model.backward``: the engine's own backward pass. The model's
    parameter gradients, cache and train/eval mode are left as they were.

    Parameters
    ----------
    model : Sequential producing logits (1, K)
    x : ndarray (C, H, W) or (1, C, H, W)

    Returns
    -------
    grad : ndarray (C, H, W), d score[pred] / d x
    pred : int, the predicted class
    logits : ndarray (K,)
    """
    x = _one_image(model, x)
    params = model.parameters()
    saved = [p.grad.copy() for p in params]
    was_training = model.training
    model.eval()
    try:
        logits = model.forward(x)
        if logits.ndim != 2 or logits.shape[0] != 1:
            raise ValueError(f"model must output logits of shape (1, K) for one image, got {logits.shape}")
        pred = int(np.argmax(logits[0]))
        dlogits = np.zeros_like(logits)
        dlogits[0, pred] = 1
        grad = model.backward(dlogits)[0]
    finally:
        model.clear_cache()
        model.train(was_training)
        for p, g in zip(params, saved):
            p.grad[...] = g
    return grad, pred, logits[0]


def saliency_png(model: Any, x: np.ndarray, path: str | os.PathLike, label: int | None = None) -> str:
    """Draw an input beside its saliency (|gradient| and signed gradient of the predicted score).

    Parameters
    ----------
    model : Sequential producing logits
    x : ndarray (C, H, W) or (1, C, H, W)
    path : file to write (PNG, 1050x360 pixels).
    label : true class of ``x``, shown in the title when given.

    Returns
    -------
    str : ``path``.
    """
    grad, pred, logits = saliency_map(model, x)
    image = _one_image(model, x)[0].mean(axis=0)
    g = grad.astype(np.float64)
    mag = np.abs(g).max(axis=0)
    signed = g[np.argmax(np.abs(g), axis=0), np.arange(g.shape[1])[:, None], np.arange(g.shape[2])]
    fig = _figure(1050, 360)
    axes = fig.subplots(1, 3)
    panels = ((image, "input", {"cmap": "gray_r"}),
              (mag, "|gradient| (saliency)", {"cmap": "hot", "vmin": 0.0}),
              (signed, "gradient (red raises, blue lowers the score)",
               {"cmap": "RdBu_r", **dict(zip(("vmin", "vmax"), _symmetric(signed)))}))
    for ax, (img, name, kw) in zip(axes, panels):
        im = ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    truth = "" if label is None else f", true class {label}"
    fig.suptitle(f"Saliency: d(score of predicted class {pred})/d(input pixels); "
                 f"score {float(logits[pred]):.2f}{truth}", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- confusion matrix

def confusion_matrix_png(cm: np.ndarray, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> str:
    """Draw a confusion matrix as a heat map with the count in every cell.

    Parameters
    ----------
    cm : ndarray (K, K) of non-negative counts, rows = true class, columns = predicted.
    path : file to write (PNG, 700x640 pixels for up to 12 classes).
    class_names : K tick labels, default "0".."K-1".

    Returns
    -------
    str : ``path``.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
        raise ValueError(f"cm must be a square (K, K) array, got shape {cm.shape}")
    if not np.issubdtype(cm.dtype, np.integer) or cm.min() < 0:
        raise ValueError("cm must hold non-negative integer counts")
    k = cm.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"class_names must have {k} entries, got {len(names)}")
    side = max(12, k)
    fig = _figure(700 + 40 * (side - 12), 640 + 40 * (side - 12))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    top = cm.max() if cm.size else 0
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", fontsize=9,
                    color="white" if cm[t, p] > top / 2 else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(cm.sum())
    acc = f", accuracy {np.trace(cm) / total:.2%}" if total else ""
    ax.set_title(f"Confusion matrix: {total} samples{acc}")
    return _save(fig, path)


# --------------------------------------------------------------------------- everything at once

def plot_model(model: Any, out_dir: str | os.PathLike, x: np.ndarray, y: np.ndarray | None = None,
               index: int = 0, history: Sequence[dict] | None = None,
               echo: Callable[[str], Any] | None = print) -> list[str]:
    """Write the pictures of a model into ``out_dir`` under stable names.

    Files: ``learning_curves.png`` (when ``history`` is given), ``filters_conv1.png``,
    ``filters_conv2.png``, ... (one per conv layer), ``feature_maps.png`` and
    ``saliency.png`` for ``x[index]``, ``confusion_matrix.png`` (when ``y`` is given,
    from the model's predictions on all of ``x``).

    Parameters
    ----------
    model : Sequential
    out_dir : directory, created if missing.
    x : ndarray (N, C, H, W), e.g. the test images.
    y : ndarray (N,) of int labels, optional.
    index : which image of ``x`` to show in the feature maps and saliency.
    history : training history (list of per-epoch dicts), optional.
    echo : called with each path as soon as it is written (default ``print``); None for quiet.

    Returns
    -------
    list of str : the paths written, in order.
    """
    require_matplotlib()
    if not isinstance(x, np.ndarray) or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"x must be a non-empty array of images (N, C, H, W), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    index = _args.integer(index, "index", 0, len(x) - 1)
    if y is not None and (np.ndim(y) != 1 or len(y) != len(x)):
        raise ValueError(f"y must be 1-D with one label per image ({len(x)}), got shape {np.shape(y)}")
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []

    def done(path: str) -> None:
        written.append(path)
        if echo is not None:
            echo(path)

    if history:
        done(learning_curves_png(history, os.path.join(out_dir, LEARNING_CURVES)))
    convs = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, Conv2d)]
    for n, (i, layer) in enumerate(convs, start=1):
        done(filters_png(layer.weight, os.path.join(out_dir, filters_name(n)), title=f"layer {i} (Conv2d)"))
    label = None if y is None else int(y[index])
    if convs or any(isinstance(layer, (MaxPool2d, AvgPool2d)) for layer in model.layers):
        done(feature_maps_png(model, x[index], os.path.join(out_dir, FEATURE_MAPS), label=label))
    done(saliency_png(model, x[index], os.path.join(out_dir, SALIENCY), label=label))
    if y is not None:
        logits = model.predict(x.astype(model.dtype or np.float32, copy=False))
        k = max(logits.shape[1], int(np.max(y)) + 1)
        cm = confusion_matrix(np.asarray(y), np.argmax(logits, axis=1), k)
        done(confusion_matrix_png(cm, os.path.join(out_dir, CONFUSION_MATRIX)))
    return written


class TrainingPlots:
    """Pictures during and after training: pass ``on_epoch_end`` to ``fit``, then call ``finish``.

    The learning curves (``learning_curves.png``) are rewritten after every epoch, so
    they can be watched while training runs; ``finish`` writes the rest with
    :func:`plot_model`. Fails fast (at construction) when matplotlib is missing.

    Examples
    --------
    >>> plots = TrainingPlots("out/plots")
    >>> history = fit(model, x, y, on_epoch_end=plots.on_epoch_end)   # doctest: +SKIP
    >>> plots.finish(model, x_test, y_test)                           # doctest: +SKIP
    """

    def __init__(self, out_dir: str | os.PathLike, echo: Callable[[str], Any] | None = print) -> None:
        require_matplotlib()
        self.out_dir = os.fspath(out_dir)
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"plots directory {self.out_dir!r} exists and is not a directory")
        os.makedirs(self.out_dir, exist_ok=True)
        self.echo = echo
        self.history: list[dict] = []

    @property
    def curves_path(self) -> str:
        return os.path.join(self.out_dir, LEARNING_CURVES)

    def on_epoch_end(self, record: dict) -> None:
        """Append ``record`` (one epoch of history) and redraw the learning curves."""
        self.history.append(dict(record))
        learning_curves_png(self.history, self.curves_path)
        if len(self.history) == 1 and self.echo is not None:
            self.echo(f"{self.curves_path} (updated every epoch)")

    def finish(self, model: Any, x: np.ndarray, y: np.ndarray | None = None, index: int = 0) -> list[str]:
        """Write filters, feature maps, saliency and confusion matrix; return all paths written."""
        rest = plot_model(model, self.out_dir, x, y, index=index, echo=self.echo)
        return ([self.curves_path] if self.history else []) + rest
