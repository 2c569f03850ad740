"""Training loop (``fit``), ``evaluate`` and a confusion matrix.

``fit`` returns the training history: a list with one dict per epoch, keys ``"epoch"``
(1-based), ``"loss"``, ``"accuracy"`` (running means over the epoch's batches),
``"val_loss"``, ``"val_accuracy"`` (None without validation data) and ``"time"`` (s).
Accuracies are None for non-classification losses.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _args, _checkpoint
from ._blas import blas_threads as _blas_threads
from ._blas import limit_blas_threads, resolve_threads
from ._checkpoint import ResumeError
from ._io import check_writable
from .losses import CrossEntropyLoss, Loss
from .model import Sequential
from .optim import Adam, Optimizer

__all__ = ["fit", "evaluate", "confusion_matrix", "format_epoch", "limit_blas_threads", "TrainingDivergedError",
           "ResumeError"]


class TrainingDivergedError(FloatingPointError):
    """The loss (or a weight) became NaN or infinite; ``epoch`` and ``step`` say where."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


def _check_xy(x: Any, y: Any, loss: Loss, what: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise TypeError(f"{what} x must be a float numpy array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{what} y must be a numpy array, got {type(y).__name__}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{what} x must have shape (N, ...) with N >= 1, got {x.shape}")
    if len(y) != len(x):
        raise ValueError(f"{what} x and y differ in length: {len(x)} samples vs {len(y)} targets")
    if loss.classification:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise TypeError(f"{what} y must be integer class labels of shape (N,), got {y.dtype} {y.shape}")
        if y.min() < 0:
            raise ValueError(f"{what} y must hold non-negative class labels, got minimum {y.min()}")


def _accuracy(out: np.ndarray, y: np.ndarray) -> int:
    return int(np.count_nonzero(out.argmax(axis=1) == y))


def _params_finite(model: Sequential) -> bool:
    return all(bool(np.isfinite(p.data).all()) for p in model.parameters())


def _first_non_finite(*arrays: np.ndarray | None) -> int | None:
    """Index of the first sample holding NaN or an infinity in any of ``arrays`` (float
    arrays of the same length; others are skipped), or None. Works in blocks of samples so
    the temporary masks stay small."""
    first = None
    for a in arrays:
        if a is None or a.dtype.kind not in "fc":
            continue
        for start in range(0, len(a) if first is None else first, 1024):
            block = a[start:start + 1024]
            ok = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            if not ok.all():
                first = start + int(np.argmin(ok))
                break
    return first


def _divergence_cause(x_train: np.ndarray, y_train: np.ndarray, idx: np.ndarray, xb: np.ndarray,
                      sample_index: np.ndarray | None) -> str:
    """Why the loss of a batch is not finite, for the error message: bad data, or the
    training itself (then a lower learning rate is the usual cure)."""
    bad = _first_non_finite(x_train[idx], y_train[idx])
    if bad is not None:
        i = int(idx[bad] if sample_index is None else sample_index[idx[bad]])
        return (f": training sample {i} holds NaN or infinite values (clean the data; "
                f"a lower learning rate will not help)")
    if _first_non_finite(xb) is not None:
        return ": augment returned NaN or infinite values"
    return " (try a lower learning rate)"


def fit(model: Sequential, x: np.ndarray, y: np.ndarray, *, epochs: int = 10, batch_size: int = 32,
        loss: Loss | None = None, optimizer: Optimizer | None = None, validation_split: float = 0.0,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None, shuffle: bool = True,
        seed: int | None = 0, progress: bool | None = None, checkpoint: str | os.PathLike | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
        augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        lr_schedule: Callable[[int], float] | None = None, blas_threads: int | str | None = None,
        resume_from: str | os.PathLike | None = None) -> list[dict]:
    """Train ``model`` with mini-batch gradient descent.

    Parameters
    ----------
    model : Sequential
    x : float ndarray (N, ...), e.g. (N, C, H, W), dtype of the model's parameters.
    y : ndarray (N,) int class labels (cross-entropy) or (N, ...) float targets (MSE).
    epochs, batch_size : int
        The last batch of an epoch may be smaller.
    loss : Loss, default ``CrossEntropyLoss()``
    optimizer : Optimizer, default ``Adam(lr=1e-3)``
    validation_split : float in [0, 1)
        Fraction of ``(x, y)`` held out (chosen at random from ``seed``) for validation.
    validation_data : (x_val, y_val), optional
        Explicit validation set; overrides ``validation_split``.
    shuffle : bool
        Reshuffle the training samples every epoch (from ``seed``).
    seed : int or None
        Seeds the validation split and shuffling. With the same seed, the same initial
        weights and seeded Dropout layers, training gives bit-identical weights.
    progress : bool or None
        Show a tqdm progress bar on stderr during each epoch, then the epoch's line
        (:func:`format_epoch`); None (default) shows them only when stderr is a terminal.
    checkpoint : path, optional
        Save the model (atomically) after every epoch whose weights are all finite, with
        the training state (optimizer state, epoch, random generator states, history) that
        ``resume_from`` needs; ``convnet.load`` reads it as a model.
    on_epoch_end : callable, optional
        Called with each epoch's history dict.
    augment : callable, optional
        ``augment(x_batch, rng) -> x_batch`` transforms each training batch (same shape and
        dtype), e.g. :func:`convnet.datasets.random_shift`; ``rng`` is seeded from ``seed``.
    lr_schedule : callable, optional
        ``lr_schedule(epoch) -> lr`` sets ``optimizer.lr`` at the start of each epoch
        (1-based), e.g. :func:`convnet.optim.cosine_schedule`.
    blas_threads : "auto", int or None
        BLAS threads during training. "auto" re-decides every 0.25 s from the other
        processes' CPU use (``/proc/stat``): all cores while the machine is otherwise idle,
        fewer when others are busy, since waiting BLAS threads then stall each GEMM (see
        :class:`convnet._blas.ThreadPolicy`). An int fixes the count. None (default) takes
        the environment variable ``CONVNET_BLAS_THREADS`` ("auto" or an int), else "auto".
    resume_from : path, optional
        A ``checkpoint`` file of an interrupted run: restore its weights, optimizer state,
        random generators and history, and continue after its last completed epoch. The
        call must train the same model (any initial weights) on the same data with the same
        settings (epochs, batch_size, seed, shuffle, augment, loss, optimizer type and
        hyperparameters) and an equivalent ``lr_schedule``; it then ends with the same
        weights, bit for bit, as an uninterrupted run. Anything else is refused with a
        :class:`ResumeError` before training. Usually the same path as ``checkpoint``.

    Returns
    -------
    list of dict
        The history, one dict per epoch (see the module docstring); after a resume it
        starts with the epochs of the interrupted run.

    Raises
    ------
    TrainingDivergedError
        (a ``FloatingPointError``) when the loss or the weights become NaN or infinite,
        naming the epoch and step. The checkpoint on disk then still holds the last
        good epoch.
    ResumeError
        (a ``ValueError``) if ``resume_from`` holds no training state or does not match
        this call.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a Sequential, got {type(model).__name__}")
    loss = CrossEntropyLoss() if loss is None else loss
    optimizer = Adam() if optimizer is None else optimizer
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a convnet.losses.Loss, got {type(loss).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a convnet.optim.Optimizer, got {type(optimizer).__name__}")
    epochs = _args.positive_int(epochs, "epochs")
    batch_size = _args.positive_int(batch_size, "batch_size")
    validation_split = _args.real(validation_split, "validation_split", 0.0, 1.0, high_open=True)
    if seed is not None:
        seed = _args.integer(seed, "seed", 0)
    _check_xy(x, y, loss, "training")
    if model.dtype is not None and x.dtype != model.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {model.dtype}; "
                        f"convert one of them (x.astype or model.astype)")
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be callable (x_batch, rng) -> x_batch, got {type(augment).__name__}")
    if lr_schedule is not None and not callable(lr_schedule):
        raise TypeError(f"lr_schedule must be callable epoch -> lr, got {type(lr_schedule).__name__}")
    blas_threads = resolve_threads(blas_threads)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        directory = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
        check_writable(checkpoint)  # fail now, not after the first epoch
    if resume_from is not None:
        resume_from = os.fspath(resume_from)
        if seed is None and (validation_split > 0 and validation_data is None):
            raise ValueError("resume_from with validation_split needs an int seed: the split is drawn from it")

    split_seq, shuffle_seq, augment_seq = np.random.SeedSequence(seed).spawn(3)
    train_index = None  # rows of x that x_train holds, when not all of them in order
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (x_val, y_val)")
        x_val, y_val = validation_data
        _check_xy(x_val, y_val, loss, "validation")
        x_train, y_train = x, y
        bad = _first_non_finite(x_val, y_val)
        if bad is not None:
            raise ValueError(f"validation data holds NaN or infinite values (sample {bad} of validation_data); "
                             f"its loss would be NaN in every epoch")
    elif validation_split > 0:
        n_val = int(round(len(x) * validation_split))
        if n_val < 1 or n_val >= len(x):
            raise ValueError(f"validation_split={validation_split} leaves {n_val} of {len(x)} samples for "
                             f"validation; need at least one for each of training and validation")
        perm = np.random.default_rng(split_seq).permutation(len(x))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
        train_index = train_idx
        bad = _first_non_finite(x_val, y_val)
        if bad is not None:
            raise ValueError(f"validation data holds NaN or infinite values (sample {int(val_idx[bad])} of x, held "
                             f"out by validation_split); its loss would be NaN in every epoch")
    else:
        x_train, y_train, x_val, y_val = x, y, None, None

    rngs = {"shuffle": np.random.default_rng(shuffle_seq), "augment": np.random.default_rng(augment_seq)}
    history: list[dict] = []
    saver = None
    if checkpoint is not None or resume_from is not None:
        # What a resumed run must share with the interrupted one (besides model and optimizer).
        settings = {"epochs": epochs, "batch_size": batch_size, "seed": None if seed is None else int(seed),
                    "shuffle": bool(shuffle), "augment": augment is not None, "loss": type(loss).__name__,
                    "samples": len(x_train), "data_sha256": _checkpoint.data_digest(x_train, y_train)}
        if resume_from is not None:
            ckpt = _checkpoint.read(resume_from)
            if ckpt.epoch > epochs:
                raise ResumeError(f"cannot resume from {resume_from}: it is at epoch {ckpt.epoch}, "
                                  f"beyond epochs={epochs}")
            history = _checkpoint.restore(ckpt, model, optimizer, settings, rngs)
        if checkpoint is not None:
            def saver(epoch: int, done: list[dict]) -> None:
                _checkpoint.save(checkpoint, model, optimizer, epoch=epoch, settings=settings, rngs=rngs,
                                 history=done)

    if model.input_shape is None:
        model.input_shape = tuple(x.shape[1:])
    show = sys.stderr.isatty() if progress is None else bool(progress)
    with _blas_threads(blas_threads) as threads:
        return _train(model, x_train, y_train, x_val, y_val, loss, optimizer, epochs, batch_size, shuffle,
                      rngs["shuffle"], rngs["augment"], augment, lr_schedule, show, checkpoint, saver,
                      on_epoch_end, train_index, history, threads.step)


def _train(model, x_train, y_train, x_val, y_val, loss, optimizer, epochs, batch_size, shuffle, shuffle_rng,
           augment_rng, augment, lr_schedule, show, checkpoint, saver, on_epoch_end, train_index,
           history, threads_step) -> list[dict]:
    if show:
        from tqdm.auto import tqdm  # imported lazily: keeps `import convnet` cheap
    n = len(x_train)
    steps = math.ceil(n / batch_size)
    params = model.parameters()
    model.train()
    for epoch in range(len(history) + 1, epochs + 1):
        t0 = time.perf_counter()
        if lr_schedule is not None:
            lr = lr_schedule(epoch)
            if not (_args.is_real(lr) and 0 < lr < math.inf):
                raise ValueError(f"lr_schedule({epoch}) must return a positive finite number, got {lr!r}")
            optimizer.lr = float(lr)
        order = shuffle_rng.permutation(n) if shuffle else np.arange(n)
        total_loss, correct = 0.0, 0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                   file=sys.stderr, dynamic_ncols=True) if show else None
        try:
            for step in range(1, steps + 1):
                idx = order[(step - 1) * batch_size: step * batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if augment is not None:
                    xb = _augmented(augment, xb, augment_rng)
                threads_step()
                model.zero_grad()
                # Overflow and NaN are caught below and reported as one error, so numpy's
                # warnings (with source lines on stderr) would only repeat it.
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    out = model.forward(xb)
                    value = loss(out, yb)
                    if not math.isfinite(value):
                        raise TrainingDivergedError(
                            f"training diverged: loss is {value} at epoch {epoch}, step {step} of {steps}"
                            + _divergence_cause(x_train, y_train, idx, xb, train_index)
                            + _checkpoint_note(checkpoint, history), epoch, step)
                    model.backward(loss.backward(), input_grad=False)  # nothing needs d(loss)/d(images)
                    optimizer.step(params)
                total_loss += value * len(idx)
                if loss.classification:
                    correct += _accuracy(out, yb)
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step == steps:
                        seen = min(step * batch_size, n)
                        post = {"loss": f"{total_loss / seen:.4f}"}
                        if loss.classification:
                            post["acc"] = f"{correct / seen:.3f}"
                        bar.set_postfix(post, refresh=False)
        finally:
            if bar is not None:
                bar.close()
        model.clear_cache()
        if not _params_finite(model):
            raise TrainingDivergedError(
                f"training diverged: weights became NaN or infinite at epoch {epoch}, step {steps} of {steps} "
                f"(try a lower learning rate)" + _checkpoint_note(checkpoint, history), epoch, steps)
        record = {
            "epoch": epoch,
            "loss": total_loss / n,
            "accuracy": correct / n if loss.classification else None,
            "val_loss": None,
            "val_accuracy": None,
            "time": 0.0,
        }
        if x_val is not None:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # an inf loss says it all
                val = evaluate(model, x_val, y_val, loss=loss)
            record["val_loss"], record["val_accuracy"] = val["loss"], val["accuracy"]
            model.train()
        record["time"] = time.perf_counter() - t0
        history.append(record)
        if show:
            tqdm.write(format_epoch(record, epochs), file=sys.stderr)
        if saver is not None:
            saver(epoch, history)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history


def format_epoch(record: dict, epochs: int | None = None) -> str:
    """One line for a history record, e.g. ``epoch 3/15: loss 0.2144, accuracy 93.45% (2.2s)``."""
    line = f"epoch {record['epoch']}" + (f"/{epochs}" if epochs else "") + f": loss {record['loss']:.4f}"
    if record.get("accuracy") is not None:
        line += f", accuracy {100 * record['accuracy']:.2f}%"
    if record.get("val_loss") is not None:
        line += f", val_loss {record['val_loss']:.4f}"
    if record.get("val_accuracy") is not None:
        line += f", val_accuracy {100 * record['val_accuracy']:.2f}%"
    return line + f" ({record['time']:.1f}s)"


def _augmented(augment, xb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = augment(xb, rng)
    if not isinstance(out, np.ndarray) or out.shape != xb.shape or out.dtype != xb.dtype:
        raise ValueError(f"augment must return an array of shape {xb.shape} and dtype {xb.dtype}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def _checkpoint_note(checkpoint: str | None, history: list[dict]) -> str:
    if checkpoint is None:
        return ""
    if not history:
        return f"; no checkpoint was written to {checkpoint}"
    return f"; the checkpoint {checkpoint} (epoch {history[-1]['epoch']}) is untouched"


def evaluate(model: Sequential, x: np.ndarray, y: np.ndarray, *, loss: Loss | None = None,
             batch_size: int = 256, blas_threads: int | str | None = None) -> dict:
    """Loss and accuracy of ``model`` on ``(x, y)`` in eval mode.

    ``blas_threads`` is passed to ``model.predict`` (see :func:`fit`).

    Returns
    -------
    dict
        ``{"loss": float, "accuracy": float or None, "predictions": int ndarray (N,) or None}``;
        accuracy and predictions (argmax classes) only for classification losses.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a Sequential, got {type(model).__name__}")
    loss = CrossEntropyLoss() if loss is None else loss
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be a convnet.losses.Loss, got {type(loss).__name__}")
    _check_xy(x, y, loss, "evaluation")
    out = model.predict(x, batch_size=batch_size, blas_threads=blas_threads)
    if loss.classification and y.max() >= out.shape[1]:
        raise ValueError(f"labels go up to {y.max()} but the model has only {out.shape[1]} outputs")
    value = loss.forward(out, y)
    if not loss.classification:
        return {"loss": value, "accuracy": None, "predictions": None}
    pred = out.argmax(axis=1)
    return {"loss": value, "accuracy": float(np.mean(pred == y)), "predictions": pred}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Counts ``m[i, j]`` of samples of true class ``i`` predicted as ``j``; int64 (K, K).

    ``num_classes`` (K) defaults to the largest label + 1; labels must be integers in [0, K).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, got {y_true.shape} and {y_pred.shape}")
    if y_true.size == 0:
        k = 0 if num_classes is None else _args.non_negative_int(num_classes, "num_classes")
        return np.zeros((k, k), np.int64)
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    low, top = int(min(y_true.min(), y_pred.min())), int(max(y_true.max(), y_pred.max()))
    k = top + 1 if num_classes is None else _args.positive_int(num_classes, "num_classes")
    if low < 0 or top >= k:
        raise ValueError(f"class labels must lie in [0, {k}), got values from {low} to {top}")
    flat = y_true.astype(np.int64) * k + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=k * k).reshape(k, k)
