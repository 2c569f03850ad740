"""The ``convnet`` command (also ``python -m convnet``).

Subcommands, one ``cmd_<name>(args) -> int`` function each, registered in
``build_parser()``:

* ``convnet train``: train the LeNet-style network on the bundled digits (or on MNIST /
  Fashion-MNIST IDX files with ``--data DIR``, or a ResNet on CIFAR-10 with
  ``--dataset cifar10 --data DIR``), print test accuracy, save the model.
* ``convnet evaluate MODEL``: accuracy and confusion matrix on the test split.
* ``convnet summary MODEL``: the architecture, output shapes and parameter counts.
* ``convnet plot MODEL --out DIR``: PNG pictures of a saved model (needs matplotlib).
* ``convnet explain [conv|backward|pool]``: the tutorial's worked examples, step by step.
* ``convnet predict MODEL INPUT...``: classify pictures, .npy arrays or IDX files.
* ``convnet export MODEL --onnx OUT --safetensors OUT``: the model for other engines.
* ``convnet serve [MODEL]``: a local web page to draw digits and watch the network (``serve.py``).

User mistakes (missing files, bad option values, corrupted models) print one line
``convnet: error: ...`` to stderr and exit with status 2 (bad usage) or 1 (anything
else); no traceback. Set ``CONVNET_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .models import LENET_RECIPE, MODELS

DEFAULT_OUT = os.path.join("out", "convnet_mnist.npz")
DEFAULT_OUTS = {"mnist": DEFAULT_OUT, "cifar10": os.path.join("out", "convnet_cifar10.npz")}
DEFAULT_MODELS = {"mnist": "lenet", "cifar10": "resnet20"}
# The default network's recipe lives with the network (convnet.models); these names stay for callers.
DEFAULT_EPOCHS = LENET_RECIPE.epochs
DEFAULT_BATCH_SIZE = LENET_RECIPE.batch_size
DEFAULT_LR = LENET_RECIPE.lr
DEFAULT_SEED = LENET_RECIPE.seed


class CliError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: reject bad values with a message naming the value ---------------------

def _checked(cast: type, ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` if it converts and passes ``ok``, else a message with ``what``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in its own messages
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive finite number")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_non_negative_float = _checked(float, lambda v: 0 <= v < float("inf"), "a non-negative finite number")


# -- data ---------------------------------------------------------------------------------------

def _load_data(data_dir: str | None, dataset: str = "mnist"):
    """(split, description) for the bundled digits, an IDX directory or CIFAR-10's binary files."""
    from . import datasets

    if dataset == "cifar10":
        return datasets.load_cifar10(data_dir), f"CIFAR-10 binary files in {data_dir}"
    if data_dir is None:
        return datasets.load_mnist_5k(), "bundled MNIST digits"
    return datasets.load_mnist_idx(data_dir), f"IDX files in {data_dir}"


def _load_test_data(data_dir: str | None):
    """(x_test, y_test) of the bundled digits or of an IDX directory's test files alone."""
    from . import datasets

    if data_dir is None:
        split = datasets.load_mnist_5k()
        return split.x_test, split.y_test
    return datasets.load_mnist_idx_part(data_dir, "test")


# -- subcommands --------------------------------------------------------------------------------

def _add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a CNN (LeNet on digits by default, ResNets on CIFAR-10) and save it",
        description="Train a network on the bundled 5,000 MNIST digits (4,000 train / 1,000 test), on full "
                    "MNIST / Fashion-MNIST IDX files (--data), or on CIFAR-10 (--dataset cifar10 --data DIR "
                    "with the binary version); print test accuracy and save the model. Each --model has its "
                    "own default recipe (epochs, batch size, optimizer, learning rate, weight decay); the "
                    "options below override it.")
    p.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist",
                   help="mnist (default: the bundled digits, or IDX files in --data) or cifar10 (binary "
                        "files data_batch_1.bin .. data_batch_5.bin, test_batch.bin in --data)")
    p.add_argument("--model", choices=tuple(MODELS), default=None,
                   help="network (default lenet for mnist, resnet20 for cifar10)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"passes over the training data (default: the model's recipe, {DEFAULT_EPOCHS} for lenet)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"mini-batch size (default: the model's recipe, {DEFAULT_BATCH_SIZE} for lenet)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="initial learning rate, decayed towards 0 over the epochs on a cosine curve "
                        "(default: the recipe's for the optimizer, 0.001 for adam and 0.05 for sgd with lenet)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=None,
                   help="adam or sgd with momentum 0.9 (default: the recipe's, adam for lenet, sgd for resnets)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None,
                   help="L2 weight decay on the parameters (default: the recipe's, 0 for lenet, 1e-4 for resnets)")
    p.add_argument("--seed", type=_non_negative_int, default=DEFAULT_SEED,
                   help=f"seed for initial weights and shuffling (default {DEFAULT_SEED})")
    p.add_argument("--val-split", type=_fraction, default=0.0,
                   help="fraction of the training data held out for validation (default 0)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help=f"where to save the model (default {DEFAULT_OUT}, or {DEFAULT_OUTS['cifar10']} for "
                        f"cifar10); also written after every epoch as a checkpoint")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="for mnist: directory with MNIST-format IDX files (train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; "
                        "raw or .gz) instead of the bundled digits; for cifar10 (required): the directory "
                        "of the CIFAR-10 binary version")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no data augmentation (on by default: random 1-pixel shifts of digits; random crops "
                        "of the 4-pixel-padded image and horizontal flips for cifar10)")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="train on only the first N training images (quick runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoint in --out (same options otherwise): "
                        "the result equals an uninterrupted run's; starts afresh if --out does not exist")
    p.add_argument("--plots", metavar="DIR", default=None,
                   help="write pictures to DIR: learning curves after every epoch, then filters, feature "
                        "maps, saliency and confusion matrix (needs matplotlib)")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    """``convnet train``: build, train, evaluate and save a network (LeNet on digits by default)."""
    import numpy as np

    from . import datasets
    from . import models as model_mod
    from .optim import SGD, Adam, cosine_schedule
    from .training import evaluate, fit, format_epoch

    # The model's recipe fills in whatever the command line leaves out.
    model_name = args.model or DEFAULT_MODELS[args.dataset]
    recipe = model_mod.RECIPES[model_name]
    epochs = args.epochs if args.epochs is not None else recipe.epochs
    batch_size = args.batch_size if args.batch_size is not None else recipe.batch_size
    opt_name = args.optimizer or recipe.optimizer
    weight_decay = args.weight_decay if args.weight_decay is not None else recipe.weight_decay
    if args.out is None:
        args.out = DEFAULT_OUTS[args.dataset]
    if args.dataset == "cifar10" and args.data is None:
        raise CliError("--dataset cifar10 needs --data DIR, the directory of the CIFAR-10 binary files "
                       "(data_batch_1.bin .. data_batch_5.bin, test_batch.bin)", 2)
    if args.dataset == "cifar10" and args.plots is not None:
        raise CliError("--plots draws digit models only; leave it out with --dataset cifar10", 2)
    _check_out(args.out)
    resume = args.resume and os.path.exists(args.out)
    plots = _training_plots(args.plots)
    split, source = _load_data(args.data, args.dataset)
    x_train, y_train, x_test, y_test = split
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    augment = None
    if args.dataset == "cifar10":
        # Per-channel normalization with the training images' statistics; the saved model
        # expects inputs normalized the same way.
        mean, std = datasets.channel_stats(x_train)
        x_train = datasets.normalize_channels(x_train, mean, std)
        x_test = datasets.normalize_channels(x_test, mean, std)
        if args.augment:
            augment = datasets.random_crop_flip
    elif args.augment:
        augment = datasets.random_shift
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    try:
        model = model_mod.build(model_name, num_classes=num_classes, input_shape=x_train.shape[1:], rng=args.seed)
    except ValueError as exc:
        raise CliError(f"--model {model_name}: {exc}", 2) from None
    lr = args.lr if args.lr is not None else recipe.lr[opt_name]
    optimizer = (Adam(lr=lr, weight_decay=weight_decay) if opt_name == "adam"
                 else SGD(lr=lr, momentum=recipe.momentum, weight_decay=weight_decay))
    schedule = cosine_schedule(lr, epochs)
    done = _resume_point(args.out, schedule, epochs) if resume else None

    say = (lambda *a, **k: None) if args.quiet else print
    aug_note = {None: "", datasets.random_shift: ", random 1-pixel shifts",
                datasets.random_crop_flip: ", random crops (4-pixel padding) and flips"}[augment]
    norm_note = (f", channels normalized (mean {np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()})"
                 if args.dataset == "cifar10" else "")
    say(f"training {model_name} on {len(x_train)} images from {source} ({x_train.shape[2]}x{x_train.shape[3]}, "
        f"{num_classes} classes); {epochs} epoch{'s' if epochs > 1 else ''}, batch size {batch_size}, "
        f"{opt_name} lr {lr:g}" + (f" weight decay {weight_decay:g}" if weight_decay else "")
        + f" with cosine decay, seed {args.seed}" + aug_note + norm_note, flush=True)
    if args.resume:
        say(f"resuming from {args.out} after epoch {len(done)} of {epochs}" if done is not None
            else f"no checkpoint at {args.out} to resume from: starting from scratch", flush=True)
    elif _is_checkpoint(args.out):
        say(f"note: {args.out} holds an interrupted run; training anew replaces it (--resume continues it)",
            flush=True)
    if done and plots is not None:
        plots.history = [dict(rec) for rec in done]  # the learning curves show the whole run

    # On a terminal, fit draws a progress bar and prints each epoch's line on stderr;
    # otherwise (logs, pipes) the epoch lines go to stdout.
    progress = not args.quiet and sys.stderr.isatty()

    def report(rec: dict) -> None:
        if not progress:
            say(format_epoch(rec, epochs), flush=True)

    t0 = time.perf_counter()
    fit(model, x_train, y_train, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
        validation_split=args.val_split, seed=args.seed, progress=progress,
        checkpoint=args.out, lr_schedule=schedule, resume_from=args.out if done is not None else None,
        augment=augment,
        on_epoch_end=report if plots is None else lambda rec: (report(rec), plots.on_epoch_end(rec)))
    train_time = time.perf_counter() - t0
    result = evaluate(model, x_test, y_test)
    correct = int(np.count_nonzero(result["predictions"] == y_test))
    print(f"test accuracy: {100 * result['accuracy']:.2f}% ({correct}/{len(y_test)}), "
          f"test loss {result['loss']:.4f}; trained in {train_time:.1f}s")
    model.save(args.out)
    print(f"model saved to {args.out}")
    if plots is not None:
        plots.finish(model, x_test, y_test)
    return 0


def _is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a training checkpoint (looks at the archive's member names only)."""
    import zipfile

    from .model import TRAINING_STATE_PREFIX

    try:
        with zipfile.ZipFile(path) as zf:
            return TRAINING_STATE_PREFIX + ".npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _resume_point(path: str, schedule, epochs: int) -> list[dict]:
    """The history of the interrupted run checkpointed at ``path``, after checking that its
    learning rate fits this run's schedule (fit checks everything else)."""
    from . import _checkpoint

    ckpt = _checkpoint.read(path)
    if ckpt.epoch <= epochs and ckpt.state["optimizer"]["lr"] != schedule(ckpt.epoch):
        raise CliError(f"cannot resume from {path}: it was trained with another learning rate "
                       f"(--lr or --optimizer differ from the interrupted run)")
    return ckpt.state["history"]


def _check_out(out: str) -> None:
    """Make sure the model can be saved to ``--out`` before any training: create its
    directory if missing and try writing a file there; errors name the user's path."""
    from ._io import check_writable

    if not out:
        raise CliError(f"--out must be a file path such as {DEFAULT_OUT}, got ''", 2)
    if os.path.isdir(out):
        raise CliError(f"--out {out!r} is a directory; give a file path such as {DEFAULT_OUT}", 2)
    if out.endswith(("/", os.sep)):
        raise CliError(f"--out {out!r} names a directory; give a file path such as "
                       f"{os.path.join(out, 'convnet_mnist.npz')}", 2)
    directory = os.path.dirname(out)
    try:
        if directory:
            os.makedirs(directory, exist_ok=True)
        check_writable(out)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way of the directory"
        where = f"directory {directory!r}" if directory else "the current directory"
        raise CliError(f"--out {out!r}: cannot save the model in {where}: {reason}", 1) from None


def _add_evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="accuracy and confusion matrix of a saved model",
                       description="Print the accuracy and confusion matrix of a saved model on the "
                                   "bundled test split (1,000 digits) or on the IDX test files in --data.")
    p.add_argument("model", metavar="MODEL", help="model file written by `convnet train` or model.save()")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="directory with MNIST-format IDX files (uses the t10k test files)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="inference batch size (default 256)")
    p.set_defaults(func=cmd_evaluate)
    return p


def format_confusion_matrix(matrix, labels: Sequence[str] | None = None) -> str:
    """Text table: rows are true classes, columns predicted classes."""
    k = len(matrix)
    labels = [str(i) for i in range(k)] if labels is None else list(labels)
    width = max(max(len(str(int(v))) for row in matrix for v in row), max(len(s) for s in labels), 3)
    lead = max(len("true"), max(len(s) for s in labels))
    lines = [" " * (lead + 1) + "predicted".center((width + 1) * k).rstrip()]
    lines.append("true".rjust(lead) + " " + " ".join(s.rjust(width) for s in labels))
    for name, row in zip(labels, matrix):
        lines.append(name.rjust(lead) + " " + " ".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``convnet evaluate MODEL``: accuracy and confusion matrix."""
    import numpy as np

    from .model import load
    from .training import confusion_matrix, evaluate

    model = load(args.model)
    x_test, y_test = _load_test_data(args.data)
    _check_model_fits(model, x_test, args.model)
    result = evaluate(model, x_test, y_test, batch_size=args.batch_size)
    num_classes = max(int(y_test.max()) + 1, int(result["predictions"].max()) + 1)
    matrix = confusion_matrix(y_test, result["predictions"], num_classes)
    correct = int(np.trace(matrix))
    source = "bundled test split" if args.data is None else f"{args.data} test files"
    print(f"{args.model}: accuracy {100 * result['accuracy']:.2f}% ({correct}/{len(y_test)}) on the {source}, "
          f"loss {result['loss']:.4f}")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print(format_confusion_matrix(matrix))
    return 0


def _check_model_fits(model, x, path: str) -> None:
    if model.input_shape is not None and tuple(model.input_shape) != tuple(x.shape[1:]):
        raise CliError(f"{path} expects inputs of shape {tuple(model.input_shape)}, "
                       f"but the data has shape {tuple(x.shape[1:])}")


def _add_summary_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("summary", help="print a saved model's architecture",
                       description="Print each layer of a saved model with its output shape and "
                                   "parameter count.")
    p.add_argument("model", metavar="MODEL", help="model file written by `convnet train` or model.save()")
    p.set_defaults(func=cmd_summary)
    return p


def cmd_summary(args: argparse.Namespace) -> int:
    """``convnet summary MODEL``."""
    from .model import load

    model = load(args.model)
    table = model.summary(file=io.StringIO())  # all checks first: an error prints nothing else
    print(f"{args.model}:\n{table}")
    return 0


def _training_plots(out_dir: str | None):
    """``plot.TrainingPlots`` for ``train --plots DIR`` (None without it); fails before training."""
    if out_dir is None:
        return None
    from . import plot

    try:
        return plot.TrainingPlots(out_dir)
    except plot.MatplotlibMissingError as exc:
        raise CliError(str(exc), 1) from None
    except ValueError as exc:
        raise CliError(f"--plots: {exc}", 2) from None


def _add_plot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="pictures of a saved model: filters, feature maps, saliency, confusion matrix",
                       description="Write PNG pictures of a saved model into DIR: its conv filters "
                                   "(filters_conv1.png, ...), the feature maps and saliency of one test digit "
                                   "(feature_maps.png, saliency.png) and the confusion matrix on the test split "
                                   "(confusion_matrix.png). Needs matplotlib.")
    p.add_argument("model", metavar="MODEL", help="model file written by `convnet train` or model.save()")
    p.add_argument("--out", metavar="DIR", required=True, help="directory for the PNG files (created if missing)")
    p.add_argument("--index", type=_non_negative_int, default=0, metavar="I",
                   help="which test digit to show in the feature maps and saliency (default 0)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="directory with MNIST-format IDX files (uses the t10k test files)")
    p.set_defaults(func=cmd_plot)
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    """``convnet plot MODEL --out DIR``: write the pictures, printing each path."""
    from . import plot
    from .model import load

    try:
        plot.require_matplotlib()
    except plot.MatplotlibMissingError as exc:
        raise CliError(str(exc), 1) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out!r} exists and is not a directory", 2)
    model = load(args.model)
    x_test, y_test = _load_test_data(args.data)
    _check_model_fits(model, x_test, args.model)
    if args.index >= len(x_test):
        raise CliError(f"--index must be below the number of test images ({len(x_test)}), got {args.index}", 2)
    plot.plot_model(model, args.out, x_test, y_test, index=args.index)
    return 0


def _add_explain_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("explain", help="replay the tutorial's conv, backward and pooling examples step by step",
                       description="Print, step by step, the tutorial's worked examples: a conv layer's forward "
                                   "pass (output-size formula, one element as a sum of products, the feature "
                                   "maps), its backward pass (zero insertion, padding, flipped filters, "
                                   "sensitivity map, filter gradients) and max/mean pooling with their error "
                                   "routing. Every number is computed by the engine and checked against the "
                                   "loop reference. With --input/--weights, the same steps on your arrays.")
    p.add_argument("part", nargs="?", choices=("conv", "backward", "pool"), default=None,
                   help="only this part (default: all three)")
    p.add_argument("--input", metavar="FILE.npy", default=None,
                   help="one input image, shape (H, W), (C, H, W) or (1, C, H, W)")
    p.add_argument("--weights", metavar="FILE.npz", default=None,
                   help="np.savez archive with 'weight' (F, C, KH, KW) and optional 'bias' (F,), "
                        "'stride', 'padding' (int or pair; default 1 and 0)")
    p.set_defaults(func=cmd_explain)
    return p


def cmd_explain(args: argparse.Namespace) -> int:
    """``convnet explain [conv|backward|pool]``; exit status 1 if the engine and reference disagree."""
    from . import explain

    try:
        x = explain.load_input(args.input) if args.input is not None else None
        w = explain.load_weights(args.weights) if args.weights is not None else {}
        mismatches = explain.explain(args.part or "all", x=x, **w)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc), 1) from None
    return 1 if mismatches else 0


def _load_any_model(path: str):
    """A convnet model file, or an ONNX file (by its .onnx name)."""
    if path.lower().endswith(".onnx"):
        try:
            from . import onnx as convnet_onnx
        except ImportError as exc:
            raise CliError(str(exc), 1) from None
        return convnet_onnx.load(path)
    from .model import load

    return load(path)


def _add_predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict", help="classify image files, .npy arrays or IDX files with a saved model",
        description="Print the predicted class and its probability for every image in the inputs: PNG or JPEG "
                    "pictures (converted to the model's channels and size, scaled to [0, 1] as in training; "
                    "needs Pillow), .npy arrays ((H, W), (N, H, W), (C, H, W) or (N, C, H, W); uint8 is scaled "
                    "by 1/255) or IDX files. One line per image: 'FILE: CLASS (PROBABILITY)', or with --json "
                    "one JSON object per line. A bad file gets one line on stderr and the others are still "
                    "predicted; the exit status is 1 if any input failed.")
    p.add_argument("model", metavar="MODEL", help="model file from `convnet train` / model.save(), or an .onnx file")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image, .npy or IDX files")
    p.add_argument("--top", type=_positive_int, default=1, metavar="K", help="show the K most probable classes")
    p.add_argument("--json", action="store_true", help="one JSON object per image (JSON Lines) on stdout")
    p.add_argument("--invert", action="store_true",
                   help="invert pictures (dark digits on a light background -> MNIST's light on dark)")
    p.add_argument("--mean", type=_float_list, default=None, metavar="M[,M...]",
                   help="per-channel mean to subtract after scaling to [0, 1] (for models trained on "
                        "normalized images, e.g. CIFAR-10's channel means)")
    p.add_argument("--std", type=_float_list, default=None, metavar="S[,S...]",
                   help="per-channel standard deviation to divide by, after --mean")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="inference batch size (default 256)")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run the prediction on the Dask cluster at ADDRESS (e.g. tcp://host:8786; needs "
                        "convnet[dask])")
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    """``convnet predict MODEL INPUT...``; exit status 1 if any input could not be read."""
    import json

    import numpy as np

    from . import functional as F
    from .inference import InputFileError, read_images, sample_shape, top_k

    model = _load_any_model(args.model)
    try:
        shape = sample_shape(model)
    except ValueError as exc:
        raise CliError(f"{args.model}: {exc}", 1) from None
    dtype = model.dtype or np.float32
    mean, std = _channel_stats(args.mean, args.std, shape[0], dtype)
    labels: list[str] = []
    batches = []
    failed = 0
    for path in args.inputs:
        try:
            x = (read_images(path, shape, dtype, invert=args.invert) - mean) / std
        except InputFileError as exc:
            failed += 1
            print(f"convnet predict: error: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps({"input": path, "error": str(exc)}))
            continue
        batches.append(x)
        labels.extend([path] if len(x) == 1 else [f"{path}[{i}]" for i in range(len(x))])
    if batches:
        x = np.concatenate(batches) if len(batches) > 1 else batches[0]
        if args.scheduler is not None:
            logits = _predict_on_cluster(model, x, args.scheduler, args.batch_size)
        else:
            logits = model.predict(x, batch_size=args.batch_size)
        if logits.ndim != 2:
            raise CliError(f"{args.model}: the model outputs shape {logits.shape[1:]} per image, "
                           f"not class scores", 1)
        classes, probs = top_k(F.softmax(logits.astype(np.float64), axis=1), args.top)
        for label, cls, prob in zip(labels, classes, probs):
            if args.json:
                top = [{"class": int(c), "probability": float(p)} for c, p in zip(cls, prob)]
                print(json.dumps({"input": label, "class": top[0]["class"],
                                  "probability": top[0]["probability"], "top": top}))
            else:
                print(f"{label}: " + ", ".join(f"{int(c)} ({p:.4f})" for c, p in zip(cls, prob)))
    return 1 if failed else 0


def _float_list(text: str) -> list[float]:
    """argparse type: comma-separated finite numbers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {text!r}") from None
    if not all(abs(v) < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers, got {text!r}")
    return values


def _channel_stats(mean, std, channels: int, dtype):
    """(mean, std) as (C, 1, 1) arrays for ``(x - mean) / std``; one value applies to every channel."""
    import numpy as np

    out = []
    for name, values, default in (("--mean", mean, 0.0), ("--std", std, 1.0)):
        values = [default] if values is None else values
        if len(values) not in (1, channels):
            raise CliError(f"{name} needs 1 or {channels} values (the model's channels), got {len(values)}", 2)
        if name == "--std" and min(values) <= 0:
            raise CliError(f"--std values must be positive, got {values}", 2)
        out.append(np.asarray(values, dtype=dtype).reshape(-1, 1, 1))
    return out[0], out[1]


def _predict_on_cluster(model, x, address: str, batch_size: int):
    try:
        from distributed import Client

        from . import dask as convnet_dask
    except ImportError:
        raise CliError("--scheduler needs Dask: pip install 'convnet[dask]'", 1) from None
    import dask.array as da

    try:
        client = Client(address, timeout=10, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CliError(f"--scheduler {address}: cannot connect ({exc})", 1) from None
    with client:
        images = da.from_array(x, chunks=(batch_size, *x.shape[1:]))
        return convnet_dask.predict(model, images, batch_size=batch_size, output="logits").compute(scheduler=client)


def _add_export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a saved model as ONNX and/or its weights as .safetensors",
                       description="Write a saved convnet model as an ONNX file (for ONNX Runtime and other "
                                   "engines) and/or its weights as .safetensors under PyTorch's state_dict names "
                                   "(for the same architecture in PyTorch).")
    p.add_argument("model", metavar="MODEL", help="model file written by `convnet train` or model.save()")
    p.add_argument("--onnx", metavar="OUT", default=None, help="write an ONNX file (needs convnet[onnx])")
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--safetensors", metavar="OUT", default=None,
                   help="write the weights as .safetensors (needs convnet[safetensors])")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """``convnet export MODEL --onnx OUT --safetensors OUT``."""
    from .model import load

    if args.onnx is None and args.safetensors is None:
        raise CliError("nothing to do: give --onnx OUT and/or --safetensors OUT", 2)
    if args.opset is not None and args.onnx is None:
        raise CliError("--opset applies to --onnx only", 2)
    for out in (args.onnx, args.safetensors):
        if out is not None and os.path.isdir(out):
            raise CliError(f"{out!r} is a directory; give a file path", 2)
    model = load(args.model)
    try:
        if args.onnx is not None:
            from . import onnx as convnet_onnx
        if args.safetensors is not None:
            from . import weights
    except ImportError as exc:
        raise CliError(str(exc), 1) from None
    if args.onnx is not None:
        opset = args.opset if args.opset is not None else convnet_onnx.DEFAULT_OPSET
        convnet_onnx.export(model, args.onnx, opset=opset)
        print(f"wrote {args.onnx} (ONNX, opset {opset})")
    if args.safetensors is not None:
        weights.save_safetensors(model, args.safetensors)
        print(f"wrote {args.safetensors} ({len(model.state_dict())} tensors under PyTorch's state_dict names)")
    return 0


def _add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="a local web page: draw a digit and watch the network see it",
                       description="Serve a page where you draw a digit and see the class probabilities, the "
                                   "feature maps of every conv and pooling layer and the saliency map as you draw; "
                                   "step through the tutorial's worked examples; train a network and watch its "
                                   "learning curve and filters. Listens on 127.0.0.1 (this machine only) unless "
                                   "--host says otherwise; Ctrl-C stops it.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help=f"model file (default {DEFAULT_OUT}, which `make demo` / `convnet train` write; "
                        f"trained first when missing)")
    p.add_argument("--port", type=_checked(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535"),
                   default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); 0.0.0.0 opens the page to other machines")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """``convnet serve [MODEL]``: serve the page until Ctrl-C."""
    from . import serve
    from .model import load

    path = DEFAULT_OUT if args.model is None else args.model
    if args.model is None and not os.path.exists(path):
        print(f"no model at {path} yet: training the default network first (convnet train)", flush=True)
        cmd_train(build_parser().parse_args(["train", "--out", path]))
    model = load(path)
    try:
        server = serve.make_server(model, args.host, args.port, model_name=path)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host} port {args.port}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"{path}: {exc}") from None
    return serve.run_server(server)


# Each entry adds one subcommand's parser (which sets `func`); add new subcommands here.
SUBCOMMANDS: list[Callable] = [_add_train_parser, _add_evaluate_parser, _add_summary_parser,
                               _add_plot_parser, _add_explain_parser, _add_predict_parser, _add_export_parser,
                               _add_serve_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``convnet`` argument parser with all subcommands."""
    parser = _Parser(prog="convnet", description="Train, evaluate and inspect CNNs built with convnet "
                                                 "(a vectorized im2col CNN engine in numpy).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"convnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convnet`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    from .datasets import CifarFormatError, IdxFormatError
    from .model import ModelFileError
    from .onnx import OnnxError
    from .training import ResumeError, TrainingDivergedError
    from .weights import WeightsFileError

    debug = bool(os.environ.get("CONVNET_DEBUG"))

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # Python's default shows the warning's source file and line: noise to a command-line user.
        print(f"convnet {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = one_line_warning
            return int(args.func(args) or 0)
    except CliError as exc:
        message, code = str(exc), exc.code
    except KeyboardInterrupt:
        print("convnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        if debug:
            raise
        # open() errors read "[Errno 2] ..."; say "<file>: <reason>" instead.
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        code = 1
    except (ModelFileError, IdxFormatError, CifarFormatError, TrainingDivergedError, ResumeError, OnnxError,
            WeightsFileError) as exc:
        if debug:
            raise
        message, code = str(exc), 1
    except (ValueError, TypeError) as exc:
        # Raised by argument checks deeper down (e.g. a model that does not fit the data);
        # the message names what is wrong.
        if debug:
            raise
        message, code = f"{exc} (set CONVNET_DEBUG=1 for a traceback)", 1
    except MemoryError as exc:
        # Files are checked before allocating; this is the last line of defence (e.g. a
        # model too big for this machine), still one line.
        if debug:
            raise
        message, code = f"out of memory ({exc or 'MemoryError'})", 1
    print(f"convnet {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
