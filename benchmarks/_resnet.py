"""ResNet and batch-norm figures for ``benchmarks/bench.py``.

* Training step throughput (images/s) of the CIFAR ResNets (``convnet.resnet``, depth 8
  and 20) and of the depthwise-separable ``convnet.models.mobilenet`` on 32x32x3 batches
  of 128: forward, cross-entropy, backward (no input
  gradient) and an SGD step with momentum and weight decay, convnet next to the same
  network in PyTorch (built by ``_network.torch_twin``, same weights), with the same
  threads. Before timing, one training-mode batch's logits, loss and every parameter
  gradient are compared (in float64, to 1e-9), so only a network that computes the right
  thing is timed (in float32).
* Batch norm forward + backward in training mode (``functional.batch_norm_with_stats``
  and ``batch_norm_backward``) vs ``torch.nn.functional.batch_norm`` with autograd, on the
  three activation shapes of a CIFAR ResNet at batch 128.

Both are timed interleaved (a round of convnet, then a round of torch, repeated), and
medians are reported with their ratio, so load from other processes hits both sides.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# The one-batch check runs in float64: in float32 a ReLU input within rounding of 0 can take the
# other side in one library and move a whole gradient array by 1e-2 (seen on ResNet-20).
TOLERANCE = 1e-9
BATCH = 128
TARGET_RESNET20 = 1.5   # convnet step time / torch step time
TARGET_BATCH_NORM = 1.5  # convnet fwd+bwd time / torch fwd+bwd time
BN_SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]


def _interleaved(fns: dict[str, Any], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Per-call times of each function, taken in alternating rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return times


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.max(np.abs(want))) or 1.0
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) / scale


def _check(model: Any, tmodel: Any, x: np.ndarray, y: np.ndarray, torch: Any) -> dict[str, Any]:
    """Training-mode logits, loss and parameter gradients of one batch, convnet vs torch."""
    from convnet.losses import CrossEntropyLoss

    loss = CrossEntropyLoss()
    model.train()
    model.zero_grad()
    out = model.forward(x)
    value = loss(out, y)
    model.backward(loss.backward(), input_grad=False)
    tmodel.train()
    tmodel.zero_grad(set_to_none=True)
    tout = tmodel(torch.from_numpy(x))
    tloss = torch.nn.functional.cross_entropy(tout, torch.from_numpy(y))
    tloss.backward()
    errs = {"logits": _rel_err(out, tout.detach().numpy()),
            "loss": abs(value - tloss.item()) / max(abs(tloss.item()), 1e-12)}
    tparams = dict(tmodel.named_parameters())
    for p in model.parameters():
        errs[p.name + ".grad"] = _rel_err(p.grad, tparams[p.name].grad.numpy())
    model.zero_grad()
    model.clear_cache()
    worst = max(errs, key=errs.get)
    return {"pass": all(e <= TOLERANCE for e in errs.values()), "worst": worst,
            "worst_rel_err": errs[worst], "tol": TOLERANCE, "arrays": len(errs)}


def _train_steps(name: str, torch: Any, rounds: int, seed: int) -> dict[str, Any]:
    import convnet
    from convnet.losses import CrossEntropyLoss

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, BATCH)
    build = convnet.models.MODELS[name][0]
    model = build(num_classes=10, input_shape=(3, 32, 32), rng=seed)
    result: dict[str, Any] = {"network": name, "batch": BATCH, "parameters": model.num_parameters()}
    tmodel = None
    if torch is not None:
        from _network import torch_twin  # type: ignore[import-not-found]

        tmodel = torch_twin(model, torch)
        exact = build(num_classes=10, input_shape=(3, 32, 32), rng=seed).astype(np.float64)
        result["check"] = check = _check(exact, torch_twin(exact, torch), x[:16].astype(np.float64), y[:16], torch)
        if not check["pass"]:
            result["status"] = "FAILED"
            result["reason"] = (f"{name}: convnet and torch disagree on one batch: {check['worst']} rel err "
                                f"{check['worst_rel_err']:.2e} > {TOLERANCE:.0e}")
            return result

    loss = CrossEntropyLoss()
    opt = convnet.SGD(0.01, momentum=0.9, weight_decay=1e-4)
    params = model.parameters()

    def ours() -> None:
        model.zero_grad()
        loss(model.forward(x), y)
        model.backward(loss.backward(), input_grad=False)
        opt.step(params)

    fns = {"convnet": ours}
    if tmodel is not None:
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        topt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def theirs() -> None:
            topt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(tmodel(tx), ty).backward()
            topt.step()

        fns["torch"] = theirs
    times = _interleaved(fns, rounds=rounds, per_round=2)
    model.clear_cache()
    for key, ts in times.items():
        med = float(np.median(ts))
        result[key] = {"step_median_s": med, "images_per_s": BATCH / med, "steps": len(ts)}
    if "torch" in result:
        result["time_ratio"] = result["convnet"]["step_median_s"] / result["torch"]["step_median_s"]
    result["status"] = "ok"
    return result


def _batch_norm(shape: tuple[int, ...], torch: Any, rounds: int, seed: int) -> dict[str, Any]:
    import convnet.functional as F

    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    dy = rng.standard_normal(shape, dtype=np.float32)
    w, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

    def ours() -> tuple:
        y, stats = F.batch_norm_with_stats(x, w, b, rm, rv, True)
        return (y,) + F.batch_norm_backward(dy, x, w, stats)

    result: dict[str, Any] = {"shape": list(shape), "status": "ok"}
    fns = {"convnet": ours}
    if torch is not None:
        tx = torch.from_numpy(x.copy()).requires_grad_(True)
        tw, tb = torch.from_numpy(w.copy()).requires_grad_(True), torch.from_numpy(b.copy()).requires_grad_(True)
        trm, trv, tdy = torch.zeros(c), torch.ones(c), torch.from_numpy(dy)

        def theirs() -> tuple:
            y = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
            return (y.detach(),) + torch.autograd.grad(y, (tx, tw, tb), tdy)

        errs = [_rel_err(a, t.numpy()) for a, t in zip(ours(), theirs())]
        result["worst_rel_err"] = max(errs)
        if max(errs) > 1e-4:
            result["status"] = "FAILED"
            result["reason"] = f"batch norm {shape}: convnet and torch differ (rel err {max(errs):.1e})"
            return result
        fns["torch"] = theirs
    times = _interleaved(fns, rounds=rounds, per_round=3)
    for key, ts in times.items():
        result[key] = {"median_s": float(np.median(ts)), "repeats": len(ts)}
    if "torch" in result:
        result["time_ratio"] = result["convnet"]["median_s"] / result["torch"]["median_s"]
    return result


NETWORKS = ("resnet8", "resnet20", "mobilenet")


def run_resnets(opts: Any, torch: Any, networks: tuple[str, ...] = NETWORKS) -> dict[str, Any]:
    """The ResNet / depthwise-net training-step and batch-norm rows, with ``lines`` for the text report."""
    rounds = 3 if opts.budget_s < 1 else 5
    nets = [_train_steps(name, torch, rounds, opts.seed) for name in networks]
    norms = [_batch_norm(s, torch, rounds * 2, opts.seed) for s in BN_SHAPES]
    lines = [f"training step, batch {BATCH} of 32x32x3, SGD (momentum, weight decay); median of "
             f"{2 * rounds} interleaved steps"]
    for r in nets:
        if r["status"] != "ok":
            lines.append(f"  {r['network']}: {r['status']}: {r['reason']}")
            continue
        line = (f"  {r['network']:9s} ({r['parameters']:>7,} params): convnet {r['convnet']['images_per_s']:6.0f} "
                f"images/s ({r['convnet']['step_median_s'] * 1e3:.0f} ms/step)")
        if "torch" in r:
            line += (f", torch {r['torch']['images_per_s']:6.0f} images/s ({r['torch']['step_median_s'] * 1e3:.0f} "
                     f"ms/step); convnet/torch {r['time_ratio']:.2f}x; one batch agrees "
                     f"(worst rel err {r['check']['worst_rel_err']:.1e} over {r['check']['arrays']} arrays)")
        lines.append(line)
    lines.append("batch norm forward + backward (training mode), median of interleaved calls")
    for r in norms:
        if r["status"] != "ok":
            lines.append(f"  {r['shape']}: {r['status']}: {r['reason']}")
            continue
        line = f"  {str(tuple(r['shape'])):18s} convnet {r['convnet']['median_s'] * 1e3:6.2f} ms"
        if "torch" in r:
            line += f", torch {r['torch']['median_s'] * 1e3:6.2f} ms; convnet/torch {r['time_ratio']:.2f}x"
        lines.append(line)
    targets = []
    r20 = next((r for r in nets if r["network"] == "resnet20" and "time_ratio" in r), None)
    targets.append({"target": "resnet20 training step time vs torch", "limit": TARGET_RESNET20,
                    "value": None if r20 is None else r20["time_ratio"]})
    bn = [r["time_ratio"] for r in norms if "time_ratio" in r]
    targets.append({"target": "batch norm fwd+bwd time vs torch (worst shape)", "limit": TARGET_BATCH_NORM,
                    "value": max(bn) if bn else None})
    for t in targets:
        t["pass"] = None if t["value"] is None else t["value"] <= t["limit"]
        lines.append(f"target: {t['target']} <= {t['limit']:.1f}x: "
                     + ("not measured" if t["value"] is None else
                        f"{t['value']:.2f}x {'met' if t['pass'] else 'MISSED'}"))
    failed = [r for r in nets + norms if r["status"] != "ok"]
    return {"status": "FAILED" if failed else "ok", "networks": nets, "batch_norm": norms,
            "targets": targets, "lines": lines,
            **({"reason": "; ".join(r["reason"] for r in failed)} if failed else {})}
