"""Whole-network figure for ``benchmarks/bench.py``: one training epoch of the default network.

The default network is ``convnet.lenet()`` trained the way ``convnet train`` does
(``convnet.fit``, Adam, its default batch size) on the bundled digits. The same
network is rebuilt in PyTorch from the layers' ``get_config()``, starts from the
same weights, and is trained with the same optimizer, batch size and loss. Before
timing, one batch's loss and gradients are compared between the two, so a
throughput is only reported for a network that computes the right thing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# The witness tolerance of bench.py's layer checks, applied to a whole network's gradients.
TOLERANCE = 1e-4
WARMUP_IMAGES = 256
EPOCHS = 3  # timed epochs; the median is reported (an epoch is short, so one is noisy)


def _defaults() -> tuple[int, float]:
    """Batch size and Adam learning rate of ``convnet train`` (the default network's recipe)."""
    from convnet.models import LENET_RECIPE
    return LENET_RECIPE.batch_size, float(LENET_RECIPE.lr["adam"])


def torch_twin(model: Any, torch: Any) -> Any:
    """A torch module with the same layers, (copied) weights and buffers as ``model``.

    Containers nest as in convnet (``Sequential``, ``Residual`` with ``body`` and
    ``shortcut``), so parameter names match: ``"3.body.0.weight"`` on both sides.
    """
    nn = torch.nn
    kind = type(model).__name__
    if kind == "Sequential":
        return nn.Sequential(*[torch_twin(layer, torch) for layer in model])
    if kind == "Residual":
        return _residual_module(torch)(torch_twin(model.body, torch),
                                       None if model.shortcut is None else torch_twin(model.shortcut, torch))
    cfg = {k: v for k, v in model.get_config().items() if k != "dtype"}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if kind in ("Conv2d", "Linear", "MaxPool2d", "AvgPool2d", "LeakyReLU", "Dropout", "BatchNorm2d",
                "BatchNorm1d", "AdaptiveAvgPool2d"):
        mod = getattr(nn, kind)(**cfg)
    elif kind in ("ReLU", "Sigmoid", "Tanh", "Flatten"):
        mod = getattr(nn, kind)()
    else:
        raise TypeError(f"no torch equivalent for layer {kind}")
    for name, value in (*model.params.items(), *model.buffers.items()):
        getattr(mod, name).data = torch.from_numpy(np.array(value, copy=True))
    return mod


def _residual_module(torch: Any) -> Any:
    class Residual(torch.nn.Module):
        def __init__(self, body: Any, shortcut: Any) -> None:
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x: Any) -> Any:
            return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

    return Residual


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.max(np.abs(want))) or 1.0
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) / scale


def check_one_batch(model: Any, tmodel: Any, x: np.ndarray, y: np.ndarray, torch: Any) -> dict[str, Any]:
    """Loss, logits and every parameter gradient of one batch, convnet vs torch, same weights.

    Both run in eval mode, where Dropout is the identity: the two libraries draw
    different masks, and no other layer of these networks depends on the mode.
    """
    from convnet.losses import CrossEntropyLoss

    loss = CrossEntropyLoss()
    model.eval()
    model.zero_grad()
    out = model.forward(x)
    value = loss(out, y)
    model.backward(loss.backward())
    model.clear_cache()

    tmodel.eval()
    tmodel.zero_grad(set_to_none=True)
    tout = tmodel(torch.from_numpy(x))
    tloss = torch.nn.functional.cross_entropy(tout, torch.from_numpy(y))
    tloss.backward()

    errs = {"logits": _rel_err(out, tout.detach().numpy()),
            "loss": abs(value - tloss.item()) / max(abs(tloss.item()), 1e-12)}
    for i, (layer, mod) in enumerate(zip(model, tmodel)):
        for name in layer.params:
            errs[f"{i}.{type(layer).__name__}.{name}.grad"] = _rel_err(
                layer.grads[name], getattr(mod, name).grad.numpy())
    model.zero_grad()
    model.train()
    tmodel.zero_grad(set_to_none=True)
    tmodel.train()
    worst = max(errs, key=errs.get)
    return {"pass": all(e <= TOLERANCE for e in errs.values()), "worst": worst,
            "worst_rel_err": errs[worst], "tol": TOLERANCE, "arrays": len(errs)}


def torch_fit(tmodel: Any, x: np.ndarray, y: np.ndarray, batch_size: int, lr: float, torch: Any,
              epochs: int, seed: int = 0) -> list[dict[str, Any]]:
    """Shuffled epochs of Adam on ``tmodel``, as ``convnet.fit`` runs them; a history per epoch."""
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(tmodel.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    tmodel.train()
    history = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(X), generator=gen)
        total, correct = 0.0, 0
        for i in range(0, len(X), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = X[idx], Y[idx]
            opt.zero_grad(set_to_none=True)
            out = tmodel(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        history.append({"time": time.perf_counter() - t0, "loss": total / len(X),
                        "accuracy": correct / len(X)})
    return history


def _summary(history: list[dict[str, Any]], images: int) -> dict[str, Any]:
    """Median epoch time and images/s; loss and accuracy of the last epoch."""
    seconds = float(np.median([h["time"] for h in history]))
    return {"seconds": seconds, "images_per_s": images / seconds, "epoch_times": [h["time"] for h in history],
            "epochs": len(history), "loss": history[-1]["loss"], "accuracy": history[-1]["accuracy"]}


def _fit_blas_threads() -> Any:
    """The BLAS thread setting ``convnet.fit`` trains with by default ("auto" or a count)."""
    import inspect

    import convnet
    from convnet import _blas

    param = inspect.signature(convnet.fit).parameters.get("blas_threads")
    default = None if param is None else param.default
    return _blas.resolve_threads(None) if default is None else default


def run_network(opts: Any, torch: Any) -> dict[str, Any]:
    """Training throughput of the default network, convnet and (when available) torch.

    convnet trains through ``convnet.fit`` with its own default BLAS threading; torch
    is timed with the harness's thread count and with one thread, so the figure can be
    read both as "each library as it comes" and like for like.
    """
    import convnet
    from convnet.datasets import load_mnist_5k
    from convnet.optim import Adam

    x_train, y_train, _, _ = load_mnist_5k()
    batch_size, lr = _defaults()
    fit_threads = _fit_blas_threads()
    result: dict[str, Any] = {"network": "convnet.lenet()", "images": int(len(x_train)),
                              "batch_size": batch_size, "optimizer": f"Adam(lr={lr:g})", "status": "ok",
                              "convnet_fit_blas_threads": fit_threads}

    model = convnet.lenet(rng=opts.seed)
    # Twins are built before training changes the weights, so all runs start alike.
    twins = [torch_twin(model, torch), torch_twin(model, torch)] if torch is not None else []
    if twins:
        check = check_one_batch(model, twins[0], x_train[:batch_size], y_train[:batch_size], torch)
        result["check"] = check
        if not check["pass"]:
            result["status"] = "FAILED"
            result["reason"] = (f"convnet and torch disagree on one batch: {check['worst']} rel err "
                                f"{check['worst_rel_err']:.2e} > {TOLERANCE:.0e}")
            return result

    # Warm-up on a throwaway model, then the timed epochs.
    convnet.fit(convnet.lenet(rng=opts.seed + 1), x_train[:WARMUP_IMAGES], y_train[:WARMUP_IMAGES],
                epochs=1, batch_size=batch_size, optimizer=Adam(lr=lr), progress=False, seed=opts.seed)
    history = convnet.fit(model, x_train, y_train, epochs=EPOCHS, batch_size=batch_size,
                          optimizer=Adam(lr=lr), progress=False, seed=opts.seed)
    result["convnet"] = _summary(history, len(x_train))
    threads_note = "its default BLAS threads" if fit_threads is None else f"BLAS threads {fit_threads}"
    lines = [f"{result['network']}, {len(x_train)} images, batch {batch_size}, {result['optimizer']}; "
             f"median of {EPOCHS} epochs (loss and accuracy of the last)",
             _line(f"convnet (fit, {threads_note})", result["convnet"])]
    if twins:
        harness_threads = torch.get_num_threads()
        for key, threads, tmodel in (("torch", harness_threads, twins[0]), ("torch_1_thread", 1, twins[1])):
            torch.set_num_threads(threads)
            try:
                torch_fit(torch_twin(convnet.lenet(rng=opts.seed + 1), torch), x_train[:WARMUP_IMAGES],
                          y_train[:WARMUP_IMAGES], batch_size, lr, torch, epochs=1, seed=opts.seed)
                thist = torch_fit(tmodel, x_train, y_train, batch_size, lr, torch, epochs=EPOCHS, seed=opts.seed)
            finally:
                torch.set_num_threads(harness_threads)
            result[key] = {**_summary(thist, len(x_train)), "threads": threads}
            result[f"convnet_time_over_{key}"] = result["convnet"]["seconds"] / result[key]["seconds"]
            lines.append(_line(f"torch ({threads} thread{'s' if threads > 1 else ''})", result[key]))
        lines.append(f"convnet/torch epoch time: {result['convnet_time_over_torch']:.2f}x "
                     f"({harness_threads} threads), {result['convnet_time_over_torch_1_thread']:.2f}x "
                     f"(1 thread); one-batch loss and gradients agree: worst rel err "
                     f"{result['check']['worst_rel_err']:.1e} over {result['check']['arrays']} arrays")
    else:
        result["torch"] = {"status": "skipped", "reason": "torch not available"}
        lines.append("torch: skipped (not available)")
    result["lines"] = lines
    return result


def _line(name: str, r: dict[str, Any]) -> str:
    return (f"{name:30s} {r['images_per_s']:7.0f} images/s  (epoch {r['seconds']:.2f} s, "
            f"train loss {r['loss']:.3f}, accuracy {100 * r['accuracy']:.1f}%)")
